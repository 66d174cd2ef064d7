"""`hcms bench`: time Ulysses attention plainly, compiled, through HCMS and as ring attention.

Two targets, each at every global sequence length of `--seq`:

- `layer`: one Ulysses attention layer (the funcol layout of `hcms_compile.testing.layouts`: q, k, v
  scatter all-to-alls -> SDPA on [B, H/P, S, D] -> output all-to-all);
- `block`: one `hcms_compile.models.UlyssesBlock` (norm, qkv projection, that layer, projection, MLP).

Each mode is one row:

- `comm-only`: the layer's exchanges alone, with the same shapes (q, k, v in, then out back; for
  `--backward` also the output gradient in and dq, dk, dv back), each part timed on its own;
- `attention-only`: SDPA alone on the local shape (H/P heads, full S), forward and backward timed apart;
- `eager`: the Ulysses module, not compiled;
- `compiled`: `torch.compile` with the inner compiler (Inductor) and no HCMS, the baseline;
- `hcms-C`, `hcms-auto`: `torch.compile` with `make_backend(chunks=C)` or `chunks="auto"` (the exchange
  kind chosen by "auto"); `hcms-C-nccl`, `hcms-C-ce`: the same over the group's all-to-all or the
  copy-engine exchange (`exchange="nccl"` or `"copy-engine"`);
- `ring`: PyTorch's ring attention (`context_parallel` over a DeviceMesh), eager, where its CUDA
  kernels exist.

Timing: a mode is built and compiled once (its first call is reported as `compile_s`), warmed up,
then run for `repeats` steps. Each step starts after a barrier and a CUDA synchronize and ends with
a synchronize; a step's time is the slowest rank's (all_reduce MAX). Rows report the median, the
minimum and the maximum. Speed-up is the `compiled` median over the mode's median, marked "within
noise" where the two medians differ by less than the larger spread (max - min) of the two rows. Overlap
efficiency is `overlap_efficiency` on the `comm-only` and `attention-only` parts, printed only inside
[0, 1] and outside the noise; elsewhere "n/a" with the reason (slower than plain, within noise, ...).

Runs under torchrun (NCCL on cuda:LOCAL_RANK, or gloo without CUDA) or, without a torchrun
environment, spawns `--ranks` gloo processes on the CPU. Every rank walks targets, sequence lengths
and modes in the same order and agrees on failures before running a step, so collectives match.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tabulate import tabulate
from torch import Tensor, nn

from . import __version__, bench_plot
from .backend import HcmsBackend, make_backend
from .models import UlyssesBlock, UlyssesConfig
from .spawn import join_torchrun, leave_gloo, spawn_gloo, under_torchrun
from .testing.layouts import attn_funcol

HELP = "time Ulysses attention eager, compiled, HCMS-chunked and as ring attention over sequence lengths"

TARGETS = ("layer", "block")
MEASURE_MODES = ("comm-only", "attention-only")
MODES = (*MEASURE_MODES, "eager", "compiled", "hcms-2", "hcms-3", "hcms-4", "hcms-auto", "ring")
BASELINE = "compiled"
GPU_SEQS = (8192, 16384, 32768, 56000, 75600, 131072)
CPU_SEQS = (256, 512, 1024)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PHASES = ("forward", "backward")
_HCMS_MODE = re.compile(r"hcms-([1-9]\d*|auto)(?:-(nccl|ce))?")
_EXCHANGES = {None: "auto", "nccl": "nccl", "ce": "copy-engine"}


# ---------------------------------------------------------------------------------------------
# the figures: pure arithmetic on measured times
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseCost:
    """One pass (forward or backward) of an attention site, measured piece by piece (ms)."""

    first_ms: float  # the exchange before attention: q, k, v forward; the output gradient backward
    last_ms: float  # the exchange after attention: the output forward; dq, dk, dv backward
    compute_ms: float  # attention alone on the local shape
    chunks: int  # chunks HCMS cut this pass into; 1 where it left the site alone

    @property
    def comm_ms(self) -> float:
        return self.first_ms + self.last_ms

    @property
    def unhideable_ms(self) -> float:
        # chunk 0's input exchange has no attention before it to hide behind, and the last chunk's
        # output exchange none after it: 1/C of each exchange is always exposed
        return (self.first_ms + self.last_ms) / self.chunks

    @property
    def ideal_ms(self) -> float:
        return max(self.comm_ms, self.compute_ms) + self.unhideable_ms


def ideal_ms(phases: Sequence[PhaseCost], rest_ms: float = 0.0) -> float:
    """Best time with perfect overlap: each pass costs max(comm, compute) + its unhideable part.

    `rest_ms` is the time of whatever else the target runs (0 for the layer; for the block, its
    compiled median minus the exchanges and attention alone), which overlap does not shorten.
    """
    return rest_ms + sum(phase.ideal_ms for phase in phases)


def overlap_efficiency(plain_ms: float, hcms_ms: float, ideal: float) -> float | None:
    """(T_plain - T_hcms) / (T_plain - T_ideal): the share of the hideable time HCMS hid.

    None where there is nothing to hide (T_plain <= T_ideal): the ratio would be meaningless.
    """
    headroom = plain_ms - ideal
    if headroom <= 0:
        return None
    return (plain_ms - hcms_ms) / headroom


# ---------------------------------------------------------------------------------------------
# configuration and rows
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """What one `hcms bench` run does: the flags, with the device-dependent defaults already chosen."""

    seqs: tuple[int, ...]
    targets: tuple[str, ...] = TARGETS
    modes: tuple[str, ...] = MODES
    heads: int = 40
    head_dim: int = 128
    batch: int = 1
    dtype: str = "bf16"
    causal: bool = False
    backward: bool = False
    repeats: int = 10
    warmup: int = 3
    inner: str = "inductor"
    json_path: str | None = None
    png_path: str | None = None
    trace_dir: str | None = None
    trace_mode: str = "hcms-2"
    trace_target: str = "layer"
    trace_seq: int | None = None
    trace_png_path: str | None = None
    argv: tuple[str, ...] = ()

    @property
    def traced_seq(self) -> int:
        return self.trace_seq if self.trace_seq is not None else max(self.seqs)


def _known_mode(mode: str) -> bool:
    return mode in MODES or _HCMS_MODE.fullmatch(mode) is not None


def _problems(cfg: BenchConfig, world: int) -> list[str]:
    problems = [f"unknown mode {mode!r}" for mode in cfg.modes if not _known_mode(mode)]
    problems += [f"unknown target {target!r}" for target in cfg.targets if target not in TARGETS]
    if cfg.heads % world:
        problems.append(f"--heads {cfg.heads} is not divisible by the world size {world}")
    if cfg.repeats < 1 or cfg.warmup < 0:
        problems.append("--repeats must be >= 1 and --warmup >= 0")
    if cfg.trace_png_path and not cfg.trace_dir:
        problems.append("--trace-png draws the trace that --trace DIR saves: give --trace too")
    if cfg.trace_dir and (cfg.trace_mode not in cfg.modes or cfg.trace_target not in cfg.targets
                          or cfg.traced_seq not in cfg.seqs):
        problems.append(f"the traced row ({cfg.trace_target}, {cfg.traced_seq}, {cfg.trace_mode}) is not among "
                        "the rows run: check --trace-mode, --trace-target and --trace-seq")
    return problems


@dataclass
class Row:
    """One (target, sequence length, mode) measurement; every time is in ms, the slowest rank's."""

    target: str
    seq: int
    mode: str
    status: str = "ok"  # ok, skipped, n/a or error
    note: str = ""
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    compile_s: float | None = None  # the first call, compilation included
    parts_ms: dict[str, float] = field(default_factory=dict)  # medians of the parts a step timed apart
    sites_rewritten: int | None = None
    sites_total: int | None = None
    chunks: dict[str, list[int]] = field(default_factory=dict)  # phase -> chunk sizes of its rewritten site
    speedup: float | None = None
    within_noise: bool = False  # the median differs from the baseline's by less than the repeats' spread
    ideal_ms: float | None = None
    overlap_efficiency: float | None = None  # only a figure in [0, 1]; else None and efficiency_note says why
    efficiency_note: str = ""


