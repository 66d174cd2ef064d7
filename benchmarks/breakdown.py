"""Where the time of one Ulysses attention layer goes, compiled plainly and through HCMS, mode by mode.

The layer is `hcms bench --targets layer`'s: q, k, v [1, S/P, 40 heads, 128] -> funcol all-to-alls ->
SDPA -> all-to-all back (`hcms_compile.testing.layouts.attn_funcol`), bf16 on GPU, fp32 on CPU. Terms:

- mode: how the layer is compiled. `compiled` is `torch.compile` with Inductor alone (the baseline,
  always run); any other mode is `NAME='JSON'`, JSON being keyword arguments of
  `hcms_compile.backend.make_backend` (`hcms-2='{"chunks": 2}'`), passed through as given: a keyword
  make_backend does not take is that mode's error row, not a crash. `--compile-mode` is torch.compile's
  `mode=` for every mode (e.g. reduce-overhead: CUDA graphs).
- phase: `forward` (under no_grad) or `train` (forward and backward of the output gradient).
- step ms: the median over `--repeats` steps of a step's device time, after a barrier and a
  synchronize, timed with CUDA events (perf_counter on CPU); the slowest rank's.
- vs compiled: step ms / the `compiled` row's step ms (below 1.00x is faster).
- launch ms: the median host wall time from a step's start until its Python call returns, with no
  synchronize inside: on GPU kernels run asynchronously, so this is what the host spends launching
  (Python, guards, Inductor's wrapper, the collectives' host side). Where it nears step ms, the GPU
  waits for the host; more chunks mean more launches.
- classes (`hcms_compile.kernels.classify`): attention, collective, copy, concat and other, each as
  `count / ms` per step, averaged over PROFILED_STEPS profiled steps on rank 0. On GPU a count is
  device kernels (memcpys included) and ms their summed GPU time; overlapping kernels add up, so the
  classes can sum past step ms. On CPU there are no device kernels: the count is the operators at
  the top level of the compiled code
  (aten ops, collectives, and Inductor's C++ kernels, made visible to the profiler by
  `cpp.enable_kernel_profile`) and ms their CPU time; the collective class there holds the
  `wait_tensor` calls too, so on CPU it is mostly time spent waiting for gloo.
- a2a calls: collective calls the host issued in that step (waits not counted).
- bitwise: the mode's output and input gradients against the `compiled` row's, with the same inputs,
  `torch.equal` on every rank. Where `compiled` does not reproduce its own gradients (cuDNN's
  backward accumulates with atomics), only the output is compared, and the note says so.

Steps, for each phase, sequence length and mode, in the same order on every rank:
1. build the layer and compile it (a fresh Dynamo cache), its first call compiling; any rank failing
   makes it an error row on all of them, so collectives stay matched;
2. `--warmup` untimed steps, then `--repeats` timed ones (step and launch time in the same loop: the
   events are recorded around the host timing and do not block it);
3. PROFILED_STEPS steps under torch.profiler (CPU and CUDA activities), their kernels or operators
   classified and averaged per step;
4. the results compared bit for bit with the baseline's (the baseline runs twice, to see whether its
   own results repeat).
Then a table per phase is printed and, with `--json PATH`, every row and the run's metadata written.

Under torchrun it uses the world (NCCL on cuda:LOCAL_RANK, gloo without CUDA); otherwise it is one
process of world size 1 (NCCL on cuda:0, or gloo on the CPU) with a TCP rendezvous on localhost.

    python benchmarks/breakdown.py --json breakdown.json                       # 1 GPU
    torchrun --nproc-per-node 2 benchmarks/breakdown.py --seq 16384            # 2 GPUs
    python benchmarks/breakdown.py --modes hcms-2='{"chunks": 2}' hcms-2-unfused='{"chunks": 2, "fuse": false}'
    python benchmarks/breakdown.py --seq 256 --repeats 2 --warmup 1            # CPU dry run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tabulate import tabulate
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from hcms_compile.backend import HcmsBackend, make_backend
from hcms_compile.bench import (
    BASELINE,
    BenchConfig,
    Step,
    UlyssesAttention,
    _agree,
    _Ctx,
    _describe,
    _local_shapes,
    _metadata,
    _module_step,
)
from hcms_compile.kernels import CLASSES, classify
from hcms_compile.spawn import free_port, leave_gloo, under_torchrun

PHASES = ("forward", "train")
GPU_SEQS = (8192, 16384, 32768)
CPU_SEQS = (256, 512)
DEFAULT_MODES = ('hcms-2={"chunks": 2}', 'hcms-4={"chunks": 4}')
# the CPU operators that the compiled code runs itself; autograd::, profiler:: and record_function
# ranges around them are not operators
PROFILED_STEPS = 5  # one profiled step varies by a few percent on the H200 (clocks): average several
_OP_PREFIXES = ("aten::", "c10d::", "_c10d_functional::", "c10d_functional::", "inductor::", "prims::")


@dataclass(frozen=True)
class Mode:
    name: str
    kwargs: dict[str, Any] | None  # make_backend's; None for the plain Inductor baseline


@dataclass
class Row:
    """One (phase, sequence length, mode) measurement; times in ms, the slowest rank's."""

    phase: str
    seq: int
    mode: str
    kwargs: dict[str, Any] | None
    status: str = "ok"  # ok, skipped or error
    note: str = ""
    compile_s: float | None = None
    step_ms: float | None = None
    step_min_ms: float | None = None
    step_max_ms: float | None = None
    launch_ms: float | None = None
    vs_compiled: float | None = None
    bitwise: bool | None = None  # results (output, input gradients) equal the baseline's on every rank
    collective_calls: int | None = None
    classes: dict[str, dict[str, float]] = field(default_factory=dict)  # class -> {"count", "ms"}, rank 0's
    step_times_ms: list[float] = field(default_factory=list)
    launch_times_ms: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# one row
