"""Whether chunking a site's heads keeps the attention kernel's bits, and the policy that decides.

Terms
- bitwise: every head of the chunked run is computed by the same arithmetic, in the same order, as
  in the unchunked run, so outputs are `torch.equal`.
- run-to-run: not bitwise, but the kernel is not deterministic from one run to the next on this
  device (it accumulates with atomics), and the chunked results stayed within the differences
  measured between two unchunked runs of the same kernel and dtype. Chunking is then as good as
  running the model again.
- rounding: the kernel is deterministic, but chunking changes an internal schedule and with it the
  rounding (a different reduction order). The results are equally accurate, not equal.
- verdict: `Exactness(grade, why)`; `why` names the kernel property the verdict rests on.
- policy: the grades a caller accepts. `exact=True` ("bitwise", the default) accepts bitwise only;
  `exact=False` ("run-to-run") also accepts run-to-run; "rounding" accepts every correct chunking.

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
2. CUDA flash forward splits the keys into `num_splits` parts when batch x heads x query blocks
   (of 64) would not fill most of the SMs, the split count chosen by an occupancy heuristic over
   twice the SM count (`_flash_splits`). The same head computed with another split count sums in
   another order, so a chunking is bitwise exactly when every chunk gets the split count of the
   whole call (checked on the H200 over random shapes: `benchmarks/gpu_exactness.py --flash-rule`).
3. CUDA memory-efficient and cuDNN forward were bitwise under chunking in every case measured
   (400 random shapes each, `docs/gpu_flash_rule_h200_torch2.11.json`).
4. CUDA backward kernels accumulate dK/dV with atomics and were not deterministic run to run in
   most shape classes (`docs/gpu_exactness_h200_torch2.11.json`, 5 runs each). A kernel's own
   variation is the largest difference between its reruns over the measured shape classes, per
   dtype. Chunked gradients stayed within it for cuDNN and memory-efficient in bf16 and fp16, and
   for flash where the forward's split-KV schedule is kept; memory-efficient fp32 exceeded it
   (1.27e-7 against 1.19e-7), and flash with a changed schedule by 8x. In deterministic mode the
   kernels do not vary, so chunking is then a rounding change.
   `sdpa` on CUDA picks its kernel at run time, so only "rounding" can be promised before lowering.

Symbolic sizes (a dynamic sequence length): one compiled artifact runs every length the shape
environment allows, so a chunking is graded by the worst length. Rules 1 and 2 read S, and each stops
changing once S is large enough (CPU flash: S_q >= 768 and S_kv >= 512; CUDA flash: the smallest
chunk fills the SMs). `judge` walks the symbol's values from its lowest (Dynamo's dynamic dims start
at 2; `mark_dynamic(x, dim, min=...)` raises that) up to that point and gives the worst grade of
those lengths, naming the first length that changes bits. Sizes must grow with the symbol (products,
sums and floor divisions of it). Two or more symbols among the sizes a rule reads are not walked:
that verdict is "rounding", except on CPU from 32 query tokens on, where no length changes bits. The
CPU rules read the batch only as batch x heads >= 2, which the smallest batch decides.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch.utils._sympy.functions import FloorDiv

from .symbolic import Size, free_symbols, hints, is_symbolic, size, value_range

BITWISE = "bitwise"
RUN_TO_RUN = "run-to-run"
ROUNDING = "rounding"
_POLICIES = {True: BITWISE, False: RUN_TO_RUN, BITWISE: BITWISE, RUN_TO_RUN: RUN_TO_RUN, ROUNDING: ROUNDING}
_ORDER = (BITWISE, RUN_TO_RUN, ROUNDING)  # from closest to the unchunked kernel
_ACCEPTS = {BITWISE: {BITWISE}, RUN_TO_RUN: {BITWISE, RUN_TO_RUN}, ROUNDING: {BITWISE, RUN_TO_RUN, ROUNDING}}


@dataclass(frozen=True)
class Exactness:
    grade: str
    why: str
    symbolic: bool = False  # graded over the values a symbolic size may take

    @property
    def bitwise(self) -> bool:
        return self.grade == BITWISE


def exactness_policy(exact: object) -> str:
    """The policy name for `exact` (True, False, "bitwise", "run-to-run" or "rounding")."""
    if isinstance(exact, (bool, str)) and exact in _POLICIES:
        return _POLICIES[exact]
    raise TypeError(f"exact must be True, False, {BITWISE!r}, {RUN_TO_RUN!r} or {ROUNDING!r}, got {exact!r}")


def accepts(policy: str, verdict: Exactness) -> bool:
    return verdict.grade in _ACCEPTS[policy]


def _cpu_flash(q: torch.Tensor, k: torch.Tensor, chunk_heads: tuple[int, ...], heads: int) -> Exactness:
    s_q, s_kv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    q_split = 256 if s_q >= 768 else 64 if s_q >= 192 else 32
    qs, kvs = min(s_q, q_split), min(s_kv, 512)
    scratch = qs * kvs + 2 * qs + qs * d
    if scratch % 16:
        return Exactness(ROUNDING, f"CPU flash scratch of {scratch} floats is not 64-byte aligned "
                                   f"(S_q={s_q}, S_kv={s_kv}, D={d}); threads see different alignments")
    if q.dtype in (torch.bfloat16, torch.float16) and d % 64 == 0 and s_kv >= 64:
        if min(heads, *chunk_heads) < 4 <= max(heads, *chunk_heads):
            return Exactness(ROUNDING, "CPU flash may pack K/V for >= 4 heads only; chunks straddle that")
    return Exactness(BITWISE, "CPU flash: per-head arithmetic does not depend on the head count")


def _cpu_flash_backward(q: torch.Tensor, chunk_heads: tuple[int, ...]) -> Exactness:
    batch = math.prod(q.shape[:-3])
    if batch * min(chunk_heads) < 2:
        return Exactness(ROUNDING, f"CPU flash backward with batch {batch} x {min(chunk_heads)} head(s) in a "
                                   "chunk runs outside a parallel region; its BLAS path may differ")
    return Exactness(BITWISE, "CPU flash backward: every chunk keeps >= 2 (batch, head) work items")


def _flash_splits(batch_heads_blocks: int, sm_slots: int, kv_blocks: int) -> int:
    """How many parts CUDA flash forward cuts the keys into: 1 when the (batch, head, query block)
    items nearly fill the SM slots; otherwise the fewest eligible parts whose wave efficiency is
    within 85% of the best (a part count is eligible when it changes the blocks per part)."""
    if batch_heads_blocks >= 0.8 * sm_slots:
        return 1
    limit = min(128, sm_slots, kv_blocks)

    def per_part(parts: int) -> int:
        return -(-kv_blocks // parts)

    eligible = [n for n in range(1, limit + 1) if n == 1 or per_part(n) != per_part(n - 1)]

    def efficiency(parts: int) -> float:
        waves = batch_heads_blocks * parts / sm_slots
        return waves / math.ceil(waves)

    best = max(efficiency(n) for n in eligible)
    return next(n for n in eligible if efficiency(n) >= 0.85 * best)


def _cuda_flash(q: torch.Tensor, k: torch.Tensor, chunk_heads: tuple[int, ...], heads: int) -> Exactness:
    # ATen flash takes [B, H, S, D] at the op boundary; the kernel sees the same B, H, S and D
    batch, s_q, s_kv, d = math.prod(q.shape[:-3]), q.shape[-2], k.shape[-2], q.shape[-1]
    if s_q == 1:
        return Exactness(ROUNDING, "CUDA flash with one query token regroups heads internally")
    try:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    except (AssertionError, RuntimeError) as err:
        return Exactness(ROUNDING, f"CUDA flash: the SM count is needed to predict its split-KV choice ({err})")
    block_n = 256 if d <= 64 else 128 if d <= 128 else 64
    kv_blocks, q_blocks = -(-s_kv // block_n), -(-s_q // 64)

    def splits(h: int) -> int:
        return _flash_splits(batch * h * q_blocks, 2 * sms, kv_blocks)

    whole = splits(heads)
    parts = {size: splits(size) for size in set(chunk_heads)}
    if any(n != whole for n in parts.values()):
        return Exactness(ROUNDING, f"CUDA flash splits the keys into {whole} part(s) for {heads} heads but "
                                   f"{parts} for the chunks ({sms} SMs); the sums run in another order")
    return Exactness(BITWISE, f"CUDA flash: every chunk keeps the whole call's split-KV schedule ({whole})")


def _cuda_backward(kernel: str, q: torch.Tensor, forward: Exactness) -> Exactness:
    if torch.are_deterministic_algorithms_enabled():
        return Exactness(ROUNDING, f"CUDA {kernel} backward in deterministic mode: chunking reorders its dK/dV sums")
    if q.dtype not in (torch.bfloat16, torch.float16):
        return Exactness(ROUNDING, f"CUDA {kernel} backward in {q.dtype}: chunked gradients exceeded the kernel's "
                                   "own run-to-run variation (measured)")
    if not forward.bitwise:
        return Exactness(ROUNDING, f"CUDA {kernel} backward: {forward.why}")
    return Exactness(RUN_TO_RUN, f"CUDA {kernel} backward accumulates with atomics: not deterministic run to run, "
                                 "and chunked gradients stayed within that variation (measured)")


_CUDA_FORWARD_BITWISE = {
    "efficient": "CUDA memory-efficient attention forward: bitwise under head chunking (measured)",
    "cudnn": "cuDNN attention forward: bitwise under head chunking (measured)",
}


def judge(kernel: str, q: torch.Tensor, k: torch.Tensor, chunk_heads: tuple[int, ...],
          backward: bool = False) -> Exactness:
    """The verdict for running `kernel` on head chunks of sizes `chunk_heads` instead of all heads,
    for every value of the sizes when some are symbolic."""
    if any(is_symbolic(n) for n in (*q.shape, *k.shape)):
        return _judge_symbolic(kernel, q, k, chunk_heads, backward)
    return _judge(kernel, q, k, chunk_heads, backward)


@dataclass(frozen=True)
class _Sizes:
    """What the rules read of q or k, at one value of the symbols."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


