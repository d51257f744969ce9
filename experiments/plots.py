"""Training-curve plots of the experiment workflows, from each run's metrics.jsonl
(`encdec_adapt.runtime.metrics_log.read_metrics`)."""

from __future__ import annotations

import os

from encdec_adapt.runtime.metrics_log import read_metrics


def write_plots(out: str, stages) -> list[str]:
    """One PNG per training stage (loss and accuracy against step) and one of all losses;
    returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    written = []
    curves = {}
    for stage in stages:
        records = read_metrics(os.path.join(out, stage), "train")
        if not records:
            continue
        steps = [r["step"] for r in records]
        curves[stage] = (steps, [r["loss"] for r in records])
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, curves[stage][1], label="train loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if "accuracy" in records[0]:
            acc = ax.twinx()
            acc.plot(steps, [r["accuracy"] for r in records], color="tab:orange", label="accuracy")
            acc.set_ylabel("token accuracy")
        ax.set_title(stage)
        fig.tight_layout()
        path = os.path.join(out, "plots", f"{stage}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for stage, (steps, losses) in curves.items():
            ax.plot(steps, losses, label=stage)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out, "plots", "all_losses.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