def rows_from_json(results: dict[str, Any]) -> list[Row]:
    """The rows of a results dictionary (as `run_bench` returns and `--json` writes it)."""
    names = {f.name for f in fields(Row)}
    return [Row(**{k: v for k, v in row.items() if k in names}) for row in results["rows"]]


def _phase_costs(row: Row, comm: Row, attention: Row) -> list[PhaseCost]:
    costs = []
    for phase in PHASES:
        if f"{phase}_first" in comm.parts_ms and phase in attention.parts_ms:
            costs.append(PhaseCost(comm.parts_ms[f"{phase}_first"], comm.parts_ms[f"{phase}_last"],
                                   attention.parts_ms[phase], len(row.chunks.get(phase, ())) or 1))
    return costs


def _spread(row: Row) -> float:
    return 0.0 if row.min_ms is None or row.max_ms is None else row.max_ms - row.min_ms


def derive_figures(rows: Sequence[Row]) -> None:
    """Fill speed-up (modes against `compiled`, marked within noise where the medians differ by less than
    the larger spread of the two rows' repeats) and, for HCMS rows, ideal time and overlap efficiency.

    The efficiency is a figure only inside [0, 1]; elsewhere, or within noise, `efficiency_note` says why not.
    """
    by_key = {(r.target, r.seq, r.mode): r for r in rows if r.status == "ok"}
    for row in rows:
        plain = by_key.get((row.target, row.seq, BASELINE))
        if row.status != "ok" or row.mode in MEASURE_MODES or plain is None:
            continue
        row.speedup = plain.median_ms / row.median_ms
        row.within_noise = row is not plain and \
            abs(plain.median_ms - row.median_ms) <= max(_spread(plain), _spread(row))
        if not row.mode.startswith("hcms-"):
            continue
        comm = by_key.get((row.target, row.seq, "comm-only"))
        attention = by_key.get((row.target, row.seq, "attention-only"))
        if row.sites_rewritten == 0:  # it hid nothing: a ratio would only measure noise
            row.efficiency_note = "nothing rewritten"
            continue
        if comm is None or attention is None:
            row.efficiency_note = "needs the comm-only and attention-only rows"
            continue
        phases = _phase_costs(row, comm, attention)
        # the block runs more than the site; what it runs besides stays in the ideal time
        rest = 0.0 if row.target == "layer" else plain.median_ms - sum(p.comm_ms + p.compute_ms for p in phases)
        row.ideal_ms = ideal_ms(phases, rest)
        efficiency = overlap_efficiency(plain.median_ms, row.median_ms, row.ideal_ms)
        if efficiency is None:
            row.efficiency_note = "nothing to hide"
        elif row.within_noise:
            row.efficiency_note = "within noise"
        elif efficiency < 0:
            row.efficiency_note = "slower than plain"
        elif efficiency > 1:
            row.efficiency_note = "faster than the ideal: the parts timed apart overstate it"
        else:
            row.overlap_efficiency = efficiency