MAX_WALK = 20_000  # values of a symbol walked before giving up ("rounding")


def _judge_symbolic(kernel: str, q: Any, k: Any, chunk_heads: tuple[int, ...], backward: bool) -> Exactness:
    device = q.device.type
    q_shape, k_shape = [size(n) for n in q.shape], [size(n) for n in k.shape]
    batch = size(math.prod(q_shape[:-3]))
    rank = len(q_shape)
    saturated = _saturation(kernel, device, q, chunk_heads, backward)
    if saturated is None:  # the rule does not read the sizes
        return _judge(kernel, _Sizes(hints(q_shape), q.dtype, q.device), _Sizes(hints(k_shape), k.dtype, k.device),
                      chunk_heads, backward)
    if device == "cpu":
        # batch x heads >= 2 is the only use of the batch: its smallest value decides
        lead = [value_range(batch)[0]] if rank > 3 else []
        q_shape = lead + q_shape[-3:]
        k_shape = lead + k_shape[-3:]
    reads = [*q_shape, *k_shape]
    symbols = free_symbols(reads)
    if not symbols:
        return _judge(kernel, _at(q, q_shape, {}), _at(k, k_shape, {}), chunk_heads, backward)
    if device == "cpu" and not backward and value_range(q_shape[-2])[0] >= 32 and not is_symbolic(q_shape[-1]):
        # from 32 query tokens on the scratch is aligned whatever S_kv is; S_kv then only decides
        # whether half precision may take the packed path (S_kv >= 64): try both sides of it
        low_kv, high_kv = value_range(k_shape[-2])
        verdicts = []
        for s_kv in {low_kv, int(min(high_kv, max(low_kv, 64)))}:
            qv = _Sizes((*hints(q_shape[:-2]), value_range(q_shape[-2])[0], q_shape[-1]), q.dtype, q.device)
            kv = _Sizes((*hints(k_shape[:-2]), s_kv, q_shape[-1]), k.dtype, k.device)
            verdicts.append(_judge(kernel, qv, kv, chunk_heads, backward))
        worst = next((v for v in verdicts if not v.bitwise), verdicts[0])
        return Exactness(worst.grade, f"{worst.why}, for every S_q >= 32 and S_kv this dynamic artifact accepts",
                         symbolic=True)
    if len(symbols) > 1:
        names = ", ".join(sorted(map(str, symbols)))
        return Exactness(ROUNDING, f"{kernel} chunking reads sizes of several symbols ({names}); bits are checked "
                                   "for one dynamic size at a time", symbolic=True)
    (symbol,) = symbols
    exprs = [n.node.expr for n in reads if is_symbolic(n)]
    if not all(_grows(e) for e in exprs):
        return Exactness(ROUNDING, f"{kernel} chunking: sizes {exprs} do not grow with {symbol}, so the lengths "
                                   "that keep bits cannot be walked", symbolic=True)
    low, high = _symbol_range(symbol, next(n for n in reads if is_symbolic(n)))
    span = f"{symbol} in {low}.." + ("" if high == math.inf else str(high))
    worst, where, value = None, "", low
    for _ in range(MAX_WALK):
        at = {symbol: value}
        qv, kv = _at(q, q_shape, at), _at(k, k_shape, at)
        verdict = _judge(kernel, qv, kv, chunk_heads, backward)
        if worst is None or _ORDER.index(verdict.grade) > _ORDER.index(worst.grade):
            worst, where = verdict, f"{symbol}={value} (S_q={qv.shape[-2]}, S_kv={kv.shape[-2]})"
        if worst.grade == ROUNDING or saturated(qv, kv) or value + 1 > high:
            break
        value += 1
    else:
        return Exactness(ROUNDING, f"{kernel} chunking: walked {MAX_WALK} values of {symbol} from {low} without "
                                   "reaching lengths where bits stop depending on it", symbolic=True)
    if worst.grade == ROUNDING:
        return Exactness(ROUNDING, f"{worst.why}, at {where}, which this dynamic artifact accepts ({symbol} >= {low}); "
                                   "raise the dim's minimum with torch._dynamo.mark_dynamic(x, dim, min=...)",
                         symbolic=True)
    return Exactness(worst.grade, f"{worst.why}, for every {span} (checked to {value})", symbolic=True)


