"""`encdec-adapt adapt`: decoder-only params checkpoint(s) -> an encoder-decoder checkpoint.

    encdec-adapt adapt --preset t5gemma_2b_2b --encoder ckpt/gemma2_2b --output ckpt/t5gemma

The warm start is models/warm_start.py's; errors (a checkpoint that does not fit, a bad preset,
an existing output) are errors.EncdecError: exit 2 from the dispatcher.
"""

from __future__ import annotations

from encdec_adapt.cli import args as args_lib


def adapt_main(argv: list[str]) -> int:
    p = args_lib.parser(
        "adapt",
        "Warm-start a T5Gemma-style encoder-decoder from decoder-only params checkpoints "
        "(import-hf output) and write it as a params checkpoint, ready for `train` "
        "(warm_start_from) or `export-hf`.",
    )
    p.add_argument("--preset", required=True, help="models/ preset, e.g. t5gemma_2b_2b")
    p.add_argument("--encoder", required=True, help="decoder-only checkpoint for the encoder")
    p.add_argument("--decoder", help="decoder-only checkpoint for the decoder (default: --encoder)")
    p.add_argument("--output", required=True)
    p.add_argument("--cross_attention", choices=["auto", "copy", "random"], default="auto")
    p.add_argument("--zero_cross_output", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)

    from encdec_adapt.models.warm_start import WarmStart
    from encdec_adapt.nn.config import load_encdec_preset
    from encdec_adapt.nn.encdec import MODEL_TYPE
    from encdec_adapt.storage import outputs, params_io

    cfg = load_encdec_preset(args.preset)
    outputs.check_not_input(args.output, args.encoder, args.decoder)
    params_io.check_writable(args.output, args.overwrite)
    params = WarmStart(
        encoder_checkpoint=args.encoder,
        decoder_checkpoint=args.decoder,
        cross_attention=args.cross_attention,
        zero_cross_output=args.zero_cross_output,
        seed=args.seed,
    )(cfg)
    params_io.save(args.output, params, MODEL_TYPE, cfg.to_dict(), overwrite=args.overwrite)
    print(f"adapt: wrote {args.preset} encoder-decoder checkpoint to {args.output}")
    return 0
