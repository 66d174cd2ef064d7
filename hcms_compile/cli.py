"""The `hcms` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .passes.plan import ChunkSpec, chunk_sizes, parse_chunks, validate_chunks
from .testing.layouts import LAYOUTS


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(float(p)) for p in text.split(",") if p)


def _chunks(text: str) -> ChunkSpec:
    """--chunks: checked here, before any rank is spawned."""
    try:
        return validate_chunks(parse_chunks(text))
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, a count >= 1 like 3, or local heads per chunk "
                                         f"like 2+1 ({err})") from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hcms", description="HCMS: pipeline Ulysses all-to-all with attention")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="rewrite a Ulysses transformer on CPU ranks and check it bit for bit")
    demo.add_argument("--ranks", type=_positive, default=4)
    demo.add_argument("--blocks", type=_positive, default=4)
    demo.add_argument("--heads", type=_positive, default=12, help="global heads (divisible by --ranks)")
    demo.add_argument("--head-dim", type=_positive, default=32)
    demo.add_argument("--tokens-per-rank", type=_positive, default=64)
    demo.add_argument("--chunks", type=_chunks, default=2,
                      help="auto, a count, or local heads per chunk: 2+1; 1 is the plain site with q, k and v "
                           "in one exchange (default 2: the demo is about showing the pipeline)")
    demo.add_argument("--layout", choices=[n for n, lay in LAYOUTS.items() if lay.functional], default="funcol")
    demo.add_argument("--causal", action="store_true")
    demo.add_argument("--repeats", type=_positive, default=5)
    demo.add_argument("--batch", type=_positive, default=2)
    demo.add_argument("--inner", choices=["inductor", "aot_eager"], default="inductor",
                      help="the compiler HCMS hands the rewritten graphs to")
    calibrate = sub.add_parser("calibrate", help="measure this machine's device profile on every rank and save it")
    calibrate.add_argument("--ranks", type=_positive, default=2, help="CPU ranks to spawn when not under torchrun")
    calibrate.add_argument("--sizes", type=_sizes, default=None, help="all-to-all buffer bytes per rank: 1e6,1e7")
    calibrate.add_argument("--repeats", type=_positive, default=5)
    calibrate.add_argument("--attention-tokens", type=int, default=None)
    calibrate.add_argument("--interconnect", choices=["nvlink", "pcie", "ib"], default=None)
    calibrate.add_argument("--backend", default=None, help="process group backend under torchrun")
    calibrate.add_argument("--out", default=None, help="where to save (default: where the backend looks)")
    from .bench import HELP as BENCH_HELP
    from .bench import add_bench_arguments, run_bench_command

    add_bench_arguments(sub.add_parser("bench", help=BENCH_HELP))
    args = parser.parse_args(argv)
    if args.command == "calibrate":
        from .calibrate import CalibrateArgs, main_calibrate

        main_calibrate(CalibrateArgs(ranks=args.ranks, sizes=args.sizes, repeats=args.repeats,
                                     attention_tokens=args.attention_tokens, interconnect=args.interconnect,
                                     backend=args.backend, out=args.out))
        return 0
    if args.command == "bench":
        return run_bench_command(args)

    if args.command == "demo":
        from .demo import DemoArgs, run_demo
        from .models import UlyssesConfig

        if args.heads % args.ranks:
            parser.error(f"--heads {args.heads} is not divisible by --ranks {args.ranks}")
        local = args.heads // args.ranks
        one = args.chunks == 1 or (isinstance(args.chunks, tuple) and args.chunks == (local,))
        if args.chunks != "auto" and not one and isinstance(chunk_sizes(local, args.chunks), str):
            parser.error(f"--chunks {args.chunks}: {chunk_sizes(local, args.chunks)} ({args.heads} heads over "
                         f"{args.ranks} ranks)")
        cfg = UlyssesConfig(heads=args.heads, head_dim=args.head_dim, blocks=args.blocks, layout=args.layout,
                            causal=args.causal)
        return run_demo(DemoArgs(ranks=args.ranks, batch=args.batch, tokens_per_rank=args.tokens_per_rank,
                                 chunks=args.chunks, repeats=args.repeats, inner=args.inner, config=cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
