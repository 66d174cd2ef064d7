"""Device profiles: the few numbers the cost model needs about a machine and its interconnect.

Terms
- profile: `DeviceProfile`, one machine kind at one world size: how fast an all-to-all, an attention
  kernel and a layout copy run there, how much overlapped communication slows compute down
  (contention), and how far predictions may be off (model error, the planner's margin).
- bytes crossing: the part of an all-to-all buffer that leaves the rank, bytes * (P-1)/P; the rest
  stays local. An all-to-all takes `a2a_latency + bytes_crossing / a2a_bandwidth`.
- contention: with NCCL the all-to-all runs as kernels that occupy SMs, so attention running beside
  it is slower (BACKGROUND.md: flashinfer's overlap lost on full NVLink for that reason). Modelled as
  compute progressing at rate 1 - contention while an exchange is in flight: overlapped
  communication time t adds contention * t to compute.
- scheduling facts (shared/PERFORMANCE.md, section 2): `persistent_attention` (the attention kernel owns
  every SM: an exchange that becomes ready while it runs waits for its tail; True for the H100/H200
  built-ins, cuDNN SDPA bf16), `copy_engine_exchange` (exchanges need no SMs: never blocked, no
  contention; False for NCCL and gloo), `launch_order_dispatch` (CUDA_DEVICE_MAX_CONNECTIONS=1:
  kernels dispatch in host launch order; a property of the running process, so the backend sets it
  from the environment when it resolves the profile: `with_dispatch_from_environment`).
  With persistent attention, `contention` applies to an SM exchange that was already running when
  the attention started (they share the SMs).
- per-call costs: `a2a_latency` per all-to-all call, `attention_latency` per attention kernel,
  `copy_latency` per layout-copy kernel; `a2a_local_bandwidth` charges the 1/P of a buffer that
  stays on the rank (the whole buffer at world size 1), 0 meaning free.
- copy-engine figures: `copy_engine_bandwidth`, `copy_engine_latency`, `copy_engine_local_bandwidth`
  price `torch.ops.hcms.all_to_all` (hcms_compile/copy_engine.py): peer-to-peer copies, a fixed cost
  per call (its copies and stream memory operations are issued from the host), and the local copies
  it makes (staging the peers' blocks, the own block; these run on the SMs). Bandwidth 0 means
  unknown (CPU, a profile saved before them): the exchange is then priced as the all-to-all.
- estimate: a built-in profile whose numbers come from data sheets and BACKGROUND.md, not from this
  machine; `hcms calibrate` (hcms_compile/calibrate.py) measures a real one.

Steps of `default_profile(device_type, device_name, interconnect)`:
1. CPU devices get the gloo profile, whatever the interconnect.
2. CUDA devices are recognised by name (H100, H200); anything else gets H100 figures, renamed, with
   a `source` saying so.
3. The interconnect (nvlink, pcie, ib) picks the exchange figures and the contention.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

INTERCONNECTS = ("nvlink", "pcie", "ib")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    a2a_bandwidth: float  # bytes/s crossing the network for one rank in an all-to-all
    a2a_latency: float  # s per all-to-all call
    attention_flops: float  # FLOP/s of the attention kernel
    attention_latency: float  # s of fixed cost per attention kernel call
    copy_bandwidth: float  # bytes/s read plus written by a layout copy: copying N bytes takes 2N / this
    contention: float  # in [0, 1]: fraction of overlapped communication time added to compute
    model_error: float  # relative error of predictions; a chunking must win by more than this
    estimate: bool  # True for built-in guesses, False for measured profiles
    source: str  # how the numbers were obtained
    world_size: int | None = None  # the world size the profile was measured at, if measured
    # -- scheduling facts (shared/PERFORMANCE.md, section 2); defaults keep profiles saved before them loading --
    persistent_attention: bool = False  # the attention kernel owns every SM (cuDNN SDPA bf16 on Hopper)
    copy_engine_exchange: bool = False  # exchanges run on copy engines, not as SM kernels (NCCL: False)
    launch_order_dispatch: bool = False  # kernels dispatch in host launch order (CUDA_DEVICE_MAX_CONNECTIONS=1)
    # -- per-call costs --
    copy_latency: float = 0.0  # s of fixed cost per layout-copy kernel
    a2a_local_bandwidth: float = 0.0  # bytes/s read+write of the part of a buffer that stays on the rank; 0: free
    # -- the copy-engine exchange (exchanges.COPY_ENGINE); bandwidth 0: unknown, priced as the group's own --
    copy_engine_bandwidth: float = 0.0  # bytes/s crossing for one rank, peer-to-peer copy-engine transfers
    copy_engine_latency: float = 0.0  # s per exchange call: host-issued copies and stream memory operations
    copy_engine_local_bandwidth: float = 0.0  # bytes/s read+write of its local copies (staging, own block)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"DeviceProfile.name must be a non-empty string, got {self.name!r}")
        for field in ("a2a_bandwidth", "attention_flops", "copy_bandwidth"):
            _check_number(field, getattr(self, field), positive=True)
        for field in ("a2a_latency", "attention_latency", "model_error", "copy_latency", "a2a_local_bandwidth",
                      "copy_engine_bandwidth", "copy_engine_latency", "copy_engine_local_bandwidth"):
            _check_number(field, getattr(self, field), positive=False)
        _check_number("contention", self.contention, positive=False)
        if self.contention > 1:
            raise ValueError(f"DeviceProfile.contention must be in [0, 1], got {self.contention!r}")
        for field in ("estimate", "persistent_attention", "copy_engine_exchange", "launch_order_dispatch"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"DeviceProfile.{field} must be a bool, got {getattr(self, field)!r}")
        if not isinstance(self.source, str):
            raise ValueError(f"DeviceProfile.source must be a string, got {self.source!r}")
        ws = self.world_size
        if ws is not None and (not isinstance(ws, int) or isinstance(ws, bool) or ws < 1):
            raise ValueError(f"DeviceProfile.world_size must be None or an int >= 1, got {ws!r}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceProfile:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown DeviceProfile field(s) {unknown}; expected {sorted(names)}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"DeviceProfile is missing field(s) {missing}")
        return cls(**data)


def _check_number(field: str, value: Any, positive: bool) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not is_number or value < 0 or (positive and value == 0):
        want = "a finite number > 0" if positive else "a finite number >= 0"
        raise ValueError(f"DeviceProfile.{field} must be {want}, got {value!r}")


# -- built-in estimates ---------------------------------------------------------------------------

# Attention: BACKGROUND.md measured cuDNN bf16 attention at 560-680 TFLOP/s on one H200 (H=40, D=128,
# 16K-56K tokens), and `hcms calibrate` 685-694 TFLOP/s (H=16, D=128, 8192 tokens, torch 2.11). The H100 SXM
# has the same GH100 compute (132 SMs, 989 TFLOP/s dense bf16) and the kernel is compute-bound at these
# lengths, so both use 600 TFLOP/s, the low side: causal masks and short sequences run slower.
_HOPPER_ATTENTION = 600e12
_ATTENTION_LATENCY = 10e-6  # a launch plus a partly filled last wave, inside a compiled graph
# Layout copies are permuted copies: `hcms calibrate` measured 2.5 TB/s read+write on an H200 (of 4.8 TB/s
# HBM3e); the H100's is scaled by its 3.35 TB/s of HBM3.
_COPY = {"h100": 1.75e12, "h200": 2.5e12}
_LINKS = {  # interconnect: (bandwidth, latency, contention, what the numbers are)
    "nvlink": (360e9, 35e-6, 0.35,
               "NVLink 4 moves about 450 GB/s per direction per GPU; NCCL all-to-all reaches about 80% "
               "of it (360 GB/s); 35 us per call is the top of the 28-36 us `hcms calibrate` measured for "
               "NCCL's all-to-all at world size 1 on an H200 (launch, synchronise), a floor for more ranks. "
               "Contention 0.35: NCCL drives NVLink with SM-resident kernels that take SMs from attention "
               "(flashinfer #5027 lost 7% overlapping on NVLink for that reason)"),
    "pcie": (40e9, 40e-6, 0.15,
             "PCIe Gen5 x16 carries about 50 GB/s per direction in practice; GPUs of one host share "
             "switch uplinks in an all-to-all, so 40 GB/s is assumed. Contention 0.15: at this rate "
             "NCCL runs few channels and takes few SMs"),
    "ib": (45e9, 60e-6, 0.15,
           "one 400 Gb/s NDR InfiniBand NIC per GPU gives about 45 GB/s per direction after protocol "
           "overhead; latency is higher across nodes. Contention 0.15: NCCL's network path uses few SMs"),
}
# The copy-engine exchange: PERFORMANCE.md has copy engines at about NCCL's NVLink bandwidth (370-380 GB/s
# per direction on an H100); over PCIe peer-to-peer they move what the link moves. Its local copies (the
# blocks it stages, its own block) are contiguous cudaMemcpyAsync: 256 MiB took 126-166 us on the H200
# (3.2-4.3 TB/s read+write; the H100's scaled by HBM bandwidth). 20 us per call: `hcms calibrate` measured 9.9 us
# of GPU time at world size 1, doubled for the signals of several peers. Across nodes it does not run.
_COPY_ENGINE = {"nvlink": 370e9, "pcie": 40e9}
_COPY_ENGINE_LOCAL = {"h100": 2.2e12, "h200": 3.2e12}
_COPY_ENGINE_LATENCY = 20e-6
_ESTIMATE_ERROR = 0.10  # built-in guesses: a chunking must be predicted >10% faster to be chosen

# Measured on the 2-core development machine with `hcms calibrate` (2 gloo ranks, one thread each, three
# runs) and rounded: all-to-all 1.6-1.75 GB/s crossing and 50-170 us, SDPA 40 GFLOP/s, permuted copies
# of 64 MB 2.5-3 GB/s read+write; the fitted fixed cost of SDPA came out near zero, so 10 us is assumed.
_CPU_GLOO = dict(a2a_bandwidth=1.5e9, a2a_latency=100e-6, attention_flops=40e9, attention_latency=10e-6,
                 copy_bandwidth=2.5e9)


def _hopper(gpu: str, link: str) -> DeviceProfile:
    bandwidth, latency, contention, why = _LINKS[link]
    return DeviceProfile(
        name=f"{gpu}-{link}", a2a_bandwidth=bandwidth, a2a_latency=latency, attention_flops=_HOPPER_ATTENTION,
        attention_latency=_ATTENTION_LATENCY, copy_bandwidth=_COPY[gpu], contention=contention,
        model_error=_ESTIMATE_ERROR, estimate=True, persistent_attention=True,
        copy_engine_bandwidth=_COPY_ENGINE.get(link, 0.0),
        copy_engine_latency=_COPY_ENGINE_LATENCY if link in _COPY_ENGINE else 0.0,
        copy_engine_local_bandwidth=_COPY_ENGINE_LOCAL[gpu] if link in _COPY_ENGINE else 0.0,
        source=(f"built-in estimate for {gpu.upper()} over {link}: attention 600 TFLOP/s from BACKGROUND.md's "
                f"560-680 TFLOP/s measured on an H200; permuted copies at {_COPY[gpu] / 1e12:.2f} TB/s read+write "
                f"(measured on an H200{'' if gpu == 'h200' else ', scaled by HBM bandwidth'}); {why}. "
                "Run `hcms calibrate` for measured figures"),
    )


BUILTIN_PROFILES: dict[str, DeviceProfile] = {
    "cpu-gloo": DeviceProfile(
        name="cpu-gloo", **_CPU_GLOO, contention=0.8, model_error=_ESTIMATE_ERROR, estimate=True,
        source=("built-in estimate for CPU ranks over gloo, rounded from `hcms calibrate` on a 2-core machine "
                "(2 ranks, 1 thread each): all-to-all 1.5 GB/s crossing and 100 us per call, fp32 SDPA "
                "40 GFLOP/s per thread, permuted copies 2.5 GB/s read+write. Contention 0.8 is a guess, not "
                "measured: gloo moves bytes with CPU threads (copies, loopback TCP) on the cores attention uses"),
    ),
    **{f"{gpu}-{link}": _hopper(gpu, link) for gpu in ("h100", "h200") for link in INTERCONNECTS},
}


def with_dispatch_from_environment(profile: DeviceProfile, environ: Mapping[str, str] | None = None) -> DeviceProfile:
    """`profile` with `launch_order_dispatch` read from CUDA_DEVICE_MAX_CONNECTIONS, where that is set.

    The variable is read when the backend resolves the profile, not when it was measured: it is a
    property of the process that runs the compiled graph. Unset, the profile's own value stands (a
    profile the user built by hand keeps what it says); "1" means one hardware queue, so kernels
    dispatch in host launch order; any other value means several queues. Every rank of a job is
    normally started with the same environment, so every rank still holds the same profile.
    """
    value = (os.environ if environ is None else environ).get("CUDA_DEVICE_MAX_CONNECTIONS")
    if value is None:
        return profile
    ordered = value.strip() == "1"
    return profile if ordered == profile.launch_order_dispatch else dataclasses.replace(
        profile, launch_order_dispatch=ordered)


def default_profile(device_type: str, device_name: str = "", interconnect: str = "nvlink") -> DeviceProfile:
    """The built-in profile for a device: `device_type` "cpu" or "cuda", `device_name` as CUDA reports it."""
    if device_type == "cpu":
        return BUILTIN_PROFILES["cpu-gloo"]
    if device_type != "cuda":
        raise ValueError(f"no built-in profile for device type {device_type!r}; expected 'cpu' or 'cuda'")
    if interconnect not in INTERCONNECTS:
        raise ValueError(f"interconnect must be one of {INTERCONNECTS}, got {interconnect!r}")
    upper = device_name.upper()
    for gpu in ("h200", "h100"):
        if gpu.upper() in upper:
            return BUILTIN_PROFILES[f"{gpu}-{interconnect}"]
    base = BUILTIN_PROFILES[f"h100-{interconnect}"]
    label = device_name or "an unnamed CUDA device"
    return dataclasses.replace(base, name=f"cuda-{interconnect}",
                               source=f"{label} is not a known GPU, so H100 figures are assumed: {base.source}")
