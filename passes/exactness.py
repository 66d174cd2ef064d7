"""Whether chunking a site's heads keeps the attention kernel's bits.

Terms
- bitwise: every head of the chunked run is computed by the same arithmetic, in the same order, as
  in the unchunked run, so outputs are `torch.equal`.
- verdict: `Exactness(bitwise, why)`; `why` names the kernel property the verdict rests on.

Heads are independent in every SDPA kernel, but a kernel's internal choices can depend on the
number of heads, and then chunking changes the arithmetic:
1. CPU flash (`_scaled_dot_product_flash_attention_for_cpu`, and `sdpa` on CPU): each thread owns
   a float scratch area of `qs*kvs + 2*qs + qs*D` elements, with qs = min(S_q, 32|64|256) and
   kvs = min(S_kv, 512). When that size is not a multiple of 16 floats (64 bytes), a thread's
   scratch alignment depends on its index, and which thread computes a head depends on how many
   heads the call has: measured here, such shapes (only S_q < 32 can produce them) change bits
   under chunking. In half precision with D % 64 == 0 and S_kv >= 64 the kernel may also switch
   to a packed path whose choice depends on the head count.
   CPU flash backward parallelises over batch x heads only; a call with a single (batch, head)
   item runs outside a parallel region, where the BLAS calls may take another path: measured here,
   chunkings with batch x heads-per-chunk >= 2 were bitwise in 404 of 404 random cases, and the
   others not always.
2. CUDA kernels: see BACKGROUND.md; forward efficient and cuDNN attention were bitwise in every
   case measured; flash picks a split-KV schedule from batch x heads x blocks against the SM count.
   `sdpa` on CUDA picks its kernel at run time, so no verdict is possible before lowering.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Exactness:
    bitwise: bool
    why: str


def _cpu_flash(q: torch.Tensor, k: torch.Tensor, chunk_heads: tuple[int, ...], heads: int) -> Exactness:
    s_q, s_kv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    q_split = 256 if s_q >= 768 else 64 if s_q >= 192 else 32
    qs, kvs = min(s_q, q_split), min(s_kv, 512)
    scratch = qs * kvs + 2 * qs + qs * d
    if scratch % 16:
        return Exactness(False, f"CPU flash scratch of {scratch} floats is not 64-byte aligned "
                                f"(S_q={s_q}, S_kv={s_kv}, D={d}); threads see different alignments")
    if q.dtype in (torch.bfloat16, torch.float16) and d % 64 == 0 and s_kv >= 64:
        if min(heads, *chunk_heads) < 4 <= max(heads, *chunk_heads):
            return Exactness(False, "CPU flash may pack K/V for >= 4 heads only; chunks straddle that")
    return Exactness(True, "CPU flash: per-head arithmetic does not depend on the head count")


_CUDA_BITWISE = {
    "efficient": "CUDA memory-efficient attention forward: bitwise under head chunking (measured)",
    "cudnn": "cuDNN attention forward: bitwise under head chunking (measured)",
}


def _cpu_flash_backward(q: torch.Tensor, chunk_heads: tuple[int, ...]) -> Exactness:
    batch = math.prod(q.shape[:-3])
    if batch * min(chunk_heads) < 2:
        return Exactness(False, f"CPU flash backward with batch {batch} x {min(chunk_heads)} head(s) in a chunk "
                                "runs outside a parallel region; its BLAS path may differ")
    return Exactness(True, "CPU flash backward: every chunk keeps >= 2 (batch, head) work items")


def judge(kernel: str, q: torch.Tensor, k: torch.Tensor, chunk_heads: tuple[int, ...],
          backward: bool = False) -> Exactness:
    """The verdict for running `kernel` on head chunks of sizes `chunk_heads` instead of all heads."""
    heads = sum(chunk_heads)
    if q.device.type == "cpu" and kernel in ("flash_cpu", "sdpa"):
        return _cpu_flash_backward(q, chunk_heads) if backward else _cpu_flash(q, k, chunk_heads, heads)
    if backward:
        return Exactness(False, f"{kernel} backward on {q.device.type}: bitwise under chunking not established")
    if q.device.type == "cuda" and kernel in _CUDA_BITWISE:
        return Exactness(True, _CUDA_BITWISE[kernel])
    if kernel == "sdpa":
        return Exactness(False, f"sdpa on {q.device.type} picks its kernel at run time")
    return Exactness(False, f"{kernel} on {q.device.type}: bitwise under head chunking not established")
