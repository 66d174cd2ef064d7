"""Pictures of `hcms bench` results: speed-up against sequence length, and the lanes of one traced step.

matplotlib is imported only when a picture is drawn (the GPU machines have none): run the bench
there with `--json` and `--trace`, then draw elsewhere with `hcms bench --plot results.json --png
out.png --trace-png lanes.png`. Parsing and classifying trace events needs no matplotlib.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# a device-to-device or peer-to-peer memcpy is the copy-engine exchange's (hcms_compile/copy_engine.py):
# the compiled layer's own layout copies are kernels, never memcpys
COMM_WORDS = ("nccl", "gloo", "all_to_all", "alltoall", "sendrecv", "memcpy dtod", "memcpy ptop")
ATTENTION_WORDS = ("flash", "cudnn", "efficient", "sdpa", "attention", "fmha")
COLOURS = {"comm": "#d62728", "attention": "#1f77b4", "other": "#bdbdbd"}
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
# CPU ops, and annotations: gloo records its transfers as annotations on its own worker threads
CPU_CATEGORIES = ("cpu_op", "user_annotation")
STEP_MARKER = "hcms_bench_step"  # the annotation around the traced step: the whole window, not a box
_NOT_PLOTTED = ("comm-only", "attention-only", "compiled")  # not speed-ups: parts, or the baseline itself


class MatplotlibMissing(RuntimeError):
    """Raised when a picture is asked for and matplotlib is not installed."""


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MatplotlibMissing(
            "drawing a PNG needs matplotlib (pip install matplotlib). Without it, write --json (and --trace) "
            "here and draw elsewhere: hcms bench --plot results.json --png out.png") from exc
    # a bare Figure renders with Agg and leaves pyplot's global state alone
    return Figure(figsize=(width, height), layout="constrained")


def require_matplotlib() -> None:
    """Fail now, with the message of `MatplotlibMissing`, rather than after a long run."""
    _figure(1, 1)


def classify(name: str) -> str:
    """'comm', 'attention' or 'other', from a kernel's or an op's name."""
    lowered = name.lower()
    if any(word in lowered for word in COMM_WORDS):
        return "comm"
    if any(word in lowered for word in ATTENTION_WORDS):
        return "attention"
    return "other"


# ---------------------------------------------------------------------------------------------
# speed-up against sequence length
# ---------------------------------------------------------------------------------------------


def speedup_series(results: dict[str, Any]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """target -> mode -> [(sequence length, speed-up against compiled)], rows with a speed-up only."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for row in results["rows"]:
        if row["mode"] in _NOT_PLOTTED or row.get("speedup") is None:
            continue
        series.setdefault(row["target"], {}).setdefault(row["mode"], []).append((row["seq"], row["speedup"]))
    for modes in series.values():
        for points in modes.values():
            points.sort()
    return series


def _seq_label(seq: int) -> str:
    return f"{seq // 1024}K" if seq % 1024 == 0 else f"{seq:,}"


def plot_speedups(results: dict[str, Any], path: str | Path) -> None:
    """One panel per target, one line per mode: speed-up against `compiled` by sequence length."""
    series = speedup_series(results)
    targets = [t for t in results["config"]["targets"] if t in series] or ["layer"]
    fig = _figure(6.5 * len(targets), 4.5)
    axes = fig.subplots(1, len(targets), squeeze=False)[0]
    seqs = sorted({row["seq"] for row in results["rows"]})
    for ax, target in zip(axes, targets, strict=True):
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="compiled (baseline)")
        for mode, points in series.get(target, {}).items():
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqs, [_seq_label(s) for s in seqs])
        ax.minorticks_off()
        ax.set_xlabel("global sequence length (tokens)")
        ax.set_ylabel("speed-up vs compiled (higher is faster)")
        ax.set_title(target)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    meta, cfg = results["meta"], results["config"]
    fig.suptitle(f"hcms bench: {meta['world_size']} ranks, {meta['device']}, {cfg['heads']} heads x {cfg['head_dim']}, "
                 f"{cfg['dtype']}, {'forward+backward' if cfg['backward'] else 'forward'}", fontsize="medium")
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------
# lanes of one traced step
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    start_us: float
    dur_us: float
    kind: str  # comm, attention or other
    name: str


@dataclass(frozen=True)
class Lane:
    label: str
    boxes: tuple[Box, ...]


def _ordered(ident: Any) -> tuple[int, str]:
    # profiler ids are ints (streams, threads) or names: numbers first, in numeric order
    return (ident, "") if isinstance(ident, int) else (sys.maxsize, str(ident))