# ---------------------------------------------------------------------------------------------


def _prepare(ctx: _Ctx, seq: int, mode: Mode,
             compile_mode: str | None) -> tuple[Step, Callable[[], list[torch.Tensor]], HcmsBackend | None]:
    """The timed step, a function returning its results (output, and input gradients when
    training) as fresh tensors, and the backend. Every mode of one sequence length draws the same
    inputs, so results can be compared bit for bit."""
    torch._dynamo.reset()  # each mode compiles afresh: no cache entries shared across backends
    backend = None if mode.kwargs is None else make_backend(**mode.kwargs)
    module = torch.compile(UlyssesAttention(ctx.group, causal=False), backend=backend or "inductor",
                           fullgraph=True, mode=compile_mode)
    shapes = _local_shapes(ctx, "layer", seq)
    ctx.generator.manual_seed(1234 + 7919 * ctx.rank + seq)
    inputs = [ctx.randn(shape, ctx.cfg.backward) for shape in shapes]
    grad_out = ctx.randn(shapes[0])

    def results() -> list[torch.Tensor]:
        for t in inputs:
            t.grad = None
        with torch.set_grad_enabled(ctx.cfg.backward):
            out = module(*inputs)
        if ctx.cfg.backward:
            out.backward(grad_out)
        # cudagraph trees reuse their output memory on the next replay: keep copies
        return [out.detach().clone(), *(t.grad.clone() for t in inputs if t.grad is not None)]

    return _module_step(ctx, module, inputs, grad_out), results, backend


def _time_steps(ctx: _Ctx, step: Step) -> torch.Tensor:
    """[repeats, 2]: each step's device time and host launch time (ms), the slowest rank's."""
    cuda = ctx.device.type == "cuda"
    for _ in range(ctx.cfg.warmup):
        step()
    samples = []
    for _ in range(ctx.cfg.repeats):
        dist.barrier(group=ctx.group)
        ctx.now()  # synchronizes: the step starts on an idle device
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        host_start = time.perf_counter()
        step()
        launch = time.perf_counter() - host_start
        if cuda:
            end.record()
        done = ctx.now()
        device_ms = start.elapsed_time(end) if cuda else (done - host_start) * 1e3
        samples.append([device_ms, launch * 1e3])
    times = torch.tensor(samples, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=ctx.group)
    return times.cpu()


def _is_op(name: str) -> bool:
    return name.startswith(_OP_PREFIXES) or "cpp_fused" in name


def _top_level_ops(events: Sequence[Any]) -> list[Any]:
    """The CPU operators with no operator around them: what the compiled code called itself."""
    def nested(event: Any) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if _is_op(parent.name):
                return True
            parent = parent.cpu_parent
        return False

    return [e for e in events if e.device_type == DeviceType.CPU and _is_op(e.name) and not nested(e)]


def _profile(ctx: _Ctx, step: Step) -> tuple[dict[str, dict[str, float]], int]:
    """One profiled step: {class: {count, ms}} and the collective calls the host issued."""
    cuda = ctx.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    dist.barrier(group=ctx.group)
    ctx.now()
    with profile(activities=activities) as prof:
        for _ in range(PROFILED_STEPS):
            step()
        ctx.now()
    events = prof.events()
    ops = _top_level_ops(events)
    if cuda:
        timed = [(e.name, e.time_range.end - e.time_range.start) for e in events if e.device_type == DeviceType.CUDA]
    else:
        timed = [(e.name, e.cpu_time_total) for e in ops]
    classes = {name: {"count": 0, "ms": 0.0} for name in CLASSES}
    for name, us in timed:
        entry = classes[classify(name)]
        entry["count"] += 1 / PROFILED_STEPS
        entry["ms"] += us / 1e3 / PROFILED_STEPS
    calls = sum(classify(e.name) == "collective" and "wait" not in e.name.lower() for e in ops)
    return classes, round(calls / PROFILED_STEPS)


