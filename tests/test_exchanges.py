"""The exchange kinds: the copy-engine op in every graph form, its protocol, and the choice per site.

On CPU `torch.ops.hcms.all_to_all` runs the group's own all-to-all, so these tests run every rewritten
graph through the new op and its waits: every layout on every front end (hypothesis), training
through the kit's in-process ranks, and Inductor's generated code on gloo processes, all compared
with `torch.equal`. The exchange protocol (two slots, READY flags) runs here on host threads,
one per virtual rank, with the driver calls replaced by plain loads and stores; on a GPU
`benchmarks/copy_engine_check.py` runs the same protocol on CUDA streams and symmetric memory.
"""

from __future__ import annotations

import ctypes
import threading
import time

import pytest
import torch
from hcms_compile.passes.cost_model import predict, site_cost
from hcms_compile.passes.exchanges import COPY_ENGINE, NCCL, validate_exchange
from hcms_compile.passes.match import match_sites
from hcms_compile.passes.ops import is_all_to_all
from hcms_compile.passes.plan import choose_chunks
from hcms_compile.passes.profiles import BUILTIN_PROFILES
from hypothesis import event, given

import hcms_compile
from hcms_compile import copy_engine, cuda_driver
from hcms_compile.backend import options_from_env
from hcms_compile.testing import assert_equivalent, ranks
from hcms_compile.testing.layouts import LAYOUTS
from hcms_compile.testing.strategies import UlyssesCase, ulysses_cases
from hcms_compile.testing.tracing import TRACERS, trace
from tests.helpers import assert_bitwise_on_ranks, assert_untouched, examples

OP = torch.ops.hcms.all_to_all.default


def _copy_engine_exchanges(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is OP)


# -- every graph form runs through the op -------------------------------------------------------------


def _check_copy_engine(case: UlyssesCase, tracer: str) -> None:
    event(f"{tracer} {case.layout}")
    gm = trace(case.function(), case.example_inputs(), tracer)
    result = hcms_compile.rewrite(gm, chunks=case.chunks, exact="rounding", exchange=COPY_ENGINE)
    assert_untouched(gm, result)
    (site,) = result.sites
    assert site.rewritten, site.reason
    assert site.exchange == COPY_ENGINE and "runs the group's all-to-all here" in site.exchange_note
    # every exchange of the site is the copy-engine op: none of the group's all-to-alls is left
    assert _copy_engine_exchanges(result.graph_module) == site.collectives
    assert not any(is_all_to_all(n) for n in result.graph_module.graph.nodes)
    if site.bitwise:
        assert_bitwise_on_ranks(gm, result.graph_module, case)


@pytest.mark.parametrize("tracer", TRACERS)
@examples(15)
@given(case=ulysses_cases(layouts=tuple(LAYOUTS), max_world=4))
def test_every_layout_on_every_front_end_runs_through_the_copy_engine_op(tracer, case):
    _check_copy_engine(case, tracer)


@pytest.mark.parametrize(("name", "chunks"), [(name, c) for name in LAYOUTS for c in (2, 1) if c == 2 or
                                              name != "fused_qkv"])
def test_every_layout_trains_bitwise_over_the_copy_engine_exchange(monkeypatch, name, chunks):
    # the kit's backend reads HCMS_EXCHANGE at each compile: forward and backward graphs, every gradient
    monkeypatch.setenv("HCMS_EXCHANGE", COPY_ENGINE)
    case = UlyssesCase(name, 2, 1, 4, 8, 8, torch.float32, True, chunks)
    result = assert_equivalent(case.function(), case.sharded_inputs(), world_size=2, chunks=chunks,
                               dim_names=("batch", "token", "head", "dim"))
    sites = [s for g in result.graphs for s in g.sites if s.rewritten]
    assert {g.phase for g in result.graphs} == {"forward", "backward"}
    assert sites and all(s.exchange == COPY_ENGINE for s in sites), sites
    for graph in result.graphs:
        rewritten = [s for s in graph.sites if s.rewritten]
        assert _copy_engine_exchanges(graph.graph_module) == sum(s.collectives for s in rewritten)