def _efficiency(row: Row) -> str:
    if row.overlap_efficiency is not None:
        return f"{row.overlap_efficiency:.0%}"
    return f"n/a: {row.efficiency_note}" if row.efficiency_note else "-"


def _speedup(row: Row) -> str:
    if row.speedup is None:
        return "-"
    return f"{row.speedup:.2f}x" + (" (within noise)" if row.within_noise else "")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a table: medians, speed-up against `compiled`, HCMS sites rewritten, overlap efficiency."""
    table = []
    for r in rows:
        spread = "-" if r.min_ms is None else f"{r.min_ms:.3f}-{r.max_ms:.3f}"
        sites = "-" if r.sites_total is None else f"{r.sites_rewritten}/{r.sites_total}"
        note = r.note if r.status == "ok" else f"{r.status}: {r.note}"
        table.append((r.target, r.seq, r.mode, _ms(r.median_ms), spread,
                      _speedup(r), sites, _ms(r.ideal_ms), _efficiency(r),
                      note if len(note) <= 90 else note[:87] + "..."))
    headers = ("target", "seq", "mode", "median ms", "min-max ms", f"vs {BASELINE}", "sites rewritten",
               "ideal ms", "overlap eff.", "note")
    return tabulate(table, headers=headers, tablefmt="simple", disable_numparse=True)


# ---------------------------------------------------------------------------------------------
# the modules timed
# ---------------------------------------------------------------------------------------------


class UlyssesAttention(nn.Module):
    """One Ulysses attention layer: q, k, v [B, S/P, H, D] -> all-to-all -> SDPA -> all-to-all."""

    def __init__(self, group: dist.ProcessGroup, causal: bool) -> None:
        super().__init__()
        self.group, self.causal = group, causal

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attn_funcol(q, k, v, self.group, is_causal=self.causal)


class RingAttention(nn.Module):
    """Local SDPA on [B, S/P, H, D] shards; inside `context_parallel` it runs as ring attention."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # looked up at call time: context_parallel patches F.scaled_dot_product_attention
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=self.causal)
        return out.transpose(1, 2)


class RingBlock(UlyssesBlock):
    """`UlyssesBlock` with the same weights whose attention is ring attention instead of Ulysses."""

    def forward(self, x: Tensor) -> Tensor:
        b, s_local, _ = x.shape
        cfg = self.cfg
        q, k, v = self.qkv(self.norm1(x)).view(b, s_local, 3, cfg.heads, cfg.head_dim).unbind(2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=cfg.causal)
        x = x + self.proj(o.transpose(1, 2).reshape(b, s_local, cfg.hidden))
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------------------------
# running on the ranks
# ---------------------------------------------------------------------------------------------