def _agree_bitwise(ctx: _Ctx, values: list[torch.Tensor], reference: list[torch.Tensor]) -> bool:
    """Whether every rank's results equal the baseline's bit for bit (output and input gradients)."""
    same = len(values) == len(reference) and all(torch.equal(a, b) for a, b in zip(values, reference, strict=True))
    flag = torch.tensor([int(same)], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=ctx.group)
    return bool(flag.item())


def _sites_note(backend: HcmsBackend | None) -> str:
    if backend is None:
        return ""
    sites = [site for report in backend.reports for site in report.sites]
    return f"HCMS rewrote {sum(site.rewritten for site in sites)}/{len(sites)} sites"


def _run_row(ctx: _Ctx, phase: str, seq: int, mode: Mode,
             compile_mode: str | None) -> tuple[Row, list[list[torch.Tensor]]]:
    row = Row(phase, seq, mode.name, mode.kwargs)
    if seq % ctx.world:
        row.status, row.note = "skipped", f"sequence length {seq} is not divisible by world size {ctx.world}"
        return row, []
    error, backend = "", None
    start = time.perf_counter()
    try:
        step, results, backend = _prepare(ctx, seq, mode, compile_mode)
        step()  # compiles
        ctx.now()
    except Exception as exc:  # make_backend rejecting a keyword, a compile failure: a row, not a crash
        error = _describe(exc)
    failed, row.compile_s = _agree(ctx, bool(error), time.perf_counter() - start)
    if failed:
        row.status, row.note = "error", error or "failed on another rank"
        return row, []
    times = _time_steps(ctx, step)
    row.step_times_ms = [round(t, 4) for t in times[:, 0].tolist()]
    row.launch_times_ms = [round(t, 4) for t in times[:, 1].tolist()]
    row.step_ms, row.launch_ms = statistics.median(row.step_times_ms), statistics.median(row.launch_times_ms)
    row.step_min_ms, row.step_max_ms = min(row.step_times_ms), max(row.step_times_ms)
    row.classes, row.collective_calls = _profile(ctx, step)
    row.note = _sites_note(backend)
    # the baseline twice: whether its own results are reproducible decides what can be compared
    return row, [results() for _ in range(2 if mode.kwargs is None else 1)]


# ---------------------------------------------------------------------------------------------
# the run and its report
# ---------------------------------------------------------------------------------------------


