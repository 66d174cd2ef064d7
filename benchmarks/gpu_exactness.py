"""Measure which CUDA attention kernels keep their bits when the heads are split into chunks.

For each (kernel, dtype, causal, shape class) it compares SDPA over all heads with SDPA over head
chunks concatenated, forward and backward, with `torch.equal`. It also runs the full problem
several times, to see whether the kernel is deterministic run to run and by how much it varies,
and repeats the backward with `torch.use_deterministic_algorithms(True)`. It writes JSON:

    python benchmarks/gpu_exactness.py --out /tmp/exactness.json

`--flash-rule N` instead draws N random shapes and checks the pass's own verdict
(`hcms_compile.passes.exactness.judge`) against what flash, memory-efficient and cuDNN forward do.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from hcms_compile.passes.exactness import judge
from torch.nn.attention import SDPBackend, sdpa_kernel

KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
           "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
# (name, batch, heads, seq, head_dim, chunk sizes): small grids are where split-KV heuristics bite
SHAPES = [
    ("small 5h x 4096, 3+2", 1, 5, 4096, 128, (3, 2)),
    ("small 10h x 1000, 5+5", 1, 10, 1000, 64, (5, 5)),
    ("medium 2x8h x 2048, 4+4", 2, 8, 2048, 64, (4, 4)),
    ("uneven 10h x 8192, 7+3", 1, 10, 8192, 128, (7, 3)),
    ("large 40h x 8192, 20+20", 1, 40, 8192, 128, (20, 20)),
]


def _attend(kernel, q, k, v, causal):
    with sdpa_kernel([KERNELS[kernel]]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _grads(kernel, q, k, v, g, causal):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = _attend(kernel, q, k, v, causal)
    out.backward(g)
    return out.detach(), [t.grad for t in (q, k, v)]


def _chunked(kernel, q, k, v, g, causal, sizes):
    outs, grads, start = [], [[], [], []], 0
    for size in sizes:
        sl = slice(start, start + size)
        o, gr = _grads(kernel, q[:, sl], k[:, sl], v[:, sl], g[:, sl], causal)
        outs.append(o)
        for i in range(3):
            grads[i].append(gr[i])
        start += size
    return torch.cat(outs, 1), [torch.cat(x, 1) for x in grads]


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _max_diff(a, b) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b, strict=True))


RERUNS = 5


def measure(kernel: str, dtype: torch.dtype, causal: bool, shape: tuple) -> dict | None:
    name, b, h, s, d, sizes = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    # [B, S, H, D] memory, as Ulysses receive buffers are, viewed as [B, H, S, D]
    q, k, v, g = (torch.randn(b, s, h, d, device="cuda", generator=gen, dtype=dtype).transpose(1, 2)
                  for _ in range(4))
    try:
        torch.use_deterministic_algorithms(False)
        out, grads = _grads(kernel, q, k, v, g, causal)
        reruns = [_grads(kernel, q, k, v, g, causal) for _ in range(RERUNS - 1)]
        out2, grads2 = reruns[0]
        c_out, c_grads = _chunked(kernel, q, k, v, g, causal, sizes)
        torch.use_deterministic_algorithms(True, warn_only=True)
        d_out, d_grads = _grads(kernel, q, k, v, g, causal)
        dc_out, dc_grads = _chunked(kernel, q, k, v, g, causal, sizes)
    except RuntimeError as err:
        return {"kernel": kernel, "dtype": str(dtype), "causal": causal, "shape": name, "error": str(err)[:120]}
    finally:
        torch.use_deterministic_algorithms(False)
    return {
        "kernel": kernel, "dtype": str(dtype).replace("torch.", ""), "causal": causal, "shape": name,
        "fwd_chunked_bitwise": torch.equal(out, c_out),
        "fwd_run_to_run": torch.equal(out, out2),
        "bwd_chunked_bitwise": _equal(grads, c_grads),
        "bwd_run_to_run": _equal(grads, grads2),
        "bwd_chunked_bitwise_deterministic_mode": _equal(d_grads, dc_grads),
        "fwd_max_diff": float((out.float() - c_out.float()).abs().max()),
        "bwd_max_diff": _max_diff(grads, c_grads),
        # the largest difference between the first run and any of the reruns: the kernel's own variation
        "bwd_run_to_run_max_diff": max(_max_diff(grads, r[1]) for r in reruns),
        "fwd_run_to_run_max_diff": max(_max_diff([out], [r[0]]) for r in reruns),
    }


def check_rule(samples: int, seed: int) -> dict:
    """Random shapes: does `judge` predict which forward chunkings are bitwise?"""
    rng = random.Random(seed)
    counts: dict[str, dict[str, int]] = {}
    for _ in range(samples):
        b, h = rng.choice([1, 1, 2, 4]), rng.randint(2, 48)
        s, d = rng.choice([rng.randint(64, 4096), rng.randint(4096, 20000)]), rng.choice([64, 128])
        cuts = sorted(rng.sample(range(1, h), rng.randint(1, min(3, h - 1))))
        sizes = tuple(y - x for x, y in zip([0, *cuts], [*cuts, h], strict=True))
        causal = rng.random() < 0.5
        gen = torch.Generator(device="cuda").manual_seed(rng.randrange(2**31))
        q, k, v = (torch.randn(b, s, h, d, device="cuda", generator=gen, dtype=torch.bfloat16).transpose(1, 2)
                   for _ in range(3))
        for kernel in ("flash", "efficient", "cudnn"):
            with torch.no_grad():
                whole = _attend(kernel, q, k, v, causal)
                parts, start = [], 0
                for size in sizes:
                    parts.append(_attend(kernel, q[:, start:start + size], k[:, start:start + size],
                                         v[:, start:start + size], causal))
                    start += size
            seen = torch.equal(whole, torch.cat(parts, 1))
            said = judge(kernel, q, k, sizes).bitwise
            tally = counts.setdefault(kernel, {"predicted bitwise, was": 0, "predicted bitwise, was not": 0,
                                               "predicted not, was": 0, "predicted not, was not": 0})
            tally[f"predicted {'bitwise' if said else 'not'}, {'was' if seen else 'was not'}"] += 1
            if said and not seen:
                print("WRONG", kernel, dict(b=b, h=h, s=s, d=d, sizes=sizes, causal=causal), flush=True)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("exactness.json"))
    parser.add_argument("--flash-rule", type=int, default=0, metavar="N",
                        help="check the pass's forward verdicts on N random shapes instead")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.flash_rule:
        counts = check_rule(args.flash_rule, args.seed)
        print(json.dumps(counts, indent=1))
        args.out.write_text(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                                        "samples": args.flash_rule, "seed": args.seed, "counts": counts}, indent=1))
        return
    rows = []
    for kernel in KERNELS:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for causal in (False, True):
                for shape in SHAPES:
                    row = measure(kernel, dtype, causal, shape)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
