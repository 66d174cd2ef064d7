"""Receive-tree nodes used outside the site (the wait's result, a permute of it, keys and values
before or after their repeat) are escapes: the chunks' values are reassembled for those users, bit
for bit on every rank, forward and backward; what cannot be reassembled is left alone with a reason."""

from __future__ import annotations

import pytest
import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from hcms_compile.passes.match import match_sites

import hcms_compile
from hcms_compile.testing import assert_equivalent, ranks
from hcms_compile.testing.layouts import _a2a_inplace
from hcms_compile.testing.layouts import _funcol_out as funcol_out
from hcms_compile.testing.strategies import UlyssesCase
from hcms_compile.testing.tracing import trace
from hcms_compile.testing.variants import Variant
from tests.helpers import assert_bitwise_on_ranks, assert_untouched

P, B, LOCAL_HEADS, TOKENS, D = 2, 2, 4, 16, 8


def _case(kv_heads: int | None = None, kv_style: str = "repeat") -> UlyssesCase:
    variant = Variant(kv_heads=kv_heads, kv_style=kv_style) if kv_heads else Variant()
    return UlyssesCase("funcol", P, B, LOCAL_HEADS, TOKENS, D, torch.float32, False, 2, variant)


def _receive(x, group):
    """[B, S/P, H, D] -> the wait's result [P (sequence block), B, S/P, H/P, D]."""
    b, s, h, d = x.shape
    send = x.reshape(b, s, group.size(), h // group.size(), d).permute(2, 0, 1, 3, 4).contiguous()
    return funcol.wait_tensor(funcol.all_to_all_single(send, None, None, group))


def _heads_first(recv):
    """The wait's result as attention reads it: [B, H/P, S, D]."""
    p, b, s, h, d = recv.shape
    return recv.permute(1, 3, 0, 2, 4).reshape(b, h, p * s, d)


def _repeat(x, n):
    b, kv, s, d = x.shape
    return x[:, :, None].expand(b, kv, n, s, d).reshape(b, kv * n, s, d)


def _rewrite(fn, case: UlyssesCase, chunks=2, tracer: str = "make_fx"):
    gm = trace(fn, case.example_inputs(), tracer)
    result = hcms_compile.rewrite(gm, chunks=chunks)
    assert_untouched(gm, result)
    return gm, result


def _assert_rewritten_bitwise(fn, case: UlyssesCase, escapes: int, tracer: str = "make_fx"):
    gm, result = _rewrite(fn, case, tracer=tracer)
    (site,) = result.sites
    assert site.rewritten, site.reason
    (matched,) = match_sites(gm.graph)
    assert sum(e.head is not None for e in matched.escapes) == escapes
    if tracer != "dynamo":  # Dynamo graphs are retraced, so strides are not kept there (emit.restride)
        assert _returned_strides(result.graph_module) == _returned_strides(gm)
    assert_bitwise_on_ranks(gm, result.graph_module, case)
    assert_bitwise_on_ranks(gm, result.graph_module, case, seed=1)


def _returned_strides(gm) -> list[tuple[int, ...]]:
    (returned,) = [n for n in gm.graph.nodes if n.op == "output"]
    values = [n.meta.get("val", n.meta.get("example_value")) for n in torch.utils._pytree.tree_leaves(returned.args)]
    return [tuple(v.stride()) for v in values]


TRACERS = pytest.mark.parametrize("tracer", ["make_fx", "export", "dynamo", "aot"])


@TRACERS
def test_the_wait_result_used_outside_is_reassembled(tracer):
    g = ranks.group(P)

    def fn(q, k, v):
        recv = _receive(q, g)
        k, v = (_heads_first(_receive(t, g)) for t in (k, v))
        o = F.scaled_dot_product_attention(_heads_first(recv), k, v)
        return funcol_out(o, g), recv

    _assert_rewritten_bitwise(fn, _case(), escapes=1, tracer=tracer)


@pytest.mark.parametrize("tracer", ["export", "dynamo", "aot"])
def test_the_buffer_an_in_place_exchange_fills_used_outside_is_reassembled(tracer):
    g = ranks.group(P)

    def fn(q, k, v):
        b, s, h, d = q.shape
        send = q.reshape(b, s, P, h // P, d).permute(2, 0, 1, 3, 4).contiguous()
        recv = _a2a_inplace(send, g)  # torch.empty_like(send) filled by dist.all_to_all_single
        k, v = (_heads_first(_receive(t, g)) for t in (k, v))
        o = F.scaled_dot_product_attention(_heads_first(recv), k, v)
        return funcol_out(o, g), recv

    _assert_rewritten_bitwise(fn, _case(), escapes=1, tracer=tracer)


def test_a_wait_whose_heads_share_dim_0_with_the_source_rank_is_reassembled_on_the_head_atom():
    g = ranks.group(P)

    def fn(q, k, v):
        def receive(x):  # heads merged into the exchanged dim: [P * H/P, B, S/P, D]
            b, s, h, d = x.shape
            send = x.reshape(b, s, P, h // P, d).permute(2, 3, 0, 1, 4).contiguous().flatten(0, 1)
            return funcol.wait_tensor(funcol.all_to_all_single(send, None, None, g))

        def heads_first(recv):
            _, b, s, d = recv.shape
            return recv.view(P, LOCAL_HEADS, b, s, d).permute(2, 1, 0, 3, 4).reshape(b, LOCAL_HEADS, P * s, d)

        recv = receive(q)
        o = F.scaled_dot_product_attention(heads_first(recv), heads_first(receive(k)), heads_first(receive(v)))
        return funcol_out(o, g), recv * 1.0

    _assert_rewritten_bitwise(fn, _case(), escapes=1)


def test_a_permute_in_the_receive_tree_used_outside_is_reassembled():
    g = ranks.group(P)

    def fn(q, k, v):
        moved = _receive(q, g).permute(1, 3, 0, 2, 4)  # [B, H/P, P, S/P, D], not contiguous
        b, h, p, s, d = moved.shape
        k, v = (_heads_first(_receive(t, g)) for t in (k, v))
        o = F.scaled_dot_product_attention(moved.reshape(b, h, p * s, d), k, v)
        return funcol_out(o, g), moved, moved.sum(dim=(0, 2))

    _assert_rewritten_bitwise(fn, _case(), escapes=1)


@TRACERS
def test_repeated_keys_and_values_and_the_exchanged_ones_before_the_repeat_are_reassembled(tracer):
    g = ranks.group(P)
    case = _case(kv_heads=4)  # 2 KV heads per rank, each read by 2 query heads

    def fn(q, k, v):
        q = _heads_first(_receive(q, g))
        k, v = (_heads_first(_receive(t, g)) for t in (k, v))  # the exchanged KV, before the repeat
        b, kv, s, d = k.shape
        grouped = k[:, :, None].expand(b, kv, 2, s, d).contiguous()  # head axis: (KV head, repeat)
        o = F.scaled_dot_product_attention(q, grouped.reshape(b, 2 * kv, s, d), _repeat(v, 2))
        return funcol_out(o, g), k, v, grouped

    _assert_rewritten_bitwise(fn, case, escapes=3, tracer=tracer)


def test_exchanged_keys_returned_beside_their_repeat_train_bitwise():
    g = ranks.group(P)
    case = _case(kv_heads=4)

    def fn(q, k, v):
        q = _heads_first(_receive(q, g))
        k, v = (_heads_first(_receive(t, g)) for t in (k, v))
        o = F.scaled_dot_product_attention(q, _repeat(k, 2), _repeat(v, 2))
        return funcol_out(o, g), k * 1.0, v

    result = assert_equivalent(fn, case.sharded_inputs(), world_size=P, chunks=2)
    (forward,) = [s for s in result.graphs[0].sites]
    assert forward.rewritten, forward.reason
    (backward,) = [s for s in result.graphs[1].sites if s.attention.endswith("_backward")]
    assert backward.rewritten, backward.reason


def test_an_expanded_view_used_outside_is_left_alone():
    g = ranks.group(P)

    def fn(q, k, v):
        q = _heads_first(_receive(q, g))
        k, v = (_heads_first(_receive(t, g)) for t in (k, v))
        b, kv, s, d = k.shape
        expanded = k[:, :, None].expand(b, kv, 2, s, d)  # stride 0 on the repeat
        o = F.scaled_dot_product_attention(q, expanded.reshape(b, 2 * kv, s, d), _repeat(v, 2))
        return funcol_out(o, g), expanded

    _, result = _rewrite(fn, _case(kv_heads=4))
    (site,) = result.sites
    assert not site.rewritten and "expanded view" in site.reason, site.reason


# -- training: the partitioner saves the exchanged keys and values before their repeat -----------

KV_HEADS = pytest.mark.parametrize("kv_heads", [2, 4], ids=["one KV head per rank", "two KV heads per rank"])


def _training_case(kv_heads: int) -> UlyssesCase:
    return UlyssesCase("funcol", P, B, LOCAL_HEADS, TOKENS, D, torch.float32, False, 2,
                       Variant(kv_heads=kv_heads, kv_style="repeat"))


@KV_HEADS
def test_gqa_repeat_trains_bitwise_with_forward_and_backward_rewritten(kv_heads):
    case = _training_case(kv_heads)
    result = assert_equivalent(case.function(), case.sharded_inputs(), world_size=P, chunks=2)
    for graph in result.graphs:
        (site,) = [s for s in graph.sites if s.attention.startswith("_scaled_dot_product")]
        assert site.rewritten, (graph.phase, site.reason)


@KV_HEADS
def test_inductor_rewrites_the_gqa_repeat_training_site_forward_and_backward(kv_heads):
    case = _training_case(kv_heads)
    backend = hcms_compile.make_backend(chunks=2, inner="inductor")
    torch._dynamo.reset()
    inputs = [t.requires_grad_() for t in (torch.randn(s) for s in case._shapes(P))]
    with torch._inductor.config.patch(fx_graph_cache=False):
        out = torch.compile(case.function(), backend=backend, fullgraph=True)(*inputs)
        out.sum().backward()
    assert [r.phase for r in backend.reports] == ["forward", "backward"]
    for report in backend.reports:
        (site,) = report.sites
        assert site.rewritten, (report.phase, site.reason)
