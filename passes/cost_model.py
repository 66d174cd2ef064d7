"""Predict how long a site takes plain and chunked.

Terms
- site cost: `SiteCost`, what one site has to do, read from its graph: attention FLOPs, the bytes of
  each input and output all-to-all, and the bytes of layout copies around them. It knows nothing
  of the machine.
- profile: `DeviceProfile` (see `profiles.py`), what the machine does per second.
- share: chunk c of a site with H local heads carries h_c / H of every byte and FLOP of the site.
- comm stream, compute stream: with NCCL the all-to-alls run on their own stream, in the order the
  graph issues them; attention and copies run on the compute stream in graph order. Each stream
  runs one thing at a time.
- rho: comm / (comm + attention) of the plain site; HCMS can hide at most the comm part.
- plain site: the site as traced: copies, input all-to-alls, attention, output all-to-alls, each
  waited on before the next starts, so nothing overlaps.
- layout copy: a node on a send or receive path that writes a new buffer (`clone`, `contiguous` or
  `reshape` of a non-contiguous tensor). An estimate: a path with any copy is charged the exchange
  buffer's bytes once, whatever it copies exactly. Copying N bytes takes 2N / copy_bandwidth (read
  and write). A chunk's slice of a send buffer, and a fused buffer, copy every byte they send.
- reassembly: what only the chunked form copies: each output exchange's per-chunk receive buffers
  concatenated, and every escape (a per-head value saved for the backward) concatenated.

Symbolic sizes (a dynamic sequence length) are read at their hint, the value of the example that
triggered the compile: the prediction is for that length, and the report says so. Every rank
compiles with the same shapes, so every rank reads the same hints and plans alike.

Steps of `site_cost(site)`:
1. Attention FLOPs from the recorded q, k, v shapes: 2 * B * H * S_q * S_kv * (D_qk + D_v) for the
   two matmuls, halved when causal, times 2.5 for a backward op.
2. Bytes of every exchange from the all-to-all node's recorded value, copy bytes per path, and the
   reassembly bytes from the output exchanges and the escapes.

- fused: each chunk's input exchanges run as ONE all-to-all (one latency, the summed bytes), and its
  output exchanges as one. The plain site can be fused too (one chunk).
- SM exchange: an all-to-all run by kernels on the SMs (NCCL); a copy-engine exchange moves bytes
  without SMs: the `copy-engine` kind (`exchanges.py`, priced with the profile's `copy_engine_*`
  figures), or any exchange where `profile.copy_engine_exchange` says the group's own one does.
- persistent attention (`profile.persistent_attention`): the attention kernel holds every SM while
  it runs (cuDNN SDPA bf16 on Hopper: one 232 KB CTA per SM).
- contention: the fraction of overlapped SM-exchange time added to compute that shares the SMs.

Steps of `predict(cost, profile, chunk_sizes, fused, order, exchange)`:
1. Write the kernels in host issue order. `INPUTS_FIRST` (what schedule.py emits): every chunk's send
   copies and input all-to-alls, in chunk order; then per chunk c its receive copies, attention,
   output copy and output all-to-all; then the reassembly, after every output all-to-all.
   `LOOKAHEAD` (what the recorded benches ran): chunks 0 and 1's sends, then chunk c+2's after
   chunk c's output all-to-all. One chunk is the site in one piece.
2. Run them through time on two FIFO streams. A compute step starts when the compute stream is free
   and the all-to-alls it waits on are done. An all-to-all starts when the comm stream is free and
   every compute step issued before it is done (ProcessGroupNCCL's syncStream), and then:
   (a) an SM exchange that becomes ready while a persistent attention kernel runs waits for its end;
   (b) compute that runs beside an SM exchange progresses at rate 1 - contention;
   (c) an SM exchange and a persistent attention ready at the same moment: with several hardware
       queues the attention wins and (a) applies; with dispatch in launch order
       (`profile.launch_order_dispatch`) the one issued first goes first, and an exchange that goes
       first shares by (b); the copy-engine exchange's staging copy issued first goes first either
       way (measured once, on the H200: the lanes of hcms-2 at 32K);
   (d) a copy-engine step starts as soon as it is ready and slows nothing (contention 0). The
       copy-engine exchange is two comm steps: staging (the blocks for the peers and the own block,
       copies within the GPU at `copy_engine_local_bandwidth`, on the SMs: (a)-(c) apply), then the
       pull, `copy_engine_latency + crossing / copy_engine_bandwidth` on copy engines; at world
       size 1 the pull is a copy within the GPU as well, on the SMs.
   Non-persistent attention follows (b) alone, the model before these rules.
3. The site's time is when both streams are done; gains are against the plain site as traced (one
   chunk, unfused, same order).
`plan.choose_chunks` compares these predictions to pick a site's chunk count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from torch.fx import Node

from .exchanges import COPY_ENGINE, KINDS, NCCL
from .match import Site, value_of
from .ops import attention_args, target_name
from .profiles import DeviceProfile
from .symbolic import hint, hints, known_contiguous

# A backward op recomputes the scores (1 matmul) and computes dV, dP, dQ and dK (4 more) against the
# forward's 2 matmuls of the same size: 5 / 2.
BACKWARD_FLOP_RATIO = 2.5

_ALWAYS_COPIES = {"lift_fresh_copy"}
# a clone of data already laid out as the clone asks is no copy in Inductor (measured on the H200: at
# world size 1 every layout op of a Ulysses site is a view, and Inductor alone launches no copy kernel)
_COPIES_WHEN_STRIDED = {"clone", "contiguous", "reshape", "reshape_as", "flatten"}


@dataclass(frozen=True)
class SiteCost:
    attention_flops: float  # FLOPs of the site's attention op, all local heads
    input_bytes: tuple[int, ...]  # buffer bytes of each input all-to-all
    output_bytes: tuple[int, ...]  # buffer bytes of each output all-to-all
    send_copy_bytes: int  # bytes copied on the input send paths, before the input all-to-alls
    receive_copy_bytes: int  # bytes copied between the input waits and attention
    output_copy_bytes: int  # bytes copied between attention and the output all-to-alls
    reassembly_bytes: int  # bytes the chunked form concatenates; the plain site does not
    world_size: int
    local_heads: int
    backward: bool
    causal: bool
    # exchange buffers whose send path copies nothing as traced (every layout op a view, as at world
    # size 1): a chunk's slice or a fused buffer is the copy the rewrite adds for them
    uncopied_input_bytes: int = 0
    uncopied_output_bytes: int = 0

    @property
    def collectives(self) -> int:
        return len(self.input_bytes) + len(self.output_bytes)


@dataclass(frozen=True)
class Prediction:
    chunks: tuple[int, ...]  # local heads per chunk; one entry is the plain site
    comm_s: float  # all-to-all time, summed over the calls
    compute_s: float  # attention time without contention
    copy_s: float  # layout copies and reassembly
    contention_s: float  # what overlapped all-to-alls added to compute
    time_s: float  # wall time of the site
    exposed_comm_s: float  # wall time in which the compute stream waited for an all-to-all
    rho: float  # comm / (comm + attention) of the plain site
    gain_s: float  # plain time minus this time
    gain: float  # gain_s / plain time
    fused: bool = False  # each chunk's input exchanges ran as one all-to-all, and its output exchanges as one
    order: str = "inputs_first"  # the emitted order predicted (ORDERS)
    exchange: str = NCCL  # the exchange kind predicted (exchanges.KINDS)


# -- steps 1-2 of site_cost ------------------------------------------------------------------------


def _bytes(node: Node) -> int:
    val = value_of(node)
    return hint(val.numel()) * int(val.element_size())


def _makes_buffer(node: Node) -> bool:
    name = target_name(node)
    if name in _ALWAYS_COPIES:
        return True
    if name in _COPIES_WHEN_STRIDED and node.args and isinstance(node.args[0], Node):
        source = value_of(node.args[0])
        return source is not None and not known_contiguous(source)
    return False


def _copy_bytes(path: Iterable[Node], buffer_bytes: int) -> int:
    return buffer_bytes if any(_makes_buffer(node) for node in path) else 0


def site_cost(site: Site) -> SiteCost:
    # from the attention's arguments: keys shared whole by every chunk (one KV head) are not in `site.heads`
    args = attention_args(site.attention, site.op)
    q, k, v = (hints(value_of(args[name]).shape) for name in ("query", "key", "value"))
    batch = math.prod(q[:-3])
    heads, s_q, d_qk = q[-3:]
    s_kv, d_v = k[-2], v[-1]
    flops = 2.0 * batch * heads * s_q * s_kv * (d_qk + d_v)
    causal = bool(args["is_causal"])
    if causal:
        flops /= 2
    if site.op.backward:
        flops *= BACKWARD_FLOP_RATIO
    # the wait holds the exchanged tensor (the buffer of make_fx's c10d exchange, whose own value is a Work)
    input_bytes = tuple(_bytes(ex.wait) for ex in site.inputs)
    output_bytes = tuple(_bytes(ex.wait) for ex in site.outputs)
    # the send path starts at its root, which is computed anyway: only the nodes after it are layout ops
    send_copy = sum(_copy_bytes(ex.send_path[1:], b) for ex, b in zip(site.inputs, input_bytes, strict=True))
    receive_copy = sum(_copy_bytes(ex.receive, b) for ex, b in zip(site.inputs, input_bytes, strict=True))
    output_copy = sum(_copy_bytes(ex.send_path, b) for ex, b in zip(site.outputs, output_bytes, strict=True))
    reassembly = sum(output_bytes) + sum(_bytes(escape.node) for escape in site.escapes)
    uncopied_in = sum(b for ex, b in zip(site.inputs, input_bytes, strict=True) if not _copy_bytes(ex.send_path[1:], b))
    uncopied_out = sum(b for ex, b in zip(site.outputs, output_bytes, strict=True) if not _copy_bytes(ex.send_path, b))
    return SiteCost(attention_flops=flops, input_bytes=input_bytes, output_bytes=output_bytes,
                    send_copy_bytes=send_copy, receive_copy_bytes=receive_copy, output_copy_bytes=output_copy,
                    reassembly_bytes=reassembly, world_size=site.world_size, local_heads=site.local_heads,
                    backward=site.op.backward, causal=causal, uncopied_input_bytes=uncopied_in,
                    uncopied_output_bytes=uncopied_out)


# -- steps 1-3 of predict --------------------------------------------------------------------------

INPUTS_FIRST = "inputs_first"  # every chunk's sends and input all-to-alls first (schedule.py's new order)
LOOKAHEAD = "lookahead"  # chunks 0 and 1's sends, then chunk c+2's after chunk c's output (the recorded benches)
ORDERS = (INPUTS_FIRST, LOOKAHEAD)
_EPS = 1e-15  # seconds: events closer than this happen at the same moment


@dataclass(frozen=True)
class _Step:
    """One kernel of the program, in host issue order.

    A compute step (`comm` False) runs on the compute stream after the previous one and after the
    all-to-alls named in `waits`; a comm step runs on the comm stream after the previous one and
    after every compute step issued before it (ProcessGroupNCCL's syncStream).
    """

    comm: bool
    seconds: float
    kind: str  # "copy", "attention" or "exchange"
    key: str = ""  # comm steps: the exchange it belongs to ("in0", "out1"); several steps may share one
    waits: tuple[str, ...] = ()  # compute steps: exchanges that must be complete
    sm: bool = True  # comm steps: runs on the SMs (NCCL's kernels, copies within the GPU), not copy engines
    first: bool = False  # comm steps: dispatched ahead of an attention kernel queued at the same moment


def _program(cost: SiteCost, profile: DeviceProfile, chunk_sizes: tuple[int, ...], fused: bool,
             order: str, exchange: str = NCCL) -> list[_Step]:
    """The site's kernels in the order `order` issues them (step 1 of `predict`)."""
    world = cost.world_size
    crossing = (world - 1) / world

    sm_exchange = not profile.copy_engine_exchange

    def steps(key: str, nbytes: float) -> list[_Step]:
        if exchange == COPY_ENGINE and profile.copy_engine_bandwidth > 0:
            # its copies within the GPU run on the SMs (measured on the H200), what crosses to the peers
            # on copy engines. Without its figures (bandwidth 0) it is priced as the group's own, below
            local_bandwidth = profile.copy_engine_local_bandwidth or profile.copy_bandwidth
            # staging (the own block too): a copy ready when an attention kernel ends went ahead of the
            # next, already queued one (H200 lanes of hcms-2 at 32K), where NCCL's kernel lost: rule (c)
            stage = _Step(True, 2 * nbytes / local_bandwidth, "exchange", key=key, first=True)
            if world == 1:  # the pull is a copy within the GPU too, issued behind a signal wait: no race won
                pull = _Step(True, profile.copy_engine_latency + 2 * nbytes / local_bandwidth, "exchange", key=key)
            else:
                pull = _Step(True, profile.copy_engine_latency + nbytes * crossing / profile.copy_engine_bandwidth,
                             "exchange", key=key, sm=False)
            return [stage, pull]
        time = profile.a2a_latency + nbytes * crossing / profile.a2a_bandwidth
        if profile.a2a_local_bandwidth > 0:  # the 1/P that stays is copied by the exchange kernel too
            time += 2 * nbytes / world / profile.a2a_local_bandwidth
        return [_Step(True, time, "exchange", key=key, sm=sm_exchange)]

    def exchanges(key: str, buffers: tuple[int, ...], share: float) -> list[_Step]:
        groups = [sum(buffers)] if fused and buffers else list(buffers)
        return [step for b in groups for step in steps(key, share * b)]

    def copy(nbytes: float, kernels: int, waits: tuple[str, ...] = ()) -> list[_Step]:
        if nbytes <= 0:  # no kernel: a zero-length step would sit between a race's two kernels
            return []
        return [_Step(False, kernels * profile.copy_latency + 2 * nbytes / profile.copy_bandwidth, "copy",
                      waits=waits)]

    n_in, n_out = len(cost.input_bytes), len(cost.output_bytes)
    shares = [size / cost.local_heads for size in chunk_sizes]
    # a chunk's slice of a send buffer is strided, and a fused buffer is a new one: either copies every
    # input byte once (a send path's own copy writes into it), where the plain site may copy nothing
    chunked = len(chunk_sizes) > 1
    send_bytes = cost.send_copy_bytes + (cost.uncopied_input_bytes if chunked or (fused and n_in > 1) else 0)
    out_bytes = cost.output_copy_bytes + (cost.uncopied_output_bytes if fused and n_out > 1 else 0)
    sends = [copy(share * send_bytes, n_in) + exchanges(f"in{c}", cost.input_bytes, share)
             for c, share in enumerate(shares)]

    def attend(c: int, share: float) -> list[_Step]:
        attention = profile.attention_latency + share * cost.attention_flops / profile.attention_flops
        return [*copy(share * cost.receive_copy_bytes, n_in, waits=(f"in{c}",)),
                _Step(False, attention, "attention", waits=(f"in{c}",)),
                *copy(share * out_bytes, n_out),
                *exchanges(f"out{c}", cost.output_bytes, share)]

    ahead = len(shares) if order == INPUTS_FIRST else 2
    program = [step for send in sends[:ahead] for step in send]
    for c, share in enumerate(shares):
        program += attend(c, share)
        if order == LOOKAHEAD and c + 2 < len(sends):
            program += sends[c + 2]
    outs = tuple(f"out{c}" for c in range(len(shares)))
    reassembly = cost.reassembly_bytes if len(chunk_sizes) > 1 else 0
    program += copy(reassembly, 1, waits=outs) or [_Step(False, 0.0, "copy", waits=outs)]
    return program


@dataclass
class _Stream:
    steps: list[int]  # indices into the program, in issue order
    head: int = 0  # the next step to start
    running: int | None = None
    left: float = 0.0  # compute: work left (seconds at full rate); comm: the end time


def _simulate(program: list[_Step], profile: DeviceProfile) -> tuple[float, float, float]:
    """Step 2 of `predict`: run both streams through time.

    Returns the wall time, the compute stream's busy time and the comm stream's busy time.
    """
    compute = _Stream([i for i, s in enumerate(program) if not s.comm])
    comm = _Stream([i for i, s in enumerate(program) if s.comm])
    finished: dict[int, float] = {}
    pending: dict[str, int] = {}  # exchange key -> comm steps not yet finished
    for step in program:
        if step.comm:
            pending[step.key] = pending.get(step.key, 0) + 1
    t = compute_busy = comm_busy = 0.0

    def ready(stream: _Stream) -> int | None:
        if stream.running is not None or stream.head >= len(stream.steps):
            return None
        i = stream.steps[stream.head]
        step = program[i]
        if step.comm:  # syncStream: every compute step issued before it is done
            return i if all(j in finished for j in compute.steps if j < i) else None
        return i if all(pending[key] == 0 for key in step.waits) else None

    def start(stream: _Stream, i: int) -> None:
        stream.running, stream.head = i, stream.head + 1
        stream.left = program[i].seconds if not program[i].comm else t + program[i].seconds

    def owns_the_gpu() -> bool:  # a persistent attention kernel is running: no SM is free
        i = compute.running
        return i is not None and profile.persistent_attention and program[i].kind == "attention"

    while compute.running is not None or comm.running is not None or \
            compute.head < len(compute.steps) or comm.head < len(comm.steps):
        c, m = ready(compute), ready(comm)
        if c is not None and m is not None and program[m].sm and profile.persistent_attention \
                and program[c].kind == "attention" and (profile.launch_order_dispatch or program[m].first) and m < c:
            # rule (c) with one hardware queue: dispatch follows launch order, the exchange goes first and
            # the attention kernel starting beside it shares the SMs (rule b)
            start(comm, m)
            m = None
        if c is not None:
            # rule (c) with several queues: an attention kernel ready at the same moment as an exchange takes
            # every SM first, so the exchange is blocked just below
            start(compute, c)
        if m is not None and not (program[m].sm and owns_the_gpu()):
            start(comm, m)  # rule (a) otherwise: it waits for the persistent kernel's end
        if compute.running is None and comm.running is None:
            raise RuntimeError("the cost model's program deadlocked; this is a bug in _program")
        # step to the next completion; compute runs at 1 - contention while an SM exchange shares the GPU
        rate = 1.0 - profile.contention if comm.running is not None and program[comm.running].sm else 1.0
        ends = []
        if compute.running is not None and rate > 0:
            ends.append(t + compute.left / rate)
        if comm.running is not None:
            ends.append(comm.left)
        nxt = min(ends)
        if compute.running is not None:
            compute.left -= (nxt - t) * rate
            compute_busy += nxt - t
            if compute.left <= _EPS * max(1.0, program[compute.running].seconds):
                finished[compute.running] = nxt
                compute.running = None
        if comm.running is not None:
            comm_busy += nxt - t
            if comm.left <= nxt + _EPS:
                finished[comm.running] = nxt
                pending[program[comm.running].key] -= 1
                comm.running = None
        t = nxt
    return t, compute_busy, comm_busy


def predict_against(cost: SiteCost, profile: DeviceProfile, chunk_sizes: tuple[int, ...],
                    plain: Prediction | None, fused: bool = False, order: str = INPUTS_FIRST,
                    exchange: str = NCCL) -> Prediction:
    """The prediction for `chunk_sizes`; `plain` is the plain site's, or None when this run is the plain
    site (then `fused` must be False and `exchange` NCCL: the plain site is the graph as traced)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if exchange not in KINDS:
        raise ValueError(f"exchange must be one of {KINDS}, got {exchange!r}")
    program = _program(cost, profile, chunk_sizes, fused, order, exchange)
    time_s, busy_s, _ = _simulate(program, profile)
    comm_s = sum(step.seconds for step in program if step.comm)
    attention_s = sum(step.seconds for step in program if step.kind == "attention")
    copy_s = sum(step.seconds for step in program if step.kind == "copy")
    if plain is None:
        plain_time = time_s
        rho = comm_s / (comm_s + attention_s) if comm_s + attention_s > 0 else 0.0
    else:
        plain_time, rho = plain.time_s, plain.rho
    gain_s = plain_time - time_s
    return Prediction(chunks=chunk_sizes, comm_s=comm_s, compute_s=attention_s, copy_s=copy_s,
                      contention_s=busy_s - attention_s - copy_s, time_s=time_s, exposed_comm_s=time_s - busy_s,
                      rho=rho, gain_s=gain_s, gain=gain_s / plain_time if plain_time > 0 else 0.0, fused=fused,
                      order=order, exchange=exchange)


def _check_sizes(cost: SiteCost, chunk_sizes: tuple[int, ...]) -> tuple[int, ...]:
    sizes = tuple(chunk_sizes)
    if not sizes or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
        raise ValueError(f"chunk sizes must be positive integers, got {chunk_sizes!r}")
    if sum(sizes) != cost.local_heads:
        raise ValueError(f"chunk sizes {sizes} sum to {sum(sizes)}, but the site has {cost.local_heads} local heads")
    return sizes


def predict(cost: SiteCost, profile: DeviceProfile, chunk_sizes: tuple[int, ...], fused: bool = False,
            order: str = INPUTS_FIRST, exchange: str = NCCL) -> Prediction:
    """The predicted time of `cost`'s site run with `chunk_sizes` local heads per chunk (one entry: the
    site in one chunk), each chunk's exchanges fused into one all-to-all each way when `fused`, in the
    emitted `order`, with the `exchange` kind. Gains are against the plain site as traced (one chunk,
    unfused, the group's all-to-all)."""
    sizes = _check_sizes(cost, chunk_sizes)
    plain = predict_against(cost, profile, (cost.local_heads,), None, order=order)
    if len(sizes) == 1 and not fused and exchange == NCCL:
        return plain
    return predict_against(cost, profile, sizes, plain, fused, order, exchange)