def trace_lanes(trace: dict[str, Any]) -> list[Lane]:
    """The step's GPU kernels by stream or, in a CPU-only trace, its ops by thread."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    chosen = gpu or [e for e in events if e.get("cat") in CPU_CATEGORIES and e["name"] != STEP_MARKER]
    grouped: dict[tuple[tuple[int, str], ...], list[Box]] = {}
    labels: dict[tuple[tuple[int, str], ...], str] = {}
    for e in chosen:
        key = (_ordered(e.get("pid")), _ordered(e.get("tid")))
        args = e.get("args", {})
        labels[key] = (f"GPU {args.get('device', e.get('pid'))} stream {args.get('stream', e.get('tid'))}" if gpu
                       else f"thread {e.get('tid')}")
        grouped.setdefault(key, []).append(Box(float(e["ts"]), float(e["dur"]), classify(e["name"]), e["name"]))
    return [Lane(labels[key], tuple(sorted(grouped[key], key=lambda b: b.start_us))) for key in sorted(grouped)]


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def overlap_us(lanes: list[Lane]) -> float:
    """Time during which some comm box and some attention box run at once (on GPU: on other streams)."""
    def spans(kind: str) -> list[tuple[float, float]]:
        return _union([(b.start_us, b.start_us + b.dur_us) for lane in lanes for b in lane.boxes if b.kind == kind])

    comm, attention = spans("comm"), spans("attention")
    return sum(max(0.0, min(ce, ae) - max(cs, as_)) for cs, ce in comm for as_, ae in attention)


def _ranked_lanes(trace: dict[str, Any], several: bool) -> list[Lane]:
    """The trace's lanes on the host clock (profiler timestamps are relative to the trace's base time),
    labelled with the rank when several ranks share the picture."""
    base_us = trace.get("baseTimeNanoseconds", 0) / 1e3
    rank = trace.get("hcmsBench", {}).get("rank", 0)
    return [Lane(f"rank {rank}: {lane.label}" if several else lane.label,
                 tuple(replace(b, start_us=b.start_us + base_us) for b in lane.boxes))
            for lane in trace_lanes(trace)]


def plot_trace(trace_paths: str | Path | Sequence[str | Path], path: str | Path) -> None:
    """One lane per GPU stream (or CPU thread) over one step; with several ranks' traces, every rank's
    lanes on one time axis (the host clock: ranks of one host line up, so waits on a late peer show)."""
    paths = [trace_paths] if isinstance(trace_paths, str | Path) else list(trace_paths)
    traces = [json.loads(Path(p).read_text()) for p in paths]
    per_rank = [_ranked_lanes(trace, several=len(traces) > 1) for trace in traces]
    for p, lanes in zip(paths, per_rank, strict=True):
        if not lanes:
            raise ValueError(f"{p}: no kernel or op events to draw")
    lanes = [lane for rank_lanes in per_rank for lane in rank_lanes]
    t0 = min(b.start_us for lane in lanes for b in lane.boxes)
    fig = _figure(12, 1.2 + 0.55 * len(lanes))
    ax = fig.subplots()
    for y, lane in enumerate(lanes):
        # grey first, so that comm and attention boxes stay visible where CPU ops nest
        for kind in ("other", "comm", "attention"):
            boxes = [((b.start_us - t0) / 1e3, b.dur_us / 1e3) for b in lane.boxes if b.kind == kind]
            if boxes:
                ax.broken_barh(boxes, (y - 0.4, 0.8), facecolors=COLOURS[kind], edgecolor="black", linewidth=0.2)
    ax.set_yticks(range(len(lanes)), [lane.label for lane in lanes])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the first event")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=COLOURS[k], label=k) for k in ("comm", "attention", "other")],
              loc="upper right", fontsize="small")
    info = traces[0].get("hcmsBench", {})
    where = "GPU streams" if lanes[0].label.split(": ")[-1].startswith("GPU") else "CPU threads"
    overlap = ", ".join(f"{overlap_us(rank_lanes) / 1e3:.3f}" for rank_lanes in per_rank)
    whose = f"rank {info.get('rank', 0)}'s" if len(traces) == 1 else f"{len(traces)} ranks'"
    ax.set_title(f"{info.get('mode', '?')}, {info.get('target', '?')}, seq {info.get('seq', '?')}, "
                 f"world size {info.get('world_size', '?')}: {whose} {where}; "
                 f"comm overlapping attention {overlap} ms", fontsize="medium")
    fig.savefig(path, dpi=120)
