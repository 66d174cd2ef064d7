"""Graphs from every front end a user may point the pass at: make_fx in real-tensor mode (see also
the equivalence property), `torch.fx.symbolic_trace`, and graphs built by hand, which carry no
shape metadata and take it from `rewrite(example_inputs=)`."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.distributed._functional_collectives as funcol
import torch.fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import hcms_compile
from hcms_compile.api import NO_METADATA
from hcms_compile.testing import ranks
from hcms_compile.testing.strategies import UlyssesCase
from hcms_compile.testing.tracing import trace
from tests.helpers import assert_bitwise_on_ranks, assert_untouched, graph_signature
from tests.test_untouched import S_LOCAL, B, D, H, P, _direct_ops, _funcol, _inputs

CASE = UlyssesCase("funcol", P, B, H // P, S_LOCAL, D, torch.float32, False, 2)  # the shapes of these graphs
aten, c10d = torch.ops.aten, torch.ops._c10d_functional


def _hand_built() -> torch.fx.GraphModule:
    """Ulysses attention written node by node in ATen, as a graph-building tool would: no metadata."""
    g = torch.fx.Graph()
    group = ranks.group(P).group_name
    q, k, v = (g.placeholder(name) for name in "qkv")

    def exchange(x, before, after, shape):
        x = g.call_function(aten.clone.default, (g.call_function(aten.permute.default, (x, before)),),
                            {"memory_format": torch.contiguous_format})
        sent = g.call_function(c10d.all_to_all_single.default, (x, [1] * P, [1] * P, group))
        received = g.call_function(aten.permute.default, (g.call_function(c10d.wait_tensor.default, (sent,)), after))
        return g.call_function(aten.reshape.default, (received, shape))

    def scatter_heads(x):
        x = g.call_function(aten.view.default, (x, [B, S_LOCAL, P, H // P, D]))
        return exchange(x, [2, 0, 1, 3, 4], [1, 3, 0, 2, 4], [B, H // P, P * S_LOCAL, D])

    q, k, v = (scatter_heads(x) for x in (q, k, v))
    attention = g.call_function(aten._scaled_dot_product_flash_attention_for_cpu.default, (q, k, v))
    o = g.call_function(aten.view.default, (g.call_function(operator.getitem, (attention, 0)),
                                            [B, H // P, P, S_LOCAL, D]))
    g.output(exchange(o, [2, 0, 3, 1, 4], [1, 2, 0, 3, 4], [B, S_LOCAL, H, D]))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def _symbolic() -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(_direct_ops)


@pytest.mark.parametrize("build", [_symbolic, _hand_built], ids=["symbolic_trace", "hand-built"])
def test_a_graph_without_metadata_is_skipped_with_what_to_pass(build):
    gm = build()
    result = hcms_compile.rewrite(gm, chunks=2)
    (site,) = result.sites
    assert not site.rewritten and site.reason == NO_METADATA
    assert "pass example_inputs=" in site.reason
    assert_untouched(gm, result)


@pytest.mark.parametrize("fake", [False, True], ids=["real inputs", "fake inputs"])
@pytest.mark.parametrize("build", [_symbolic, _hand_built], ids=["symbolic_trace", "hand-built"])
def test_example_inputs_give_the_shapes_and_the_rewrite_keeps_the_bits(build, fake):
    gm = build()
    before = graph_signature(gm)
    inputs = _inputs()
    if fake:
        mode = FakeTensorMode()
        inputs = [mode.from_tensor(x) for x in inputs]
    result = hcms_compile.rewrite(gm, chunks=2, example_inputs=inputs)
    (site,) = result.sites
    assert site.rewritten and site.chunk_sizes == (1, 1) and site.bitwise, site
    # the shapes went into the copy only: the user's graph is as it was, metadata included
    assert graph_signature(gm) == before and not any("val" in n.meta for n in gm.graph.nodes)
    assert_bitwise_on_ranks(gm, result.graph_module, CASE)


def test_example_inputs_that_do_not_fit_are_the_reason():
    gm = _symbolic()
    (site,) = hcms_compile.rewrite(gm, chunks=2, example_inputs=_inputs()[:2]).sites
    assert not site.rewritten and site.reason == "example_inputs= has 2 values but the graph takes 3 (q, k, v)"
    wrong = [torch.randn(B, S_LOCAL, H + 1, D) for _ in range(3)]
    result = hcms_compile.rewrite(gm, chunks=2, example_inputs=wrong)
    assert result.sites[0].reason.startswith("example_inputs= did not run through the graph: "), result
    assert "reshape" in result.sites[0].reason or "shape" in result.sites[0].reason
    assert_untouched(gm, result)
    assert not any("val" in n.meta for n in result.graph_module.graph.nodes)  # nothing half-propagated


def _funcol_eager(q, k, v):
    """funcol called as eager code does (no wait: the result is an AsyncCollectiveTensor), with
    the constant sizes `symbolic_trace` needs to trace at all."""
    g = ranks.group(P)

    def scatter_heads(x):
        send = x.reshape(B, S_LOCAL, P, H // P, D).permute(2, 0, 1, 3, 4).contiguous()
        received = funcol.all_to_all_single(send, None, None, g)
        return received.permute(1, 3, 0, 2, 4).reshape(B, H // P, P * S_LOCAL, D)

    o = F.scaled_dot_product_attention(scatter_heads(q), scatter_heads(k), scatter_heads(v))
    send = o.reshape(B, H // P, P, S_LOCAL, D).permute(2, 0, 3, 1, 4).contiguous()
    return funcol.all_to_all_single(send, None, None, g).permute(1, 2, 0, 3, 4).reshape(B, S_LOCAL, H, D)


def test_symbolic_trace_through_funcol_names_the_cause_and_the_fix():
    ranks.group(P)  # created outside the trace
    gm = torch.fx.symbolic_trace(_funcol_eager)
    wrappers = [n for n in gm.graph.nodes if n.target is c10d._wrap_tensor_autograd.default]
    assert len(wrappers) == 4  # what symbolic_trace records of funcol: its eager wrapper, no wait
    result = hcms_compile.rewrite(gm, chunks=2, example_inputs=_inputs())
    (site,) = result.sites
    assert not site.rewritten
    assert "pass their results through funcol's eager wrapper _wrap_tensor_autograd" in site.reason, site.reason
    assert "trace with make_fx, torch.export or Dynamo" in site.reason
    assert_untouched(gm, result)
    # and the fix the reason names works on the same function
    fixed = trace(_funcol_eager, _inputs(), "make_fx_real")
    assert hcms_compile.rewrite(fixed, chunks=2).sites[0].rewritten


def test_make_fx_real_mode_values_of_many_fake_modes_are_rewritten():
    gm = trace(_funcol(ranks.group(P)), _inputs(), "make_fx_real")
    modes = {id(n.meta["val"].fake_mode) for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}
    assert len(modes) > 1  # every node traced with real tensors has a fake mode of its own
    result = hcms_compile.rewrite(gm, chunks=2)
    assert result.sites[0].rewritten, result
    assert_bitwise_on_ranks(gm, result.graph_module, CASE)
