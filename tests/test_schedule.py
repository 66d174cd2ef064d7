"""The rewritten nodes are annotated and ordered as a pipeline."""

from __future__ import annotations

from hcms_compile.passes.ops import attention_op, is_all_to_all, is_wait, layout_op
from hypothesis import given
from hypothesis import strategies as st

import hcms_compile
from hcms_compile.testing.strategies import ulysses_cases
from hcms_compile.testing.tracing import trace
from tests.helpers import examples


def _rewritten(case, tracer):
    gm = trace(case.function(), case.example_inputs(), tracer)
    result = hcms_compile.rewrite(gm, chunks=case.chunks, exact="rounding")
    assert result.sites[0].rewritten, result
    return gm, result.graph_module


@examples(30)
@given(ulysses_cases(max_world=4, min_local_heads=2), st.sampled_from(["make_fx", "dynamo"]))
def test_pipeline_order(case, tracer):
    _, gm = _rewritten(case, tracer)
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    tagged = [n for n in nodes if "hcms" in n.meta]
    chunks = sorted({n.meta["hcms"]["chunk"] for n in tagged if n.meta["hcms"]["chunk"] is not None})
    assert chunks == list(range(case.chunk_count))

    def first(chunk, role):
        return min(pos[n] for n in tagged if n.meta["hcms"]["chunk"] == chunk and n.meta["hcms"]["role"] == role)

    def last(chunk, role):
        return max(pos[n] for n in tagged if n.meta["hcms"]["chunk"] == chunk and n.meta["hcms"]["role"] == role)

    for c in chunks:
        attention = first(c, "attention")
        if c + 1 in chunks:
            # the next chunk's input exchange is in flight while this chunk computes
            assert last(c + 1, "all_to_all") < attention
            assert last(c, "output_all_to_all") < first(c + 1, "attention")
        between = [nodes[i].meta["hcms"]["role"] for i in range(attention, first(c, "output_all_to_all"))]
        assert set(between) <= {"attention", "output_layout"}, between

    for wait in (n for n in nodes if is_wait(n) and layout_op(n) is None):
        user = min(pos[u] for u in wait.users)
        assert all(is_wait(nodes[i]) for i in range(pos[wait] + 1, user)), "compute between a wait and its use"


@examples(20)
@given(ulysses_cases(max_world=4, min_local_heads=2), st.sampled_from(["make_fx", "dynamo", "export"]))
def test_every_new_node_is_annotated_with_site_chunk_role_and_stream(case, tracer):
    original, gm = _rewritten(case, tracer)
    old_names = {n.name for n in original.graph.nodes}
    key = "example_value" if tracer == "dynamo" else "val"
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") or node.name in old_names:
            continue
        tag = node.meta["hcms"]
        assert set(tag) == {"site", "chunk", "role", "stream"} and tag["site"] == 0
        assert key in node.meta, f"{node.name} has no {key}"
        if is_all_to_all(node) or (is_wait(node) and layout_op(node) is None):
            assert tag["stream"] == "comm"
        else:
            assert tag["stream"] == "compute"
        if attention_op(node) is not None:
            assert tag["role"] == "attention"