def _symbol_range(symbol: sympy.Symbol, carrier: Any) -> tuple[int, float]:
    bounds = carrier.node.shape_env.bound_sympy(symbol)
    return int(bounds.lower), (int(bounds.upper) if isinstance(bounds.upper, sympy.Integer) else math.inf)


def _at(t: Any, shape: list[Size], values: dict[sympy.Symbol, int]) -> _Sizes:
    concrete = tuple(int(n.node.expr.subs(values)) if is_symbolic(n) else int(n) for n in shape)
    return _Sizes(concrete, t.dtype, t.device)


def _grows(expr: sympy.Expr) -> bool:
    """Whether `expr` never decreases as its symbols grow (positive sizes): products, sums and
    floor divisions by positive constants of symbols and positive integers."""
    if expr.is_Symbol or (expr.is_Integer and expr > 0):
        return True
    if isinstance(expr, (sympy.Mul, sympy.Add)):
        return all(_grows(arg) for arg in expr.args)
    if isinstance(expr, FloorDiv):
        return _grows(expr.args[0]) and expr.args[1].is_Integer and expr.args[1] > 0
    return False


def _saturation(kernel: str, device: str, q: Any, chunk_heads: tuple[int, ...], backward: bool
                ) -> Callable[[_Sizes, _Sizes], bool] | None:
    """From which sizes on the verdict cannot change any more as S grows; None when the rule never
    reads S."""
    if device == "cpu" and kernel in ("flash_cpu", "sdpa"):
        if backward:
            return lambda qv, kv: True  # reads only the batch, already at its smallest
        return lambda qv, kv: qv.shape[-2] >= 768 and kv.shape[-2] >= 512
    if device == "cuda" and kernel == "flash":
        try:
            slots = 2 * torch.cuda.get_device_properties(q.device).multi_processor_count
        except (AssertionError, RuntimeError):
            return lambda qv, kv: True  # the verdict is "rounding" whatever S is
        smallest = min(chunk_heads)
        return lambda qv, kv: math.prod(qv.shape[:-3]) * smallest * -(-qv.shape[-2] // 64) >= 0.8 * slots
    return None


def _judge(kernel: str, q: Any, k: Any, chunk_heads: tuple[int, ...], backward: bool = False) -> Exactness:
    heads = sum(chunk_heads)
    device = q.device.type
    if device == "cpu" and kernel in ("flash_cpu", "sdpa"):
        return _cpu_flash_backward(q, chunk_heads) if backward else _cpu_flash(q, k, chunk_heads, heads)
    if device == "cuda" and kernel in ("flash", "efficient", "cudnn"):
        forward = _cuda_flash(q, k, chunk_heads, heads) if kernel == "flash" else Exactness(
            BITWISE, _CUDA_FORWARD_BITWISE[kernel])
        return _cuda_backward(kernel, q, forward) if backward else forward
    if kernel == "sdpa":
        return Exactness(ROUNDING, f"sdpa on {device} picks its kernel at run time")
    return Exactness(ROUNDING, f"{kernel}{' backward' if backward else ''} on {device}: bitwise under head "
                               "chunking not established")
