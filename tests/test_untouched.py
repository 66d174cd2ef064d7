"""A site the pass does not rewrite is left exactly as it was: same nodes, targets, arguments,
names and order (`tests.helpers.graph_signature`), whatever made it skip, a failure half way
through building the chunks included."""

from __future__ import annotations

import pytest
import torch
import torch.distributed._functional_collectives as funcol
import torch.fx
import torch.nn.functional as F
from hcms_compile.passes import emit, rewrite
from hcms_compile.passes.emit import EmitError, RollbackError
from hypothesis import event, given
from hypothesis import strategies as st

import hcms_compile
from hcms_compile.testing import ranks
from hcms_compile.testing.layouts import attn_funcol, attn_fused_qkv
from hcms_compile.testing.strategies import UlyssesCase, ulysses_cases
from hcms_compile.testing.tracing import trace
from tests.helpers import assert_untouched, examples, graph_signature
from tests.test_skips import _gather_heads, _head_blocks, _scatter_heads

P, B, S_LOCAL, H, D = 2, 2, 16, 4, 8


def _inputs() -> list[torch.Tensor]:
    return [torch.randn(B, S_LOCAL, H, D) for _ in range(3)]


def _funcol_graph(tracer: str = "make_fx") -> torch.fx.GraphModule:
    return trace(_funcol(ranks.group(P)), _inputs(), tracer)


