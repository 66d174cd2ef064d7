"""Compile time of a many-block Ulysses transformer with and without HCMS, and the pass's own share.

Compiles `hcms_compile.models.UlyssesTransformer` (Wan2.2-like heads by default: 40 heads of 128,
40 blocks) for one training step, once with the inner compiler alone and once per HCMS chunk spec,
each in a fresh process with Inductor's caches off, so every run compiles from scratch and none
inherits another's warm in-process state. The time inside the HCMS rewrite
(`rewrite_graph`, forward and backward graphs) is measured by wrapping it. Runs on one GPU with NCCL
at world size 1, or on CPU with gloo:

    python benchmarks/compile_overhead.py --blocks 40 --chunks 2 auto --out overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import hcms_compile
from hcms_compile import api, backend
from hcms_compile.models import UlyssesConfig, UlyssesTransformer


def _compile_once(model, x, make) -> tuple[float, float, int]:
    """Seconds for the first training step (compile included), seconds in the pass, sites rewritten."""
    spent = [0.0]
    original = api.rewrite_graph

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    backend.rewrite_graph = timed  # the backend calls it through its own import
    try:
        torch._dynamo.reset()
        compiled_backend = make()
        compiled = torch.compile(model, backend=compiled_backend)
        start = time.perf_counter()
        compiled(x).sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        total = time.perf_counter() - start
    finally:
        backend.rewrite_graph = original
    rewritten = sum(s.rewritten for r in getattr(compiled_backend, "reports", []) for s in r.sites)
    return total, spent[0], rewritten


def _one(args: argparse.Namespace) -> dict:
    cuda = torch.cuda.is_available()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = UlyssesConfig(heads=args.heads, head_dim=args.head_dim, blocks=args.blocks)
    model = UlyssesTransformer(cfg, dist.group.WORLD).to(device, dtype)
    x = torch.randn(1, args.tokens, cfg.hidden, device=device, dtype=dtype)
    if args.one == "inductor":
        make = lambda: "inductor"  # noqa: E731
    else:
        make = lambda: hcms_compile.make_backend(chunks=args.one if args.one == "auto" else int(args.one))  # noqa: E731
    total, in_pass, rewritten = _compile_once(model, x, make)
    dist.destroy_process_group()
    return {"run": "inductor" if args.one == "inductor" else f"hcms chunks={args.one}", "first_step_s": total,
            "in_pass_s": in_pass, "sites_rewritten": rewritten,
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--chunks", nargs="+", default=["2", "auto"])
    parser.add_argument("--out", type=Path, default=Path("compile_overhead.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run in this process
    parser.add_argument("--port", type=int, default=29512, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(_one(args)), flush=True)
        return
    rows = []
    shape = ["--blocks", str(args.blocks), "--heads", str(args.heads), "--head-dim", str(args.head_dim),
             "--tokens", str(args.tokens)]
    for i, run in enumerate(["inductor", *args.chunks]):
        done = subprocess.run([sys.executable, __file__, *shape, "--one", run, "--port", str(args.port + i)],
                              capture_output=True, text=True, check=True)
        row = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "blocks": args.blocks, "heads": args.heads,
                                    "head_dim": args.head_dim, "tokens": args.tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