Step = Callable[[], list[float]]  # runs one step; returns the seconds of the parts it timed apart


@dataclass
class _Ctx:
    cfg: BenchConfig
    device: torch.device
    group: dist.ProcessGroup
    rank: int
    world: int
    generator: torch.Generator
    mesh: Any = None  # the ring's DeviceMesh; None where ring attention is not available
    ring_unavailable: str = ""
    traced: bool = False  # the traced row ran (it may have been skipped or failed instead)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.cfg.dtype]

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def randn(self, shape: Sequence[int], requires_grad: bool = False) -> Tensor:
        t = torch.randn(tuple(shape), generator=self.generator, device=self.device, dtype=self.dtype)
        return t.requires_grad_(requires_grad)

    def model_config(self) -> UlyssesConfig:
        return UlyssesConfig(heads=self.cfg.heads, head_dim=self.cfg.head_dim, blocks=1, causal=self.cfg.causal)


@dataclass
class _Prepared:
    step: Step
    context: contextlib.AbstractContextManager[None]
    backend: HcmsBackend | None = None
    part_names: tuple[str, ...] = ()
    note: str = ""


def _hcms_chunks(mode: str) -> int | str:
    chunks = _HCMS_MODE.fullmatch(mode).group(1)
    return chunks if chunks == "auto" else int(chunks)


def _hcms_exchange(mode: str) -> str:
    return _EXCHANGES[_HCMS_MODE.fullmatch(mode).group(2)]


def _static_skip(ctx: _Ctx, seq: int, mode: str) -> tuple[str, str] | None:
    """Why a row cannot run, decided from the configuration alone (so every rank decides alike)."""
    if seq % ctx.world:
        return "skipped", f"sequence length {seq} is not divisible by world size {ctx.world}"
    local_heads = ctx.cfg.heads // ctx.world
    if mode.startswith("hcms-") and _hcms_chunks(mode) != "auto" and _hcms_chunks(mode) > local_heads:
        return "skipped", f"{_hcms_chunks(mode)} chunks > {local_heads} local heads"
    if mode == "ring" and ctx.ring_unavailable:
        return "n/a", ctx.ring_unavailable
    return None


def _module_step(ctx: _Ctx, module: nn.Module, inputs: list[Tensor], grad_out: Tensor) -> Step:
    if not ctx.cfg.backward:
        def forward() -> list[float]:
            with torch.no_grad():
                module(*inputs)
            return []
        return forward

    def train() -> list[float]:
        module.zero_grad(set_to_none=True)
        for t in inputs:
            t.grad = None
        module(*inputs).backward(grad_out)
        return []
    return train


def _local_shapes(ctx: _Ctx, target: str, seq: int) -> list[tuple[int, ...]]:
    b, s, h, d = ctx.cfg.batch, seq // ctx.world, ctx.cfg.heads, ctx.cfg.head_dim
    return [(b, s, h, d)] * 3 if target == "layer" else [(b, s, h * d)]


def _ulysses_module(ctx: _Ctx, target: str) -> nn.Module:
    if target == "layer":
        return UlyssesAttention(ctx.group, ctx.cfg.causal)
    torch.manual_seed(0)  # the same weights on every rank and in every mode
    return UlyssesBlock(ctx.model_config(), ctx.group).to(device=ctx.device, dtype=ctx.dtype)


def _prepare_compiled(ctx: _Ctx, target: str, seq: int, mode: str) -> _Prepared:
    module = _ulysses_module(ctx, target)
    backend = None
    if mode != "eager":
        torch._dynamo.reset()  # each mode compiles afresh: no cache entries shared across backends
        if mode != "compiled":
            backend = make_backend(chunks=_hcms_chunks(mode), inner=ctx.cfg.inner, exchange=_hcms_exchange(mode))
        module = torch.compile(module, backend=backend or ctx.cfg.inner, fullgraph=True)
    shapes = _local_shapes(ctx, target, seq)
    inputs = [ctx.randn(shape, ctx.cfg.backward) for shape in shapes]
    step = _module_step(ctx, module, inputs, ctx.randn(shapes[0]))
    return _Prepared(step, contextlib.nullcontext(), backend)


