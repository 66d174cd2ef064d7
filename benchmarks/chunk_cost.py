"""What cutting attention into head chunks costs the attention kernel itself, on one GPU.

For each sequence length S and world size P (a rank's H/P local heads of a Wan2.2-like attention:
H=40, D=128, bf16), times SDPA over all local heads against the same heads in C chunks run one after
another (no communication at all), forward and forward+backward. The ratio chunked / whole is the
compute price HCMS pays before any overlap; the medians use CUDA events over `--repeats` runs.

    python benchmarks/chunk_cost.py --seq 16384 32768 56000 75600 --world 2 4 8 --chunks 2 4 8 --out cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from hcms_compile.passes.plan import even_split


def _time(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _step(q, k, v, g, sizes, backward: bool):
    def run():
        start = 0
        for size in sizes:
            part = [t[:, start:start + size] for t in (q, k, v)]
            if backward:
                part = [t.detach().requires_grad_() for t in part]
            out = F.scaled_dot_product_attention(*part)
            if backward:
                out.backward(g[:, start:start + size])
            start += size
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[16384, 32768, 56000, 75600])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--chunks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("chunk_cost.json"))
    args = parser.parse_args()
    rows = []
    for seq in args.seq:
        for world in args.world:
            local = args.heads // world
            # Ulysses receive buffers are [B, S, H/P, D] in memory, viewed as [B, H/P, S, D]
            q, k, v, g = (torch.randn(1, seq, local, args.head_dim, device="cuda", dtype=torch.bfloat16)
                          .transpose(1, 2) for _ in range(4))
            for backward in (False, True):
                whole = _time(_step(q, k, v, g, (local,), backward), args.repeats)
                for chunks in args.chunks:
                    if chunks > local:
                        continue
                    sizes = even_split(local, chunks)
                    chunked = _time(_step(q, k, v, g, sizes, backward), args.repeats)
                    row = {"seq": seq, "world": world, "local_heads": local, "chunks": chunks,
                           "sizes": list(sizes), "pass": "fwd+bwd" if backward else "fwd",
                           "whole_ms": whole, "chunked_ms": chunked, "ratio": chunked / whole}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            del q, k, v, g
            torch.cuda.empty_cache()
    args.out.write_text(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                                    "repeats": args.repeats, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
