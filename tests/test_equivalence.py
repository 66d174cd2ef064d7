"""The rewritten graph computes the same bits as the original, on every rank.

Each example draws a Ulysses case (world size, batch, local heads, tokens per rank, head dim,
dtype, causal, layout, chunk spec), traces the layout's attention, rewrites it and runs both graphs
on all ranks in one process with LocalTensorMode. Every layout of the zoo is drawn on every front
end, the in-place `dist_inplace` included (make_fx, fake or real, records it as the non-functional
c10d.alltoall_base_; the others functionalise it). A site left alone must leave the graph exactly
as it was (`assert_untouched`).
"""

from __future__ import annotations

import torch
from hcms_compile.passes.ops import is_c10d_all_to_all
from hypothesis import event, given
from hypothesis import strategies as st

import hcms_compile
from hcms_compile.testing.layouts import LAYOUTS
from hcms_compile.testing.strategies import UlyssesCase, ulysses_cases
from hcms_compile.testing.tracing import trace
from tests.helpers import (
    assert_bitwise_on_ranks,
    assert_close_on_ranks,
    assert_untouched,
    count_all_to_alls,
    examples,
)


def check_case(case, tracer: str) -> None:
    event(f"layout {case.layout}")
    gm = trace(case.function(), case.example_inputs(), tracer)
    before = count_all_to_alls(gm) + sum(1 for n in gm.graph.nodes if is_c10d_all_to_all(n))
    result = hcms_compile.rewrite(gm, chunks=case.chunks)
    assert_untouched(gm, result)
    (site,) = result.sites
    fusable = before > 2  # the zoo's exchanges share one dtype: fusable unless q, k, v already share one
    if case.chunk_count == 1 and not fusable:
        assert site.status == "skipped" and "one chunk" in site.reason
        return
    if case.chunk_count == 1:
        # one chunk: the fused plain site, q, k and v in one all-to-all
        assert site.rewritten and site.fused and site.chunk_sizes == (case.local_heads,), site.reason
        assert count_all_to_alls(result.graph_module) == site.collectives == 2
        assert_bitwise_on_ranks(gm, result.graph_module, case)
        event("fused plain site")
        return
    if not site.rewritten:
        # the exactness policy refused: the chunking is still correct, but not bit for bit
        assert site.reason.startswith("chunking may change bits"), site.reason
        event("skipped by the exactness policy")
        assert "exact=False" not in site.reason  # CPU flash is deterministic: only rounding can differ
        loose = hcms_compile.rewrite(gm, chunks=case.chunks, exact="rounding")
        assert loose.sites[0].rewritten and loose.sites[0].grade == "rounding"
        assert_close_on_ranks(gm, loose.graph_module, case)
        return
    event("rewritten")
    assert site.bitwise is True
    assert site.world_size == case.world_size
    assert site.local_heads == case.local_heads
    assert sum(site.chunk_sizes) == case.local_heads and len(site.chunk_sizes) == case.chunk_count
    # q, k and v in one exchange and one output exchange, per chunk: 2C (make_fx's c10d exchanges
    # become functional ones)
    assert not any(is_c10d_all_to_all(n) for n in result.graph_module.graph.nodes)
    assert site.fused == fusable
    assert count_all_to_alls(result.graph_module) == site.collectives == 2 * case.chunk_count
    if not fusable:
        assert_bitwise_on_ranks(gm, result.graph_module, case)
        return
    unfused = hcms_compile.rewrite(gm, chunks=case.chunks, fuse=False)
    assert count_all_to_alls(unfused.graph_module) == unfused.sites[0].collectives == before * case.chunk_count
    assert_bitwise_on_ranks(gm, unfused.graph_module, case)
    assert_bitwise_on_ranks(gm, result.graph_module, case)


@examples(120)
@given(ulysses_cases())
def test_make_fx_graphs_keep_their_bits(case):
    check_case(case, "make_fx")


@examples(40)
@given(ulysses_cases())
def test_make_fx_real_tensor_graphs_keep_their_bits(case):
    # make_fx's default mode: traced on one rank's real inputs over the fake process group, every
    # node's value under a fake mode of its own
    check_case(case, "make_fx_real")


@examples(25)
@given(ulysses_cases(layouts=tuple(LAYOUTS), max_world=4))
def test_export_graphs_keep_their_bits(case):
    check_case(case, "export")


@examples(25)
@given(ulysses_cases(layouts=tuple(LAYOUTS), max_world=4))
def test_dynamo_graphs_keep_their_bits(case):
    check_case(case, "dynamo")


@examples(20)
@given(ulysses_cases(layouts=tuple(LAYOUTS), max_world=4))
def test_aot_forward_graphs_keep_their_bits(case):
    check_case(case, "aot")


@given(st.sampled_from(tuple(LAYOUTS)), st.sampled_from([(1, 3, 1), 2, (4, 1), 5]),
       st.sampled_from([torch.float32, torch.bfloat16]))
@examples(20)
def test_explicit_uneven_chunks_on_every_layout(layout, chunks, dtype):
    # 4 ranks x 8 tokens: S = 32, a shape the CPU kernel computes identically per head
    case = UlyssesCase(layout, 4, 2, 5, 8, 8, dtype, True, chunks)
    gm = trace(case.function(), case.example_inputs(), "make_fx")
    assert hcms_compile.rewrite(gm, chunks=chunks).sites[0].rewritten
    check_case(case, "make_fx")