def _prepare_comm(ctx: _Ctx, seq: int) -> _Prepared:
    p, cfg = ctx.world, ctx.cfg
    # the funcol layout's send buffer: P blocks of this rank's S/P tokens of H/P heads
    shape = (p, cfg.batch, seq // p, cfg.heads // p, cfg.head_dim)
    sends = [ctx.randn(shape) for _ in range(4)]
    receives = [torch.empty_like(t) for t in sends]
    qkv, out = (0, 1, 2), (3,)

    def exchange(indices: tuple[int, ...]) -> float:
        start = ctx.now()
        for i in indices:
            dist.all_to_all_single(receives[i], sends[i], group=ctx.group)
        return ctx.now() - start

    def step() -> list[float]:
        parts = [exchange(qkv), exchange(out)]
        if cfg.backward:  # the backward exchanges mirror the forward: output gradient in, dq, dk, dv back
            parts += [exchange(out), exchange(qkv)]
        return parts

    names = ("forward_first", "forward_last") + (("backward_first", "backward_last") if cfg.backward else ())
    return _Prepared(step, contextlib.nullcontext(), part_names=names)


def _prepare_attention(ctx: _Ctx, seq: int) -> _Prepared:
    cfg = ctx.cfg
    shape = (cfg.batch, cfg.heads // ctx.world, seq, cfg.head_dim)  # what the layer's SDPA receives
    q, k, v = (ctx.randn(shape, cfg.backward) for _ in range(3))
    grad = ctx.randn(shape)

    def step() -> list[float]:
        start = ctx.now()
        with torch.set_grad_enabled(cfg.backward):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal)
        mid = ctx.now()
        if not cfg.backward:
            return [mid - start]
        torch.autograd.grad(out, (q, k, v), grad)
        return [mid - start, ctx.now() - mid]

    return _Prepared(step, contextlib.nullcontext(), part_names=PHASES if cfg.backward else PHASES[:1])


@contextlib.contextmanager
def _ring_context(ctx: _Ctx, buffers: list[Tensor]) -> Iterator[None]:
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import _cp_options

    # load balancing (head-tail token order) evens out causal masks only; PyTorch refuses it without one
    saved = _cp_options.enable_load_balance
    _cp_options.enable_load_balance = ctx.cfg.causal
    try:
        # context_parallel keeps each rank's shard of the global buffers (resizing them in place), so
        # they may require grad only once sharded
        with context_parallel(ctx.mesh, buffers=buffers, buffer_seq_dims=[1] * len(buffers),
                              no_restore_buffers=set(buffers)):
            for t in buffers:
                t.requires_grad_(ctx.cfg.backward)
            yield
    finally:
        _cp_options.enable_load_balance = saved


def _ring_note(ctx: _Ctx) -> str:
    from torch.distributed.tensor.experimental._attention import _cp_options

    return (f"eager context_parallel, KV rotation {_cp_options.rotate_method.name.lower()}, "
            f"load balancing {'on' if ctx.cfg.causal else 'off'}")


def _prepare_ring(ctx: _Ctx, target: str, seq: int) -> _Prepared:
    if target == "layer":
        module: nn.Module = RingAttention(ctx.cfg.causal)
    else:
        torch.manual_seed(0)
        module = RingBlock(ctx.model_config(), ctx.group).to(device=ctx.device, dtype=ctx.dtype)
    local = _local_shapes(ctx, target, seq)
    buffers = [ctx.randn((shape[0], seq, *shape[2:])) for shape in local]  # global: the context shards them
    step = _module_step(ctx, module, buffers, ctx.randn(local[0]))
    return _Prepared(step, _ring_context(ctx, buffers), note=_ring_note(ctx))


def _prepare(ctx: _Ctx, target: str, seq: int, mode: str) -> _Prepared:
    if mode == "comm-only":
        return _prepare_comm(ctx, seq)
    if mode == "attention-only":
        return _prepare_attention(ctx, seq)
    if mode == "ring":
        return _prepare_ring(ctx, target, seq)
    return _prepare_compiled(ctx, target, seq, mode)


def _describe(exc: BaseException) -> str:
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line}"


def _agree(ctx: _Ctx, failed: bool, value: float = 0.0) -> tuple[bool, float]:
    """Whether any rank failed, and the largest `value` over ranks (one collective for both)."""
    t = torch.tensor([float(failed), value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.group)
    return bool(t[0].item()), float(t[1].item())


def _measure(ctx: _Ctx, step: Step) -> Tensor:
    """[repeats, 1 + parts] step and part times in ms, each the slowest rank's."""
    for _ in range(ctx.cfg.warmup):
        step()
    samples = []
    for _ in range(ctx.cfg.repeats):
        dist.barrier(group=ctx.group)
        start = ctx.now()
        parts = step()
        samples.append([ctx.now() - start, *parts])
    times = torch.tensor(samples, dtype=torch.float64, device=ctx.device) * 1e3
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=ctx.group)
    return times.cpu()