def test_inductor_code_over_the_copy_engine_exchange_is_bitwise_on_gloo_processes(monkeypatch):
    # the spawned processes inherit HCMS_EXCHANGE: Inductor's generated code calls the op, which runs
    # gloo's all-to-all on CPU; outputs and gradients compared with Inductor alone
    monkeypatch.setenv("HCMS_EXCHANGE", COPY_ENGINE)
    case = UlyssesCase("funcol", 2, 1, 4, 8, 8, torch.float32, True, 2)
    result = assert_equivalent(case.function(), case.sharded_inputs(), world_size=2, chunks=2, inner="inductor")
    sites = [s for g in result.graphs for s in g.sites if s.rewritten]
    assert sites and all(s.exchange == COPY_ENGINE for s in sites)


# -- the choice per site -------------------------------------------------------------------------------


def _gm():
    case = UlyssesCase("funcol", 2, 1, 4, 8, 8, torch.float32, False, 2)
    return trace(case.function(), case.example_inputs(), "make_fx")


def test_auto_takes_the_group_all_to_all_on_cpu_and_says_nothing():
    gm = _gm()
    (auto,) = hcms_compile.rewrite(gm, chunks=2).sites
    assert auto.exchange == NCCL and auto.exchange_note == ""
    assert _copy_engine_exchanges(hcms_compile.rewrite(gm, chunks=2).graph_module) == 0
    (explicit,) = hcms_compile.rewrite(gm, chunks=2, exchange="nccl").sites
    assert explicit.exchange == NCCL
    table = hcms_compile.rewrite(gm, chunks=2, exchange=COPY_ENGINE).table()
    assert "exchange" in table.splitlines()[0] and COPY_ENGINE in table and "not CUDA" in table


def test_one_chunk_over_the_copy_engine_exchange_is_the_plain_site_moved_to_it():
    gm = _gm()
    (site,) = hcms_compile.rewrite(gm, chunks=1, exchange=COPY_ENGINE, fuse=False).sites
    assert site.rewritten and site.chunk_sizes == (4,) and not site.fused and site.collectives == 4
    (fused,) = hcms_compile.rewrite(gm, chunks=1, exchange=COPY_ENGINE).sites
    assert fused.fused and fused.collectives == 2
    (nccl,) = hcms_compile.rewrite(gm, chunks=1, exchange=NCCL, fuse=False).sites
    assert not nccl.rewritten and "one chunk" in nccl.reason


@pytest.mark.parametrize("bad", ["NCCL", "copy_engine", "", None, 3])
def test_a_bad_exchange_is_refused_with_its_name(bad):
    with pytest.raises(ValueError, match="exchange must be one of 'auto', 'nccl', 'copy-engine'"):
        validate_exchange(bad)
    with pytest.raises(ValueError, match="exchange must be one of"):
        hcms_compile.rewrite(_gm(), chunks=2, exchange=bad)
    with pytest.raises(ValueError, match="exchange must be one of"):
        hcms_compile.make_backend(exchange=bad)


def test_hcms_exchange_overrides_the_backend_and_names_a_bad_value():
    assert options_from_env(2, True, {"HCMS_EXCHANGE": "copy-engine"}).exchange == COPY_ENGINE
    assert options_from_env(2, True, {}, exchange="nccl").exchange == NCCL
    with pytest.raises(ValueError, match="HCMS_EXCHANGE='ce': expected auto, nccl or copy-engine"):
        options_from_env(2, True, {"HCMS_EXCHANGE": "ce"})


def test_copy_engine_support_names_what_is_missing():
    group = ranks.group(2).group_name
    assert copy_engine.support(group, torch.device("cpu")) == "the exchange runs on cpu, not CUDA"
    # a CUDA device on the in-process world: its backend is the fake one, not NCCL
    assert "not NCCL" in copy_engine.support(group, torch.device("cuda", 0))


# -- the cost model prices both kinds, and auto chooses between them ---------------------------------------