def run(cfg: BenchConfig, phases: Sequence[str], modes: Sequence[Mode], compile_mode: str | None,
        device: torch.device) -> dict[str, Any]:
    group = dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if cfg.heads % world:
        raise ValueError(f"{cfg.heads} heads are not divisible by the world size {world}")
    if device.type == "cpu":
        # Inductor's C++ kernels are invisible to the profiler unless they record themselves
        torch._inductor.config.cpp.enable_kernel_profile = True
    generator = torch.Generator(device=device).manual_seed(1234 + rank)
    rows = []
    for phase in phases:
        ctx = _Ctx(dataclasses.replace(cfg, backward=phase == "train"), device, group, rank, world, generator)
        for seq in cfg.seqs:
            reference: list[torch.Tensor] = []
            compared = 0  # how many results are compared: all, or the output alone when gradients vary
            for mode in modes:
                row, runs = _run_row(ctx, phase, seq, mode, compile_mode)
                values = runs[0] if runs else []
                if mode.kwargs is None and runs:
                    reference, again = runs
                    compared = len(reference) if _agree_bitwise(ctx, again, reference) else 1
                elif row.status == "ok" and reference:
                    row.bitwise = _agree_bitwise(ctx, values[:compared], reference[:compared])
                    if compared < len(reference):
                        row.note += ("; output compared, gradients not: Inductor alone's differ between two "
                                     "runs (a backward kernel that is not deterministic, cuDNN's)")
                rows.append(row)
                del values, runs
                if device.type == "cuda":  # compiled modules hold cycles: free their memory before the next
                    torch.cuda.empty_cache()
    baseline = {(r.phase, r.seq): r.step_ms for r in rows if r.mode == BASELINE and r.status == "ok"}
    for row in rows:
        if row.status == "ok" and (row.phase, row.seq) in baseline:
            row.vs_compiled = row.step_ms / baseline[row.phase, row.seq]
    meta = _metadata(ctx)
    meta.update(phases=list(phases), compile_mode=compile_mode,
                modes={m.name: m.kwargs for m in modes}, heads=cfg.heads, head_dim=cfg.head_dim,
                batch=cfg.batch, dtype=cfg.dtype, repeats=cfg.repeats, warmup=cfg.warmup,
                CUDA_DEVICE_MAX_CONNECTIONS=os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"))
    return {"meta": meta, "rows": [asdict(r) for r in rows]}


def format_table(rows: Sequence[dict[str, Any]], phase: str) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    table = []
    for r in (r for r in rows if r["phase"] == phase):
        ratio = "-" if r["vs_compiled"] is None else f"{r['vs_compiled']:.2f}x"
        classes = [f"{r['classes'][c]['count']:g} / {r['classes'][c]['ms']:.3f}" if r["classes"] else "-"
                   for c in CLASSES]
        calls = "-" if r["collective_calls"] is None else str(r["collective_calls"])
        note = r["note"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"
        bits = {True: "yes", False: "NO", None: "-"}[r.get("bitwise")]
        table.append((r["seq"], r["mode"], ms(r["step_ms"]), ratio, ms(r["launch_ms"]), *classes, calls, bits, note))
    headers = ("seq", "mode", "step ms", f"vs {BASELINE}", "launch ms", *(f"{c} n / ms" for c in CLASSES),
               "a2a calls", "bitwise", "note")
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def report(results: dict[str, Any], json_path: str | None) -> None:
    meta = results["meta"]
    print(f"breakdown: world size {meta['world_size']} ({meta['backend']}, {meta['device']}), torch {meta['torch']}, "
          f"NCCL {meta['nccl']}, {meta['heads']} heads x {meta['head_dim']}, batch {meta['batch']}, {meta['dtype']}, "
          f"compile mode {meta['compile_mode']}, CUDA_DEVICE_MAX_CONNECTIONS={meta['CUDA_DEVICE_MAX_CONNECTIONS']}, "
          f"median of {meta['repeats']} after {meta['warmup']} warm-up")
    unit = "GPU kernels" if meta["nccl"] else "top-level CPU operators"
    for phase in meta["phases"]:
        print(f"\n{phase}: classes are {unit} per step on rank 0, mean of {PROFILED_STEPS} profiled steps "
              "(count / summed ms)")
        print(format_table(results["rows"], phase))
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1))
        print(f"\nwrote {json_path}")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def parse_mode(text: str) -> Mode:
    name, sep, kwargs = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: a mode is NAME=JSON, e.g. hcms-2='{{\"chunks\": 2}}'")
    try:
        parsed = json.loads(kwargs)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: the JSON must be an object of make_backend keywords")
    return Mode(name, parsed)


def _init() -> torch.device:
    cuda = torch.cuda.is_available()
    if under_torchrun():
        if not cuda:
            dist.init_process_group("gloo")
            return torch.device("cpu")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        return device
    # one process: a world of size 1, rendezvous on a free local port
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1, **({"device_id": device} if cuda else {}))
    return device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", metavar="TOKENS",
                        help=f"global sequence lengths (default {' '.join(map(str, GPU_SEQS))} on GPU, "
                             f"{' '.join(map(str, CPU_SEQS))} on CPU)")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--modes", nargs="+", type=parse_mode, metavar="NAME=JSON",
                        default=[parse_mode(m) for m in DEFAULT_MODES],
                        help=f"HCMS modes besides {BASELINE} (always run first): NAME=make_backend keywords as "
                             f"JSON (default {' '.join(DEFAULT_MODES)})")
    parser.add_argument("--compile-mode", help="torch.compile(mode=...) for every mode, e.g. reduce-overhead")
    parser.add_argument("--repeats", type=int, help="timed steps per row (default 20 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps after compiling (default 5 GPU, 1 CPU)")
    parser.add_argument("--json", metavar="PATH", help="write every row and the run's metadata as JSON")
    args = parser.parse_args()
    modes = [Mode(BASELINE, None)] + [m for m in args.modes if m.name != BASELINE]
    if len({m.name for m in modes}) != len(modes):
        parser.error("mode names must differ")
    device = _init()
    on_gpu = device.type == "cuda"
    cfg = BenchConfig(seqs=tuple(args.seq or (GPU_SEQS if on_gpu else CPU_SEQS)), targets=("layer",),
                      dtype="bf16" if on_gpu else "fp32",
                      repeats=args.repeats or (20 if on_gpu else 3),
                      warmup=args.warmup if args.warmup is not None else (5 if on_gpu else 1),
                      json_path=args.json, argv=tuple(sys.argv))
    if cfg.repeats < 1 or cfg.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    results = run(cfg, args.phases, modes, args.compile_mode, device)
    if dist.get_rank() == 0:
        report(results, args.json)
    if on_gpu:
        dist.barrier()
        dist.destroy_process_group()
    else:
        leave_gloo()  # gloo's threads can abort a normal interpreter exit (see hcms_compile.spawn)


if __name__ == "__main__":
    main()