def _trace(ctx: _Ctx, step: Step, target: str, seq: int, mode: str) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    dist.barrier(group=ctx.group)
    ctx.now()
    with profile(activities=activities) as prof:
        with record_function(bench_plot.STEP_MARKER):
            step()
        ctx.now()
    path = Path(ctx.cfg.trace_dir) / f"rank{ctx.rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    # the picture's title comes from the trace itself, so it can be drawn on another machine
    trace = json.loads(path.read_text())
    trace["hcmsBench"] = {"mode": mode, "target": target, "seq": seq, "world_size": ctx.world,
                          "rank": ctx.rank, "device": ctx.device.type}
    path.write_text(json.dumps(trace))
    ctx.traced = True


def _site_summary(row: Row, backend: HcmsBackend) -> None:
    sites = [("backward" if report.phase == "backward" else "forward", site)
             for report in backend.reports for site in report.sites]
    row.sites_total = len(sites)
    row.sites_rewritten = sum(site.rewritten for _, site in sites)
    for phase, site in sites:
        if site.rewritten:
            row.chunks.setdefault(phase, list(site.chunk_sizes))
    reasons = sorted({f"{phase}: {site.reason}" for phase, site in sites if not site.rewritten})
    if not row.sites_rewritten:
        row.note = "HCMS rewrote nothing: " + ("; ".join(reasons) or "no site found")
    elif reasons:
        row.note = "left alone: " + "; ".join(reasons)


def _run_mode(ctx: _Ctx, target: str, seq: int, mode: str) -> Row:
    row = Row(target, seq, mode)
    skip = _static_skip(ctx, seq, mode)
    if skip:
        row.status, row.note = skip
        return row
    prepared, error = None, ""
    try:
        prepared = _prepare(ctx, target, seq, mode)
    except Exception as exc:  # e.g. make_backend rejecting chunks="auto": a row, not a crash
        error = _describe(exc)
    failed, _ = _agree(ctx, bool(error))
    if failed:
        row.status, row.note = "error", error or "failed on another rank"
        return row
    with prepared.context:
        start = time.perf_counter()
        try:
            prepared.step()  # compiles where the mode compiles
            ctx.now()
        except Exception as exc:
            error = _describe(exc)
        failed, row.compile_s = _agree(ctx, bool(error), time.perf_counter() - start)
        if failed:
            row.status, row.note = "error", error or "failed on another rank"
            return row
        times = _measure(ctx, prepared.step)
        if ctx.cfg.trace_dir and (target, seq, mode) == (ctx.cfg.trace_target, ctx.cfg.traced_seq,
                                                          ctx.cfg.trace_mode):
            _trace(ctx, prepared.step, target, seq, mode)
    totals = times[:, 0].tolist()
    row.times_ms = [round(t, 4) for t in totals]
    row.median_ms, row.min_ms, row.max_ms = statistics.median(totals), min(totals), max(totals)
    row.parts_ms = {name: statistics.median(times[:, i + 1].tolist()) for i, name in enumerate(prepared.part_names)}
    row.note = prepared.note
    if prepared.backend is not None:
        _site_summary(row, prepared.backend)
    return row


def _ring_availability(ctx: _Ctx) -> None:
    if "ring" not in ctx.cfg.modes:
        return
    if ctx.device.type != "cuda":
        ctx.ring_unavailable = ("context_parallel's ring attention handles the CUDA SDPA kernels (flash, "
                                "efficient, cuDNN) only; CPU attention is not dispatched to it")
        return
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel  # noqa: F401
    except ImportError as exc:
        ctx.ring_unavailable = f"torch.distributed.tensor.experimental.context_parallel: {_describe(exc)}"
        return
    ctx.mesh = init_device_mesh(ctx.device.type, (ctx.world,))


def _metadata(ctx: _Ctx) -> dict[str, Any]:
    nccl = None
    if ctx.device.type == "cuda":
        version = torch.cuda.nccl.version()
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        device = torch.cuda.get_device_name(ctx.device)
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "torch": torch.__version__, "nccl": nccl, "hcms_compile": __version__, "python": platform.python_version(),
        "device": device, "world_size": ctx.world, "backend": dist.get_backend(ctx.group),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(ctx.cfg.argv),
    }


