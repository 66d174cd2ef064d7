"""`hcms calibrate`: measure this machine's `DeviceProfile` on every rank, and make the ranks agree on it.

Terms
- timing: a warm-up, then the median of `repeats` runs, the runs of one kind taking turns; each
  all-to-all starts after a barrier (all ranks start it together), and every run ends after the
  device is synchronised (CUDA runs asynchronously).
- bytes crossing: bytes * (P-1)/P of an all-to-all buffer, the part that leaves the rank.
- agreement: ranks time things differently (a slower link, a busier core), but every rank must make
  the same plan from the same graph, or their collectives stop matching. `agree` takes the most
  pessimistic value of every number over the group (max of latencies, min of rates) and rank 0's
  name and source, so every rank holds the same profile, bit for bit.

Steps of `calibrate(group, sizes, repeats, device)`, run on every rank of an initialised group:
1. All-to-all: time `all_to_all_single` at each buffer size and fit time = latency + crossing /
   bandwidth by least squares (through the origin when noise makes the fit meaningless). At world
   size 1 nothing crosses, so the bandwidth is the built-in estimate's.
2. Attention: time SDPA at a tiny and at a large shape; the two give the fixed cost per call and
   the FLOP rate.
3. Copies: time a layout copy (a permuted `contiguous`) of a large tensor; read and write count.
4. Overlap (`_time_overlap`): attention alone, an all-to-all alone, the all-to-all launched on a
   side stream before the attention (sharing: gives the contention), and on CUDA one that becomes
   ready early in the attention (the persistent tail: it then starts only in the attention's last
   wave, timed with CUDA events). On gloo CPU ranks the exchange runs on a thread
   beside the attention, and persistent_attention is False. The model error is a fixed 5%: the
   model was checked against the recorded H200 benches (tests/test_cost_model.py) within 5% at 16K
   and longer, not derived from these timings.
5. Copy-engine exchange (`_time_copy_engine`, where `copy_engine.support` allows it): time
   `torch.ops.hcms.all_to_all` at each buffer size and a contiguous device copy (its local copies)
   in GPU time (`_medians(gpu_time=True)`: the host's ~0.4 ms of Python per call is queued behind a spin and
   not counted, as a compiled graph's host runs ahead); take the local copies off and fit latency +
   crossing / bandwidth to the rest.
   At world size 1 the block goes through the buffer (two local copies) and nothing crosses, so
   the bandwidth is the built-in estimate's. Elsewhere (CPU, gloo) the figures stay 0: unknown.
6. `agree` on the result.
7. `resolve_profile` (at compile time, not here) sets launch_order_dispatch from
   CUDA_DEVICE_MAX_CONNECTIONS (`profiles.with_dispatch_from_environment`).

`main_calibrate(args)` runs those steps under torchrun (RANK and WORLD_SIZE set; NCCL on CUDA) or
in `args.ranks` spawned CPU processes joined by gloo, and saves the profile where `load_profile`
looks for it: `$HCMS_PROFILE`, else `~/.cache/hcms_compile/profile-<device>-w<world>.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .passes.profiles import DeviceProfile, default_profile, with_dispatch_from_environment
from .spawn import spawn_gloo, under_torchrun

FORMAT = 1
MODEL_ERROR = 0.05
_WARMUP = 2
# per device type: all-to-all buffer bytes per rank, tokens of the large attention shape, copy bytes
_DEFAULT_SIZES = {"cpu": (1 << 16, 1 << 19, 1 << 21, 1 << 23), "cuda": (1 << 20, 1 << 23, 1 << 25, 1 << 27)}
_DEFAULT_TOKENS = {"cpu": 512, "cuda": 8192}
_COPY_BYTES = {"cpu": 1 << 26, "cuda": 1 << 28}  # past the caches
_ATTENTION_HEADS = {"cpu": 4, "cuda": 16}
_HEAD_DIM = {"cpu": 64, "cuda": 128}
_OVERLAP_HEADS = {"cpu": 4, "cuda": 40}  # a Wan-sized head count: cuDNN's persistent grid stays busy for ms
_READY_LATER_CYCLES = 200_000  # about 0.1 ms on a Hopper clock: well inside a 40-head 8K attention (2 ms)


# -- devices and paths ---------------------------------------------------------------------------


def device_slug(device: torch.device) -> str:
    """"cpu", or the CUDA device's name in lower case with dashes: "nvidia-h200"."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def profile_path(device: str, world_size: int | None) -> Path:
    """Where a profile is saved and looked for: `$HCMS_PROFILE`, else one file per device and world size."""
    override = os.environ.get("HCMS_PROFILE")
    if override:
        return Path(override).expanduser()
    world = f"-w{world_size}" if world_size is not None else ""
    return Path.home() / ".cache" / "hcms_compile" / f"profile-{device}{world}.json"


