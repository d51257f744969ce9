"""The report of one reproduction: results.md (tables) and the plots curves.png and
train_curves.png."""

from __future__ import annotations

QUESTIONS = {
    "a": ("(a) adapted vs from scratch", ["adapted_ul2", "scratch_ul2"]),
    "b": ("(b) bidirectional vs causal encoder", ["adapted_ul2", "causal_encoder_ul2"]),
    "c": ("(c) UL2 vs PrefixLM + KD", ["adapted_ul2", "adapted_prefixlm_kd"]),
    "d": (
        "(d) balanced vs unbalanced",
        ["adapted_ul2", "unbalanced_ul2", "unbalanced_warmup_ul2"],
    ),
}


def _fmt(x, digits=4) -> str:
    if isinstance(x, float):
        return "nan" if x != x else f"{x:.{digits}f}"
    return str(x)


def markdown(s: dict, pretrained: list[dict], arms: list[dict]) -> str:
    """The results tables as markdown."""
    lines = [
        "# T5Gemma findings at small scale (experiments.reproduce)",
        "",
        f"Seed {s['SEED']}. Equal compute: every arm runs {s['ADAPT_STEPS']} steps x batch "
        f"{s['ADAPT_BATCH']} x (inputs {s['INPUT_LENGTH']}, targets {s['TARGET_LENGTH']}) token "
        f"slots, AdamW, cosine learning rate {s['ADAPT_LR']} (warm-up {s['WARMUP_STEPS']}); "
        "'tokens' counts the real (non-padding) target tokens the arm trained on (UL2 batches "
        "are packed, PrefixLM + KD batches are not). FLOPs: training FLOPs per target slot x "
        "slots (the KD teacher's forward pass and a wider encoder cost more per step). Time: "
        "summed step times, compilation excluded, on a machine shared with other jobs.",
        "",
        "Validation losses are per-token cross-entropy (nats) of the final parameters on the "
        f"same {s['FINAL_EVAL_BATCHES']} validation batches of UL2 and of PrefixLM; 'best / "
        f"final (own)' is the curve on the arm's own objective, every {s['EVAL_EVERY']} steps. "
        f"Probe: frozen encoder, mean pooling, stdlib_code_search {s['PROBE_SPLIT']} split: "
        "retrieval nDCG@10 (docstring -> function among all functions, cosine, no training), "
        "pair accuracy (own function above a same-module hard negative, no training), and a "
        f"logistic-regression probe on pair features fitted on {s['PROBE_TRAIN_PAIRS']} "
        "train pairs.",
        "",
        "| arm | questions | init | objective | params | steps | tokens | FLOPs | time (s) "
        "| val UL2 | val PrefixLM | best / final (own) | nDCG@10 | pair acc | linear probe |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in arms:
        init = a["init"] + (f" ({a['note']})" if a.get("note") else "")
        lines.append(
            f"| {a['name']} | {a['questions']} | {init} | {a['objective']} | "
            f"{a['num_params']:,} | {a['steps']} | {a['tokens']:,} | {a['flops']:.3g} | "
            f"{a['step_time_s']:.0f} | {_fmt(a['val_ul2'])} | {_fmt(a['val_prefix_lm'])} | "
            f"{_fmt(a['best_val_loss'])} / {_fmt(a['final_val_loss'])} | "
            f"{_fmt(a.get('ndcg@10', float('nan')))} | "
            f"{_fmt(a.get('pair_accuracy', float('nan')))} | "
            f"{_fmt(a.get('linear_probe_accuracy', float('nan')))} |"
        )
    lines += [
        "",
        'Shared cost, the "released" decoder-only models (next-token prediction on stdlib_lm, '
        f"{s['PRETRAIN_STEPS']} steps x batch {s['PRETRAIN_BATCH']} x {s['PRETRAIN_LENGTH']} "
        f"tokens, learning rate {s['PRETRAIN_LR']}):",
        "",
        "| decoder | params | steps | tokens | FLOPs | time (s) | final train loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in pretrained:
        lines.append(
            f"| {p['preset']} | {p['num_params']:,} | {p['steps']} | {p['tokens']:,} | "
            f"{p['flops']:.3g} | {p['step_time_s']:.0f} | {_fmt(p['final_train_loss'])} |"
        )
    by_name = {a["name"]: a for a in arms}
    lines += [
        "",
        "Comparisons (validation loss on UL2, lower is better; nDCG@10 higher is better):",
        "",
    ]
    for title, names in QUESTIONS.values():
        parts = [
            f"{n} {_fmt(by_name[n]['val_ul2'])} / "
            f"nDCG {_fmt(by_name[n].get('ndcg@10', float('nan')), 3)}"
            for n in names
            if n in by_name
        ]
        lines.append(f"- {title}: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def plot(arms: list[dict], path_val: str, path_train: str) -> None:
    """Validation curves per question (2 x 2 panels) and training-loss curves of every arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {a["name"]: a for a in arms}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (title, names) in zip(axes.flat, QUESTIONS.values()):
        for n in names:
            if n in by_name and by_name[n]["curve"]:
                steps, losses = zip(*by_name[n]["curve"])
                ax.plot(steps, losses, marker="o", markersize=3, label=n)
        ax.set_title(title)
        ax.set_xlabel("adaptation step")
        ax.set_ylabel("validation loss (own objective)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path_val, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for a in arms:
        if a["train_curve"]:
            steps, losses = zip(*a["train_curve"])
            ax.plot(steps, losses, label=a["name"], linewidth=1)
    ax.set_xlabel("adaptation step")
    ax.set_ylabel("training loss (cross-entropy of the targets)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path_train, dpi=100)
    plt.close(fig)