def _site_cost(world: int = 2, seq: int = 4096):
    case = UlyssesCase("funcol", world, 1, 20, seq // world, 128, torch.bfloat16, False, 2)
    gm = trace(case.function(), case.example_inputs(), "make_fx")
    (site,) = match_sites(gm.graph)
    return site_cost(site)


@pytest.mark.parametrize("world", [2, 4])
def test_what_crosses_on_copy_engines_does_not_wait_for_a_persistent_attention(world):
    # NCCL's kernel for chunk 0's output waits for chunk 1's attention to end; the copy-engine exchange
    # stages on the SMs between the two attention kernels, then pulls on copy engines beside the second
    cost, profile = _site_cost(world, 4096 * world), BUILTIN_PROFILES["h200-nvlink"]
    nccl = predict(cost, profile, (10, 10), fused=True, exchange=NCCL)
    ce = predict(cost, profile, (10, 10), fused=True, exchange=COPY_ENGINE)
    assert ce.exposed_comm_s < nccl.exposed_comm_s and ce.time_s < nccl.time_s and ce.gain > 0.05


def test_at_world_size_1_the_copy_engine_exchange_has_nothing_to_hide():
    # every byte stays on the GPU: its copies run on the SMs, and the staging copy is one NCCL does not make
    cost, profile = _site_cost(1, 4096), BUILTIN_PROFILES["h200-nvlink"]
    nccl = predict(cost, profile, (10, 10), fused=True, exchange=NCCL)
    ce = predict(cost, profile, (10, 10), fused=True, exchange=COPY_ENGINE)
    assert ce.time_s > nccl.time_s and ce.gain < 0


def test_auto_weighs_chunks_and_exchange_kinds_together():
    cost, profile = _site_cost(), BUILTIN_PROFILES["h200-nvlink"]
    only_nccl = choose_chunks(cost, profile, 20, kinds=(NCCL,))
    both = choose_chunks(cost, profile, 20, kinds=(NCCL, COPY_ENGINE))
    assert all(c.exchange == NCCL for c in only_nccl.candidates)
    assert {c.exchange for c in both.candidates} == {NCCL, COPY_ENGINE}
    assert both.exchange == COPY_ENGINE and both.best.time_s < only_nccl.best.time_s, both.reason
    assert "over copy-engine" in both.reason


# -- the protocol, on host threads --------------------------------------------------------------------


class _HostStreams:
    """The driver's three calls on host memory: each virtual rank's thread is its stream."""

    def __init__(self, delays: dict[int, float]) -> None:
        self.delays = delays
        self.local = threading.local()

    def write(self, stream, address, value):
        ctypes.c_int32.from_address(address).value = value

    def wait(self, stream, address, value):
        deadline = time.monotonic() + 10
        while ctypes.c_int32.from_address(address).value != value:
            if time.monotonic() > deadline:
                raise TimeoutError(f"flag at {address:#x} never became {value}: the protocol deadlocked")
            time.sleep(0)

    def copy(self, stream, dst, src):
        time.sleep(self.delays.get(getattr(self.local, "rank", -1), 0.0))
        dst.copy_(src)


def _reference(inputs):
    world = len(inputs)
    blocks = [x.chunk(world) for x in inputs]
    return [torch.cat([blocks[j][r] for j in range(world)]) for r in range(world)]


@pytest.mark.parametrize(("world", "through_self"), [(1, True), (2, False), (3, False), (4, False)])
def test_the_protocol_delivers_every_block_while_ranks_run_apart(monkeypatch, world, through_self):
    # rank 0 is slow: the others run a slot ahead, and must never restage a slot it still reads
    host = _HostStreams({0: 0.002})
    for name in ("write", "wait", "copy"):
        monkeypatch.setattr(cuda_driver, name, getattr(host, name))
    rows, width = 3 * world, 4
    block = rows // world * width * 4
    buffers = [torch.zeros(copy_engine.SLOTS * world * block, dtype=torch.uint8) for _ in range(world)]
    flags = [copy_engine.initial_flags(world) for _ in range(world)]
    views = [copy_engine._PeerView(r, world, buffers, [f.data_ptr() for f in flags], None, through_self)
             for r in range(world)]
    calls = [[torch.randn(rows, width) for _ in range(world)] for _ in range(7)]
    outs = [[torch.empty(rows, width) for _ in range(world)] for _ in calls]
    errors = []

    def run(rank):
        host.local.rank = rank
        try:
            for i, inputs in enumerate(calls):
                send, out = (t.view(torch.uint8).view(world, -1) for t in (inputs[rank], outs[i][rank]))
                views[rank].exchange(send, out, i % copy_engine.SLOTS)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for inputs, got in zip(calls, outs, strict=True):
        assert all(map(torch.equal, got, _reference(inputs)))
    # every READY was consumed: the next exchange (or CUDA graph replay) starts from the initial state
    for f in flags:
        assert torch.equal(f, copy_engine.initial_flags(world))