def save_profile(profile: DeviceProfile, path: str | os.PathLike[str] | None = None) -> Path:
    """Write `profile` as JSON (with the torch version and the date); returns the path written."""
    target = Path(path) if path is not None else profile_path(profile.name, profile.world_size)
    target.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT, "torch": torch.__version__,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "world_size": profile.world_size, "profile": profile.to_json()}
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    partial.replace(target)  # readers never see half a file
    return target


def load_profile(path: str | os.PathLike[str] | None = None, *, device: str | None = None,
                 world_size: int | None = None) -> DeviceProfile | None:
    """The saved profile, or None when there is none.

    Without `path`: `$HCMS_PROFILE`, else the file for `device` (this process's: "cpu" or the CUDA
    device's slug) and `world_size` (the default group's, when one is initialised).
    """
    if path is None:
        env = os.environ.get("HCMS_PROFILE")
        if env and not Path(env).expanduser().is_file():
            raise FileNotFoundError(f"HCMS_PROFILE={env!r} names no file: unset it, or run `hcms calibrate` to "
                                    "measure a profile and save it there")
        if device is None:
            device = device_slug(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        if world_size is None and dist.is_initialized():
            world_size = dist.get_world_size()
        path = profile_path(device, world_size)
    source = Path(path)
    if not source.is_file():
        return None
    try:
        record = json.loads(source.read_text())
        if record.get("format") != FORMAT:
            raise ValueError(f"format {record.get('format')!r}, this version reads format {FORMAT}")
        return DeviceProfile.from_json(record["profile"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{source} is not a saved hcms profile: {err}") from None


def resolve_profile(profile: DeviceProfile | str | os.PathLike[str] | None, device: torch.device,
                    world_size: int | None) -> DeviceProfile:
    """The profile the planner uses for an all-to-all over `world_size` ranks on `device`: `profile`
    itself, or the file it names; else `$HCMS_PROFILE`; else the one `hcms calibrate` saved for this
    device and world size; else the built-in estimate for the device.

    A profile measured for another device or world size would plan with wrong numbers: one the user
    chose (`profile`, `$HCMS_PROFILE`) is an error naming both; a saved file that does not fit its
    own name (copied from elsewhere) gives a warning and the built-in estimate.
    """
    if profile is not None:
        chosen = profile if isinstance(profile, DeviceProfile) else load_profile(profile)
        if chosen is None:
            raise FileNotFoundError(f"no hcms profile at {profile}")
        mismatch = profile_mismatch(chosen, device, world_size)
        if mismatch:
            raise ValueError(f"profile={profile if not isinstance(profile, DeviceProfile) else chosen.name!r} "
                             f"does not fit this graph: {mismatch}")
        return with_dispatch_from_environment(chosen)
    found = load_profile(device=device_slug(device), world_size=world_size)
    mismatch = profile_mismatch(found, device, world_size) if found is not None else ""
    if mismatch and os.environ.get("HCMS_PROFILE"):
        raise ValueError(f"HCMS_PROFILE={os.environ['HCMS_PROFILE']!r} does not fit this graph: {mismatch}")
    if found is not None and not mismatch:
        return with_dispatch_from_environment(found)
    kind = "cuda" if device.type == "cuda" else "cpu"
    name = torch.cuda.get_device_name(device) if kind == "cuda" else ""
    builtin = default_profile(kind, name, _interconnect(device, world_size or 1))
    if mismatch:
        warnings.warn(f"the saved hcms profile {profile_path(device_slug(device), world_size)} does not fit this "
                      f"graph ({mismatch}); planning with the built-in estimate {builtin.name} instead",
                      stacklevel=2)
    return with_dispatch_from_environment(builtin)


def profile_mismatch(profile: DeviceProfile, device: torch.device, world_size: int | None) -> str:
    """Why `profile` was not measured for all-to-alls over `world_size` ranks on `device`; "" when it was.
    Built-in estimates are named by kind, not by device, so only measured profiles are checked by device."""
    problems = []
    if profile.world_size is not None and world_size is not None and profile.world_size != world_size:
        problems.append(f"{profile.name} was calibrated at world size {profile.world_size}, and the all-to-all "
                        f"here runs over {world_size} ranks")
    if not profile.estimate and device.type in ("cpu", "cuda") and profile.name != device_slug(device):
        problems.append(f"{profile.name} was calibrated on another device than this graph's {device_slug(device)}")
    if problems:
        problems.append(f"run `hcms calibrate` with {world_size or 'this many'} ranks on this device, or pass "
                        "a profile that fits")
    return "; ".join(problems)


def render_profile(profile: DeviceProfile) -> str:
    rows = [
        ("all-to-all bandwidth", f"{profile.a2a_bandwidth / 1e9:.3g} GB/s crossing"),
        ("all-to-all latency", f"{profile.a2a_latency * 1e6:.3g} us"),
        ("attention", f"{profile.attention_flops / 1e12:.3g} TFLOP/s"),
        ("attention latency", f"{profile.attention_latency * 1e6:.3g} us"),
        ("copy bandwidth", f"{profile.copy_bandwidth / 1e9:.3g} GB/s read+write"),
        ("contention", f"{profile.contention:.2f}"),
        ("persistent attention", str(profile.persistent_attention)),
        ("all-to-all on copy engines", str(profile.copy_engine_exchange)),
        ("copy-engine exchange", "unknown" if not profile.copy_engine_bandwidth else
         f"{profile.copy_engine_bandwidth / 1e9:.3g} GB/s crossing, {profile.copy_engine_latency * 1e6:.3g} us, "
         f"local copies {profile.copy_engine_local_bandwidth / 1e9:.3g} GB/s read+write"),
        ("launch-order dispatch", str(profile.launch_order_dispatch)),
        ("model error", f"{profile.model_error:.1%}"),
        ("world size", str(profile.world_size)),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"profile {profile.name} ({'estimate' if profile.estimate else 'measured'})"]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines) + f"\n  source: {profile.source}"


# -- steps 1-3: timings ----------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_SPIN_CYCLES = 4_000_000  # about 2 ms of GPU clock: longer than the host needs to queue one exchange


def _medians(runs: Sequence[Callable[[], object]], repeats: int, device: torch.device,
             group: dist.ProcessGroup | None = None, gpu_time: bool = False) -> list[float]:
    """Median seconds of each run; the runs take turns, so a passing disturbance hits them all alike.

    By default a run is timed with the host clock up to a synchronize. With `gpu_time` it is timed with
    CUDA events behind a spin kernel: the host queues the run while the GPU spins, so the host's own
    time per call (Python, driver calls) is not counted, as in a compiled graph whose host runs ahead."""
    for _ in range(_WARMUP):
        for run in runs:
            run()
    _sync(device)
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, samples in zip(runs, times, strict=True):
            if group is not None:
                dist.barrier(group=group)
            samples.append(_gpu_seconds(run) if gpu_time else _host_seconds(run, device))
    return [statistics.median(samples) for samples in times]


def _host_seconds(run: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    run()
    _sync(device)
    return time.perf_counter() - start


def _gpu_seconds(run: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(_SPIN_CYCLES)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line; through the origin when either comes out non-positive."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx > 0:
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
        intercept = mean_y - slope * mean_x
        if slope > 0 and intercept >= 0:
            return intercept, slope
    return 0.0, sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)


def _group_device(group: dist.ProcessGroup) -> torch.device:
    """Where the group's collectives take tensors: CUDA for NCCL, the CPU for gloo."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _time_all_to_all(group: dist.ProcessGroup, sizes: Sequence[int], repeats: int) -> tuple[float, float | None]:
    """(latency, bandwidth) of an all-to-all; the bandwidth is None at world size 1, where nothing crosses."""
    world = dist.get_world_size(group)
    device = _group_device(group)
    numels = [max(world, size // 4 // world * world) for size in sizes]  # float32, an even split over the ranks
    buffers = [(torch.ones(n, device=device), torch.empty(n, device=device)) for n in numels]
    runs = [lambda s=send, r=recv: dist.all_to_all_single(r, s, group=group) for send, recv in buffers]
    times = _medians(runs, repeats, device, group)
    if world == 1:  # a local copy: its fixed cost is the latency, its rate says nothing of a link
        return _fit_line([n * 4 for n in numels], times)[0], None
    latency, slope = _fit_line([n * 4 * (world - 1) / world for n in numels], times)
    return latency, 1 / slope


def _time_copy_engine(group: dist.ProcessGroup, device: torch.device, sizes: Sequence[int],
                      repeats: int) -> tuple[float, float | None, float] | None:
    """(latency, crossing bandwidth or None at world size 1, local read+write bandwidth) of the
    copy-engine exchange, or None where it cannot run on `group`."""
    from . import copy_engine

    if device.type != "cuda" or copy_engine.support(group.group_name, device) is not None:
        return None
    world = dist.get_world_size(group)
    numels = [max(world, size // 4 // world * world) for size in sizes]
    inputs = [torch.ones(n, device=device) for n in numels]
    wait = torch.ops._c10d_functional.wait_tensor
    runs = [lambda x=x: wait(torch.ops.hcms.all_to_all(x, group.group_name)) for x in inputs]
    times = _medians(runs, repeats, device, group, gpu_time=True)
    source, target = torch.ones(max(numels), device=device), torch.empty(max(numels), device=device)
    (copy_s,) = _medians([lambda: target.copy_(source)], repeats, device, gpu_time=True)
    local_bandwidth = 2 * source.numel() * 4 / copy_s
    copies = 2 if world == 1 else 1  # the staged blocks and the own block; at world size 1, both of the one block
    rest = [t - 2 * copies * n * 4 / local_bandwidth for t, n in zip(times, numels, strict=True)]
    if world == 1:
        return max(0.0, _fit_line([n * 4 for n in numels], times)[0]), None, local_bandwidth
    latency, slope = _fit_line([n * 4 * (world - 1) / world for n in numels], rest)
    return latency, 1 / slope, local_bandwidth


def _time_attention(device: torch.device, kind: str, tokens: int, repeats: int) -> tuple[float, float, str]:
    """(fixed seconds per call, FLOP/s, what was timed) on `device`, of `kind` cpu or cuda."""
    dtype = torch.bfloat16 if kind == "cuda" else torch.float32
    heads, dim = _ATTENTION_HEADS[kind], _HEAD_DIM[kind]
    shapes = [(1, 1, min(64, tokens), dim), (1, heads, tokens, dim)]
    inputs = [[torch.randn(shape, device=device, dtype=dtype) for _ in range(3)] for shape in shapes]
    runs = [lambda qkv=qkv: F.scaled_dot_product_attention(*qkv) for qkv in inputs]
    times = _medians(runs, repeats, device)
    flops = [4.0 * b * h * s * s * d for b, h, s, d in shapes]
    latency, per_flop = _fit_line(flops, times)
    what = f"SDPA {str(dtype).removeprefix('torch.')} at B,H,S,D = {shapes[0]} and {shapes[1]}"
    return latency, 1 / per_flop, what


def _time_copy(device: torch.device, nbytes: int, repeats: int) -> float:
    """Read+write bytes per second of a permuted copy, the kind layout ops make."""
    x = torch.ones(4, max(1, nbytes // 4 // 4 // 64), 64, device=device)
    (seconds,) = _medians([lambda: x.permute(1, 0, 2).contiguous()], repeats, device)
    return 2 * x.numel() * x.element_size() / seconds


def _time_overlap(group: dist.ProcessGroup, device: torch.device, kind: str, tokens: int, nbytes: int,
                  repeats: int) -> tuple[float, bool, str]:
    """Step 4: (contention, persistent attention, what was timed).

    Three runs take turns: attention alone (t_att), the all-to-all alone (t_comm), and the all-to-all
    launched on a side stream BEFORE the attention (t_before). contention = (t_before - max(t_att,
    t_comm)) / min(t_att, t_comm), clipped to [0, 1]: the share of the overlapped time that the pair did
    not save (0: perfect overlap, 1: as slow as one after the other). Then, on CUDA, an all-to-all on
    the side stream that becomes ready while the attention runs (a short sleep after the attention's
    start): the attention is persistent when that exchange starts (its end, timed with CUDA events,
    less t_comm) in the attention's second half, i.e. it waited for the attention's SMs. On the CPU
    there are no streams: the all-to-all runs on a thread beside the attention, and no kernel owns the
    cores.
    """
    import threading

    dtype = torch.bfloat16 if kind == "cuda" else torch.float32
    qkv = [torch.randn(1, _OVERLAP_HEADS[kind], tokens, _HEAD_DIM[kind], device=device, dtype=dtype)
           for _ in range(3)]
    world = dist.get_world_size(group)
    numel = max(world, nbytes // 4 // world * world)
    send, recv = torch.ones(numel, device=device), torch.empty(numel, device=device)

    def attention() -> None:
        F.scaled_dot_product_attention(*qkv)

    def exchange() -> None:
        dist.all_to_all_single(recv, send, group=group)

    if kind == "cuda":
        side = torch.cuda.Stream(device)

        def on_side() -> None:
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                exchange()

        def before() -> None:
            on_side()
            attention()
            torch.cuda.current_stream(device).wait_stream(side)

        def tail_lag() -> tuple[float, float]:
            """When the attention and an exchange that became ready early in it end, from its start (s)."""
            main = torch.cuda.current_stream(device)
            begin, attention_end, exchange_end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            begin.record(main)
            attention()
            attention_end.record(main)
            with torch.cuda.stream(side):
                side.wait_event(begin)
                torch.cuda._sleep(_READY_LATER_CYCLES)  # ready once the attention holds the GPU, not before
                exchange()
                exchange_end.record(side)
            main.wait_stream(side)
            exchange_end.synchronize()
            return begin.elapsed_time(attention_end) / 1e3, begin.elapsed_time(exchange_end) / 1e3
    else:
        def before() -> None:
            thread = threading.Thread(target=exchange)
            thread.start()
            attention()
            thread.join()

    t_att, t_comm, t_before = _medians([attention, exchange, before], repeats, device, group)
    short, long = sorted((t_att, t_comm))
    contention = min(1.0, max(0.0, (t_before - long) / short)) if short > 0 else 0.0
    if kind != "cuda":
        return contention, False, (
            f"overlap of a {numel * 4} B all-to-all with that attention: alone {t_att * 1e3:.3g} ms and "
            f"{t_comm * 1e3:.3g} ms, together {t_before * 1e3:.3g} ms (CPU: the exchange on a thread; no streams, "
            "no persistent kernels)")
    for _ in range(_WARMUP):
        tail_lag()
    ends = []
    for _ in range(repeats):
        dist.barrier(group=group)
        ends.append(tail_lag())
    attention_end = statistics.median(end for end, _ in ends)
    exchange_start = statistics.median(end for _, end in ends) - t_comm
    # ready about 0.1 ms into the attention: one that ran beside it starts then, one that waited for
    # the attention's SMs starts in its last wave
    persistent = exchange_start > 0.5 * attention_end
    what = (f"overlap of a {numel * 4} B all-to-all with that attention: alone {t_att * 1e3:.3g} ms and "
            f"{t_comm * 1e3:.3g} ms, exchange first {t_before * 1e3:.3g} ms; an exchange ready 0.1 ms into the "
            f"attention started about {exchange_start * 1e3:.3g} ms into it (attention {attention_end * 1e3:.3g} ms)")
    return contention, persistent, what


# -- steps 5-6 -------------------------------------------------------------------------------------


def _interconnect(device: torch.device, world: int) -> str:
    # torch cannot tell NVLink from PCIe; a group larger than one host's ranks crosses the network
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return "ib" if device.type == "cuda" and local < world else "nvlink"


def calibrate(group: dist.ProcessGroup | None = None, sizes: Sequence[int] | None = None, repeats: int = 5,
              device: torch.device | str | None = None, *, attention_tokens: int | None = None,
              interconnect: str | None = None) -> DeviceProfile:
    """Measure a profile on every rank of `group` (default: the world); every rank returns the same one.

    `sizes` are all-to-all buffer bytes per rank; `device` (default: the group's) runs attention and
    copies; `interconnect` (nvlink, pcie, ib) picks the built-in contention estimate.
    """
    group = group if group is not None else dist.group.WORLD
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device) if device is not None else _group_device(group)
    kind = "cuda" if device.type == "cuda" else "cpu"
    sizes = tuple(sizes) if sizes is not None else _DEFAULT_SIZES[kind]
    if not sizes or any(s < 4 for s in sizes):
        raise ValueError(f"sizes must be all-to-all buffer sizes of at least 4 bytes, got {sizes}")
    tokens = attention_tokens or _DEFAULT_TOKENS[kind]
    world = dist.get_world_size(group)
    builtin = default_profile(kind, torch.cuda.get_device_name(device) if kind == "cuda" else "",
                              interconnect or _interconnect(device, world))

    a2a_latency, a2a_bandwidth = _time_all_to_all(group, sizes, repeats)
    attention_latency, attention_flops, attention_what = _time_attention(device, kind, tokens, repeats)
    copy_bandwidth = _time_copy(device, min(_COPY_BYTES[kind], 64 * max(sizes)), repeats)
    # a mid-sized exchange beside a long attention: the tail of a persistent kernel shows only when the
    # attention outlasts the exchange (with the largest buffer at world size 1 it was the other way round)
    overlap_bytes = sorted(sizes)[len(sizes) // 2]
    contention, persistent, overlap_what = _time_overlap(group, device, kind, tokens, overlap_bytes, repeats)

    copy_engine = _time_copy_engine(group, device, sizes, repeats)
    if copy_engine is None:
        copy_engine_what, copy_engine = "no copy-engine exchange on this group", (0.0, 0.0, 0.0)
    elif copy_engine[1] is None:
        copy_engine_what = ("copy-engine exchange latency and local copies measured; at world size 1 nothing crosses, "
                            f"so its bandwidth is {builtin.name}'s estimate")
        copy_engine = (copy_engine[0], builtin.copy_engine_bandwidth, copy_engine[2])
    else:
        copy_engine_what = "copy-engine exchange fitted over the same buffers"
    if a2a_bandwidth is None:
        a2a_bandwidth = builtin.a2a_bandwidth
        exchange_what = f"all-to-all latency from buffers of {list(sizes)} bytes; at world size 1 nothing " \
                        f"crosses, so the bandwidth is {builtin.name}'s estimate"
    else:
        exchange_what = f"all-to-all fitted over buffers of {list(sizes)} bytes per rank"
    profile = DeviceProfile(
        name=device_slug(device), a2a_bandwidth=a2a_bandwidth, a2a_latency=a2a_latency,
        attention_flops=attention_flops, attention_latency=attention_latency, copy_bandwidth=copy_bandwidth,
        contention=contention, model_error=MODEL_ERROR, estimate=False,
        world_size=world, persistent_attention=persistent,
        copy_engine_exchange=False,  # NCCL's and gloo's all-to-alls: SM kernels or CPU threads
        copy_engine_latency=copy_engine[0], copy_engine_bandwidth=copy_engine[1],
        copy_engine_local_bandwidth=copy_engine[2],
        source=(f"measured by hcms calibrate on {world} rank(s) over {dist.get_backend(group)}, torch "
                f"{torch.__version__}, median of {repeats}: {exchange_what}; {attention_what}; a permuted copy; "
                f"{overlap_what}; {copy_engine_what}; slowest rank's figures"),
    )
    return agree(profile, group)


def agree(profile: DeviceProfile, group: dist.ProcessGroup | None = None) -> DeviceProfile:
    """The same profile on every rank: the largest latencies, contention and error, the smallest rates.

    Max and min are exact, so every rank ends with bitwise-equal numbers and hence the same plans.
    """
    group = group if group is not None else dist.group.WORLD
    device = _group_device(group)
    # one MAX reduction: rates enter negated, so their max is minus the smallest rate
    # (a copy-engine rate of 0, unknown on some rank, stays 0 for all)
    values = torch.tensor([profile.a2a_latency, profile.attention_latency, profile.contention, profile.model_error,
                           float(profile.estimate), profile.copy_engine_latency, -profile.a2a_bandwidth,
                           -profile.attention_flops, -profile.copy_bandwidth, -profile.copy_engine_bandwidth,
                           -profile.copy_engine_local_bandwidth], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
    a2a_latency, attention_latency, contention, model_error, estimate, ce_latency, *rates = values.tolist()
    a2a_bandwidth, attention_flops, copy_bandwidth, ce_bandwidth, ce_local = (-rate for rate in rates)
    # the remaining fields (scheduling facts, per-call costs) are rank 0's: facts of the kind of device
    first = _broadcast_profile(profile, group, device)
    return dataclasses.replace(first, a2a_bandwidth=a2a_bandwidth, a2a_latency=a2a_latency,
                               attention_flops=attention_flops, attention_latency=attention_latency,
                               copy_bandwidth=copy_bandwidth, contention=contention, model_error=model_error,
                               estimate=bool(estimate), copy_engine_latency=ce_latency,
                               copy_engine_bandwidth=ce_bandwidth, copy_engine_local_bandwidth=ce_local)


def _broadcast_profile(profile: DeviceProfile, group: dist.ProcessGroup, device: torch.device) -> DeviceProfile:
    """Rank 0's profile on every rank, sent as its JSON bytes (`broadcast_object_list` would need numpy,
    which hcms_compile does not depend on)."""
    data = json.dumps(profile.to_json(), sort_keys=True).encode() if dist.get_rank(group) == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, group=group, group_src=0)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if data:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, group=group, group_src=0)
    return DeviceProfile.from_json(json.loads(bytes(buffer.cpu().tolist())))


# -- the command -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrateArgs:
    ranks: int = 2  # spawned CPU ranks when not under torchrun
    sizes: tuple[int, ...] | None = None
    repeats: int = 5
    attention_tokens: int | None = None
    interconnect: str | None = None
    backend: str | None = None  # under torchrun; default NCCL where CUDA is available, else gloo
    out: str | None = None  # where to save; default `profile_path`


def _measure(args: CalibrateArgs) -> DeviceProfile:
    return calibrate(sizes=args.sizes, repeats=args.repeats, attention_tokens=args.attention_tokens,
                     interconnect=args.interconnect)


def _torchrun_main(args: CalibrateArgs) -> DeviceProfile:
    started = not dist.is_initialized()
    if started:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(args.backend or ("nccl" if cuda else "gloo"))
    profile = _measure(args)
    if dist.get_rank() == 0:
        path = save_profile(profile, args.out)
        print(f"{render_profile(profile)}\nsaved to {path}")
    if started:
        dist.barrier()
        dist.destroy_process_group()
    return profile


def _spawned_rank(rank: int, args: CalibrateArgs, path: str) -> None:
    profile = _measure(args)
    if rank == 0:
        save_profile(profile, path)
        print(f"{render_profile(profile)}\nsaved to {path}")


def main_calibrate(args: CalibrateArgs) -> DeviceProfile:
    """Calibrate under torchrun, or on `args.ranks` spawned gloo CPU processes; save and return the profile."""
    if under_torchrun():
        return _torchrun_main(args)
    if args.ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {args.ranks}")
    path = Path(args.out) if args.out is not None else profile_path("cpu", args.ranks)
    spawn_gloo(_spawned_rank, args.ranks, args, str(path))  # one core per rank, as `hcms demo` runs them
    profile = load_profile(path)
    if profile is None:
        raise RuntimeError(f"calibration finished but wrote no profile to {path}")
    return profile

