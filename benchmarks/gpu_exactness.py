"""Measure which CUDA attention kernels keep their bits when the heads are split into chunks.

For each (kernel, dtype, causal, shape class) it compares SDPA over all heads with SDPA over head
chunks concatenated, forward and backward, with `torch.equal`. It also runs the full problem twice,
to see whether the kernel is deterministic run to run, and repeats the backward with
`torch.use_deterministic_algorithms(True)`. It prints a table and writes JSON:

    python benchmarks/gpu_exactness.py --out /tmp/exactness.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
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


def measure(kernel: str, dtype: torch.dtype, causal: bool, shape: tuple) -> dict | None:
    name, b, h, s, d, sizes = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    # [B, S, H, D] memory, as Ulysses receive buffers are, viewed as [B, H, S, D]
    q, k, v, g = (torch.randn(b, s, h, d, device="cuda", generator=gen, dtype=dtype).transpose(1, 2)
                  for _ in range(4))
    try:
        torch.use_deterministic_algorithms(False)
        out, grads = _grads(kernel, q, k, v, g, causal)
        out2, grads2 = _grads(kernel, q, k, v, g, causal)
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
        "bwd_max_diff": max(float((a.float() - c.float()).abs().max()) for a, c in zip(grads, c_grads, strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("exactness.json"))
    args = parser.parse_args()
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
