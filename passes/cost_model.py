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
- layout copy: a node on a send or receive path that writes a new buffer (`clone`, or `contiguous`
  and `reshape` of a non-contiguous tensor). An estimate: a path with any copy is charged the
  exchange buffer's bytes once, whatever it copies exactly. Copying N bytes takes
  2N / copy_bandwidth (read and write).
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

Steps of `predict(cost, profile, chunk_sizes)`:
1. Write the program both streams run, in the order `schedule.pipeline_order` emits: chunk 0's and
   chunk 1's sends, then per chunk c its receive copies, attention, output copy and output
   all-to-all, then chunk c+2's send; finally the reassembly, after every output all-to-all. One
   chunk is the plain site.
2. Run it as an event loop: an all-to-all starts when it is issued and the comm stream is free; a
   compute step starts when the compute stream is free and the all-to-alls it waits on are done, and
   progresses at rate 1 - contention while an all-to-all is in flight.
3. The site's time is when both streams are done; the same loop on one chunk gives the plain time
   and the gain. Chunk 0's input exchanges and the last chunk's output exchanges never overlap
   attention, so they are never hidden.
`plan.choose_chunks` compares these predictions to pick a site's chunk count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from torch.fx import Node

from .match import Site, value_of
from .ops import attention_args, target_name
from .profiles import DeviceProfile
from .symbolic import hint, hints, known_contiguous

# A backward op recomputes the scores (1 matmul) and computes dV, dP, dQ and dK (4 more) against the
# forward's 2 matmuls of the same size: 5 / 2.
BACKWARD_FLOP_RATIO = 2.5

_ALWAYS_COPIES = {"clone", "lift_fresh_copy"}
_COPIES_WHEN_STRIDED = {"contiguous", "reshape", "reshape_as", "flatten"}


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
    return SiteCost(attention_flops=flops, input_bytes=input_bytes, output_bytes=output_bytes,
                    send_copy_bytes=send_copy, receive_copy_bytes=receive_copy, output_copy_bytes=output_copy,
                    reassembly_bytes=reassembly, world_size=site.world_size, local_heads=site.local_heads,
                    backward=site.op.backward, causal=causal)


# -- steps 1-3 of predict --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Issue:  # the compute stream issues an all-to-all (costs it nothing) onto the comm stream
    key: str
    seconds: float


@dataclass(frozen=True)
class _Compute:  # compute-stream work that first waits for the named all-to-alls
    seconds: float
    waits: tuple[str, ...] = ()


def _program(cost: SiteCost, profile: DeviceProfile,
             chunk_sizes: tuple[int, ...]) -> tuple[list[_Issue | _Compute], float, float, float]:
    """The site's steps in pipeline order, and its total all-to-all, attention and copy seconds."""
    crossing = (cost.world_size - 1) / cost.world_size

    def exchange(buffers: tuple[int, ...], share: float) -> float:
        return sum(profile.a2a_latency + share * b * crossing / profile.a2a_bandwidth for b in buffers)

    def copy(nbytes: float) -> float:
        return 2 * nbytes / profile.copy_bandwidth

    shares = [size / cost.local_heads for size in chunk_sizes]
    sends = [[_Compute(copy(share * cost.send_copy_bytes)), _Issue(f"in{c}", exchange(cost.input_bytes, share))]
             for c, share in enumerate(shares)]
    program: list[_Issue | _Compute] = [step for send in sends[:2] for step in send]
    attention_s = 0.0
    for c, share in enumerate(shares):
        attention = profile.attention_latency + share * cost.attention_flops / profile.attention_flops
        attention_s += attention
        work = copy(share * (cost.receive_copy_bytes + cost.output_copy_bytes)) + attention
        program += [_Compute(work, waits=(f"in{c}",)), _Issue(f"out{c}", exchange(cost.output_bytes, share))]
        if c + 2 < len(sends):
            program += sends[c + 2]
    reassembly = copy(cost.reassembly_bytes) if len(chunk_sizes) > 1 else 0.0
    program.append(_Compute(reassembly, waits=tuple(f"out{c}" for c in range(len(shares)))))
    comm_s = sum(step.seconds for step in program if isinstance(step, _Issue))
    copy_s = sum(step.seconds for step in program if isinstance(step, _Compute)) - attention_s
    return program, comm_s, attention_s, copy_s


def _finish(start: float, work: float, busy: list[tuple[float, float]], contention: float) -> float:
    """When compute work started at `start` ends, slowed to rate 1 - contention inside `busy`.

    `busy` holds the comm stream's intervals, sorted and disjoint (one stream, one call at a time).
    """
    t, left = start, work
    rate = 1.0 - contention
    for begin, end in busy:
        if end <= t:
            continue
        if begin > t:
            if left <= begin - t:
                return t + left
            left -= begin - t
            t = begin
        if rate > 0 and left <= (end - t) * rate:
            return t + left / rate
        left -= (end - t) * rate
        t = end
    return t + left


def _simulate(program: list[_Issue | _Compute], contention: float) -> tuple[float, float]:
    """Run both streams; returns the wall time and the compute stream's busy time."""
    compute_free = comm_free = busy_s = 0.0
    done: dict[str, float] = {}
    busy: list[tuple[float, float]] = []
    for step in program:
        if isinstance(step, _Issue):
            start = max(compute_free, comm_free)
            comm_free = start + step.seconds
            busy.append((start, comm_free))
            done[step.key] = comm_free
        else:
            start = max([compute_free, *(done[key] for key in step.waits)])
            compute_free = _finish(start, step.seconds, busy, contention)
            busy_s += compute_free - start
    return max(compute_free, comm_free), busy_s


def predict_against(cost: SiteCost, profile: DeviceProfile, chunk_sizes: tuple[int, ...],
                    plain: Prediction | None) -> Prediction:
    """The prediction for `chunk_sizes`; `plain` is the plain site's, or None when this run is the plain site."""
    program, comm_s, attention_s, copy_s = _program(cost, profile, chunk_sizes)
    time_s, busy_s = _simulate(program, profile.contention)
    if plain is None:
        plain_time = time_s
        rho = comm_s / (comm_s + attention_s) if comm_s + attention_s > 0 else 0.0
    else:
        plain_time, rho = plain.time_s, plain.rho
    gain_s = plain_time - time_s
    return Prediction(chunks=chunk_sizes, comm_s=comm_s, compute_s=attention_s, copy_s=copy_s,
                      contention_s=busy_s - attention_s - copy_s, time_s=time_s, exposed_comm_s=time_s - busy_s,
                      rho=rho, gain_s=gain_s, gain=gain_s / plain_time if plain_time > 0 else 0.0)


def _check_sizes(cost: SiteCost, chunk_sizes: tuple[int, ...]) -> tuple[int, ...]:
    sizes = tuple(chunk_sizes)
    if not sizes or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
        raise ValueError(f"chunk sizes must be positive integers, got {chunk_sizes!r}")
    if sum(sizes) != cost.local_heads:
        raise ValueError(f"chunk sizes {sizes} sum to {sum(sizes)}, but the site has {cost.local_heads} local heads")
    return sizes


def predict(cost: SiteCost, profile: DeviceProfile, chunk_sizes: tuple[int, ...]) -> Prediction:
    """The predicted time of `cost`'s site run with `chunk_sizes` local heads per chunk (one entry: plain)."""
    sizes = _check_sizes(cost, chunk_sizes)
    plain = predict_against(cost, profile, (cost.local_heads,), None)
    return plain if len(sizes) == 1 else predict_against(cost, profile, sizes, plain)