class _FailAt:
    """`Emitter._value` raising `EmitError` at its n-th call: a site that fails half way."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, n: int) -> None:
        self.calls, self.n = 0, n
        value = emit.Emitter._value

        def failing(emitter: emit.Emitter, node: torch.fx.Node):
            self.calls += 1
            if self.calls == self.n:
                raise EmitError(f"forced failure at value read {self.n}")
            return value(emitter, node)

        monkeypatch.setattr(emit.Emitter, "_value", failing)


def _value_reads(gm: torch.fx.GraphModule, chunks) -> int:
    """How many fake values a successful rewrite of `gm` reads: the places a failure can strike."""
    with pytest.MonkeyPatch.context() as mp:
        counter = _FailAt(mp, 0)
        assert hcms_compile.rewrite(gm, chunks=chunks, exact="rounding").sites[0].rewritten
    return counter.calls


def test_a_new_node_whose_value_fails_is_erased(monkeypatch):
    # regression: the first new node (the slice of q's send buffer) was created, its value failed,
    # and rollback, which erased only recorded nodes, left it dangling in the returned graph
    gm = _funcol_graph()
    _FailAt(monkeypatch, 1)
    result = hcms_compile.rewrite(gm, chunks=2)
    (site,) = result.sites
    assert not site.rewritten and "forced failure at value read 1" in site.reason
    assert_untouched(gm, result)
    assert not any(n.target is torch.ops.aten.slice.Tensor for n in result.graph_module.graph.nodes)


def test_rollback_erases_new_nodes_that_other_new_nodes_use(monkeypatch):
    # late in the site: chunk 0 is complete (slices, layouts, exchanges, attention), chunk 1 half built
    gm = _funcol_graph()
    reads = _value_reads(gm, 2)
    _FailAt(monkeypatch, reads - 2)
    result = hcms_compile.rewrite(gm, chunks=2)
    assert not result.sites[0].rewritten and "forced failure" in result.sites[0].reason
    assert_untouched(gm, result)


def test_a_failure_after_the_graph_was_rewired_is_raised_not_reported_as_a_skip(monkeypatch):
    # the original site's users already read the new nodes: no rollback can restore the graph, so
    # a report saying "skipped, left as it was" would be false
    def broken_erase(graph, site):
        raise RuntimeError("planted failure after rewiring")

    monkeypatch.setattr(rewrite, "_erase_site", broken_erase)
    with pytest.raises(RollbackError, match="already used by"):
        hcms_compile.rewrite(_funcol_graph(), chunks=2)


def _uneven(g):
    def scatter(x):
        b, s, h, d = x.shape
        send = x.reshape(b, s, P, h // P, d).permute(2, 0, 1, 3, 4).contiguous().flatten(0, 1)
        splits = [send.shape[0] // P + 1, send.shape[0] // P - 1]
        recv = funcol.wait_tensor(funcol.all_to_all_single(send, splits, splits, g))
        return recv.reshape(P, b, s, h // P, d).permute(1, 3, 0, 2, 4).reshape(b, h // P, P * s, d)

    def fn(q, k, v):
        q, k, v = (scatter(t) for t in (q, k, v))
        return _gather_heads(F.scaled_dot_product_attention(q, k, v), g)

    return fn


def _dropout(g):
    def fn(q, k, v):
        q, k, v = (_scatter_heads(t, g) for t in (q, k, v))
        return _gather_heads(F.scaled_dot_product_attention(q, k, v, dropout_p=0.1), g)

    return fn


def _strided(g):
    def fn(q, k, v):
        q, k, v = (_scatter_heads(t, g, strided=True) for t in (q, k, v))
        return _gather_heads(F.scaled_dot_product_attention(q, k, v), g)

    return fn


def _inplace(g):
    def fn(q, k, v):
        b, s, h, d = q.shape
        recv = _head_blocks(q, g)
        q.mul_(0)  # after the send: chunks sent later would read zeros
        q2 = recv.permute(1, 3, 0, 2, 4).reshape(b, h // P, P * s, d)
        k, v = (_scatter_heads(t, g) for t in (k, v))
        return _gather_heads(F.scaled_dot_product_attention(q2, k, v), g)

    return fn


def _funcol(g):
    return lambda q, k, v: attn_funcol(q, k, v, g)


def _fused_qkv(g):
    return lambda q, k, v: attn_fused_qkv(q, k, v, g)


# each bad input: a builder of the function (given the group), the tracer, the chunks, and what
# the reason must say
BAD_INPUTS = {
    "uneven split sizes": (_uneven, "make_fx", 2, "uneven all-to-all split sizes"),
    "dropout": (_dropout, "dynamo", 2, "dropout_p=0.1"),  # make_fx would bake one random draw in
    "heads owned in strides": (_strided, "make_fx", 2, "does not scatter heads"),
    "in-place write to sent storage": (_inplace, "make_fx", 2, "writes in place"),
    "more chunks than heads": (_funcol, "make_fx_real", 3, "3 chunks requested"),
    # q, k and v already share one exchange: one chunk has nothing to pipeline and nothing to fuse
    "one chunk": (_fused_qkv, "export", 1, "one chunk"),
}
_graphs: dict[str, torch.fx.GraphModule] = {}


def _bad_graph(kind: str) -> torch.fx.GraphModule:
    if kind not in _graphs:  # tracing is the slow part; a graph is only read
        build, tracer = BAD_INPUTS[kind][:2]
        _graphs[kind] = trace(build(ranks.group(P)), _inputs(), tracer)
    return _graphs[kind]


@examples(30)
@given(st.data())
def test_every_skipped_graph_is_structurally_unchanged(data):
    kind = data.draw(st.sampled_from(["emit fails half way", "no shape metadata", *BAD_INPUTS]))
    event(kind)
    if kind == "emit fails half way":
        case: UlyssesCase = data.draw(ulysses_cases(max_world=4, min_local_heads=2))
        tracer = data.draw(st.sampled_from(["make_fx", "make_fx_real", "dynamo"]))
        gm = trace(case.function(), case.example_inputs(), tracer)
        if not hcms_compile.rewrite(gm, chunks=case.chunks, exact="rounding").sites[0].rewritten:
            return  # nothing to fail in
        reads = _value_reads(gm, case.chunks)
        n = data.draw(st.integers(1, reads))
        with pytest.MonkeyPatch.context() as mp:
            _FailAt(mp, n)
            result = hcms_compile.rewrite(gm, chunks=case.chunks, exact="rounding")
        reason = f"forced failure at value read {n}"
    elif kind == "no shape metadata":
        gm = torch.fx.symbolic_trace(_direct_ops)
        result = hcms_compile.rewrite(gm, chunks=2)
        reason = "no shape metadata: pass example_inputs="
    else:
        _, _, chunks, reason = BAD_INPUTS[kind]
        gm = _bad_graph(kind)
        result = hcms_compile.rewrite(gm, chunks=chunks)
    assert result.sites and not any(s.rewritten for s in result.sites), result
    assert any(reason in s.reason for s in result.sites), (reason, result)
    assert graph_signature(result.graph_module) == graph_signature(gm)
    assert_untouched(gm, result)


def _direct_ops(q, k, v):
    """Ulysses attention written with the functional collective ops themselves, which
    `torch.fx.symbolic_trace` records as they are (funcol's Python wrappers it traces through)."""
    group_name = ranks.group(P).group_name

    def exchange(x):  # dim 0 is the P rank blocks: one row each way per rank
        return torch.ops._c10d_functional.wait_tensor.default(
            torch.ops._c10d_functional.all_to_all_single.default(x, [1] * P, [1] * P, group_name))

    def scatter_heads(x):
        send = x.reshape(B, S_LOCAL, P, H // P, D).permute(2, 0, 1, 3, 4).contiguous()
        return exchange(send).permute(1, 3, 0, 2, 4).reshape(B, H // P, P * S_LOCAL, D)

    o = F.scaled_dot_product_attention(scatter_heads(q), scatter_heads(k), scatter_heads(v))
    send = o.reshape(B, H // P, P, S_LOCAL, D).permute(2, 0, 3, 1, 4).contiguous()
    return exchange(send).permute(1, 2, 0, 3, 4).reshape(B, S_LOCAL, H, D)