def run_bench(cfg: BenchConfig, device: torch.device, group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """Run every row on an initialised process group; every rank returns the same results."""
    group = group or dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    problems = _problems(cfg, world)
    if problems:
        raise ValueError("; ".join(problems))
    generator = torch.Generator(device=device).manual_seed(1234 + rank)
    ctx = _Ctx(cfg, device, group, rank, world, generator)
    _ring_availability(ctx)
    rows = []
    for target in cfg.targets:
        for seq in cfg.seqs:
            for mode in cfg.modes:
                rows.append(_run_mode(ctx, target, seq, mode))
                if device.type == "cuda":  # compiled modules hold cycles: free their GPU memory before the next
                    gc.collect()
                    torch.cuda.empty_cache()
    derive_figures(rows)
    trace = None
    if ctx.traced:
        trace = {"dir": cfg.trace_dir, "mode": cfg.trace_mode, "target": cfg.trace_target, "seq": cfg.traced_seq,
                 "world_size": world, "files": [f"rank{r}.json" for r in range(world)]}
    return {"meta": _metadata(ctx), "config": asdict(cfg), "rows": [asdict(r) for r in rows], "trace": trace}


def _report(cfg: BenchConfig, results: dict[str, Any]) -> None:
    """Rank 0's output: the table, the JSON, the pictures."""
    meta, c = results["meta"], results["config"]
    print(f"hcms bench: {meta['world_size']} ranks ({meta['backend']}, {meta['device']}), torch {meta['torch']}, "
          f"{c['heads']} heads x {c['head_dim']}, batch {c['batch']}, {c['dtype']}, "
          f"{'causal' if c['causal'] else 'non-causal'}, {'forward+backward' if c['backward'] else 'forward'}, "
          f"median of {c['repeats']} after {c['warmup']} warm-up, inner compiler {c['inner']}")
    print(format_table(rows_from_json(results)))
    print("overlap eff. = (T_compiled - T_hcms) / (T_compiled - T_ideal), T_ideal = max(comm, attention) + "
          "(first + last exchange) / C per pass, from the comm-only and attention-only rows")
    if cfg.json_path:
        Path(cfg.json_path).write_text(json.dumps(results, indent=1))
        print(f"wrote {cfg.json_path}")
    if cfg.png_path:
        bench_plot.plot_speedups(results, cfg.png_path)
        print(f"wrote {cfg.png_path}")
    if results["trace"]:
        print(f"wrote {cfg.trace_dir}/rank{{0..{meta['world_size'] - 1}}}.json")
        if cfg.trace_png_path:
            bench_plot.plot_trace(_rank_traces(Path(cfg.trace_dir)), cfg.trace_png_path)
            print(f"wrote {cfg.trace_png_path}")
    elif cfg.trace_dir:
        print(f"no trace: the row ({cfg.trace_target}, {cfg.traced_seq}, {cfg.trace_mode}) did not run")
    sys.stdout.flush()


def _bench_and_report(cfg: BenchConfig, device: torch.device) -> None:
    results = run_bench(cfg, device)
    if dist.get_rank() == 0:
        _report(cfg, results)


def _spawned_rank(rank: int, cfg: BenchConfig) -> None:
    _bench_and_report(cfg, torch.device("cpu"))


def _run_torchrun(cfg: BenchConfig) -> None:
    device = join_torchrun()
    _bench_and_report(cfg, device)
    if device.type == "cuda":
        dist.barrier()
        dist.destroy_process_group()
    else:
        leave_gloo()


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def _mode(text: str) -> str:
    if _known_mode(text):
        return text
    raise argparse.ArgumentTypeError(f"unknown mode {text!r}: one of {', '.join(MODES)}, or hcms-<chunks>, "
                                     "hcms-<chunks>-nccl, hcms-<chunks>-ce")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The `hcms bench` flags, added to `parser` (the `bench` subparser of `hcms`)."""
    run = parser.add_argument_group("what to run")
    run.add_argument("--ranks", type=int, default=2,
                     help="CPU gloo processes to spawn when not under torchrun (default 2)")
    run.add_argument("--seq", type=int, nargs="+", metavar="TOKENS",
                     help=f"global sequence lengths (default {' '.join(map(str, GPU_SEQS))} on GPU, "
                          f"{' '.join(map(str, CPU_SEQS))} on CPU)")
    run.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS),
                     help="layer: one Ulysses attention layer; block: one transformer block (default both)")
    run.add_argument("--modes", nargs="+", type=_mode, default=list(MODES), metavar="MODE",
                     help=f"rows to time, in this order (default {' '.join(MODES)}; any hcms-<chunks> works)")
    run.add_argument("--heads", type=int, default=40, help="global heads, divisible by the world size (default 40)")
    run.add_argument("--head-dim", type=int, default=128)
    run.add_argument("--batch", type=int, default=1)
    run.add_argument("--dtype", choices=list(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    run.add_argument("--causal", action="store_true")
    run.add_argument("--backward", action="store_true", help="time forward+backward instead of forward alone")
    run.add_argument("--repeats", type=int, help="timed steps per row, median reported (default 10 GPU, 5 CPU)")
    run.add_argument("--warmup", type=int, help="untimed steps after compiling (default 3 GPU, 1 CPU)")
    run.add_argument("--inner", choices=["inductor", "aot_eager"], default="inductor",
                     help="the compiler of the compiled and hcms modes (default inductor)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write every row and the run's metadata as JSON")
    out.add_argument("--png", metavar="PATH", help="draw speed-up against sequence length (needs matplotlib)")
    out.add_argument("--plot", metavar="RESULTS_JSON",
                     help="run nothing: print the table of a --json file and draw --png / --trace-png from it")
    out.add_argument("--trace", metavar="DIR", help="save a profiler trace of one step per rank as DIR/rank{r}.json")
    out.add_argument("--trace-mode", type=_mode, default="hcms-2", help="the mode traced (default hcms-2)")
    out.add_argument("--trace-target", choices=TARGETS, default="layer", help="the target traced (default layer)")
    out.add_argument("--trace-seq", type=int, help="the sequence length traced (default the largest --seq)")
    out.add_argument("--trace-png", metavar="PATH",
                     help="draw every rank's trace as lanes on one time axis: one per GPU stream or CPU thread "
                          "(needs matplotlib)")


def config_from_args(args: argparse.Namespace, on_gpu: bool, argv: Sequence[str] = ()) -> BenchConfig:
    """The run's configuration, with the device-dependent defaults filled in."""
    return BenchConfig(
        seqs=tuple(args.seq or (GPU_SEQS if on_gpu else CPU_SEQS)),
        targets=tuple(dict.fromkeys(args.targets)), modes=tuple(dict.fromkeys(args.modes)),
        heads=args.heads, head_dim=args.head_dim, batch=args.batch,
        dtype=args.dtype or ("bf16" if on_gpu else "fp32"), causal=args.causal, backward=args.backward,
        repeats=args.repeats or (10 if on_gpu else 5),
        warmup=args.warmup if args.warmup is not None else (3 if on_gpu else 1),
        inner=args.inner, json_path=args.json, png_path=args.png, trace_dir=args.trace,
        trace_mode=args.trace_mode, trace_target=args.trace_target, trace_seq=args.trace_seq,
        trace_png_path=args.trace_png, argv=tuple(argv),
    )


def _rank_traces(trace_dir: Path) -> list[Path]:
    """DIR/rank{r}.json of every rank that saved one, in rank order."""
    return sorted(trace_dir.glob("rank*.json"), key=lambda p: int(p.stem[4:]) if p.stem[4:].isdigit() else -1)


def _plot_only(args: argparse.Namespace) -> int:
    results = json.loads(Path(args.plot).read_text())
    print(format_table(rows_from_json(results)))
    if not (args.png or args.trace_png):
        return 0
    bench_plot.require_matplotlib()
    if args.png:
        bench_plot.plot_speedups(results, args.png)
        print(f"wrote {args.png}")
    if args.trace_png:
        trace_dir = args.trace or (results.get("trace") or {}).get("dir")
        traces = _rank_traces(Path(trace_dir or "."))
        if not trace_dir or not traces:
            # the results name the directory the traces were written to, maybe on another machine
            print(f"hcms bench: --trace-png needs the ranks' traces; {trace_dir or '.'} holds no rank*.json: "
                  "pass --trace DIR", file=sys.stderr)
            return 2
        bench_plot.plot_trace(traces, args.trace_png)
        print(f"wrote {args.trace_png}")
    return 0


def run_bench_command(args: argparse.Namespace) -> int:
    """`hcms bench`: run under torchrun, or spawn `--ranks` CPU processes; or, with --plot, only draw."""
    try:
        if args.plot:
            return _plot_only(args)
        if args.png or args.trace_png:
            bench_plot.require_matplotlib()  # before any time is spent measuring
    except bench_plot.MatplotlibMissing as exc:
        print(f"hcms bench: {exc}", file=sys.stderr)
        return 2
    torchrun = under_torchrun()
    on_gpu = torchrun and torch.cuda.is_available()
    world = int(os.environ["WORLD_SIZE"]) if torchrun else args.ranks
    cfg = config_from_args(args, on_gpu, sys.argv)
    problems = _problems(cfg, world)
    if problems:
        for problem in problems:
            print(f"hcms bench: {problem}", file=sys.stderr)
        return 2
    if torchrun:
        _run_torchrun(cfg)
    else:
        # the ranks share this machine's cores
        spawn_gloo(_spawned_rank, world, cfg, threads=max(1, (os.cpu_count() or 1) // world))
    return 0
