"""Assertions shared by the rewrite tests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from hcms_compile.passes.ops import is_all_to_all
from hypothesis import settings
from torch.fx import Graph, GraphModule, Node

import hcms_compile.api
from hcms_compile.report import RewriteResult
from hcms_compile.testing import ranks
from hcms_compile.testing.strategies import UlyssesCase


def examples(ci: int) -> settings:
    """`ci` examples under the CI profile; the loaded profile's count (1000 when thorough) otherwise."""
    if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci":
        return settings(max_examples=ci)
    return settings()


def is_exchange_node(node: Node) -> bool:
    """An all-to-all of either exchange kind: the group's own, or the copy-engine op (which graphs
    rewritten with exchange="copy-engine", or under HCMS_EXCHANGE=copy-engine, hold instead)."""
    return is_all_to_all(node) or node.target is torch.ops.hcms.all_to_all.default


def count_all_to_alls(gm: GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if is_exchange_node(n))


def _outputs(original: GraphModule, rewritten: GraphModule, case: UlyssesCase, seed: int):
    inputs = case.sharded_inputs(seed)
    expected = ranks.run_on_ranks(original, inputs, case.world_size)
    actual = ranks.run_on_ranks(rewritten, inputs, case.world_size)
    return zip(expected, actual, strict=True)


def assert_close_on_ranks(original: GraphModule, rewritten: GraphModule, case: UlyssesCase, seed: int = 0) -> None:
    tol = 1e-5 if case.dtype == torch.float32 else 2e-2
    for want, got in _outputs(original, rewritten, case, seed):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def assert_bitwise_on_ranks(original: GraphModule, rewritten: GraphModule, case: UlyssesCase, seed: int = 0) -> None:
    for rank, (want, got) in enumerate(_outputs(original, rewritten, case, seed)):
        want_leaves = torch.utils._pytree.tree_leaves(want)
        got_leaves = torch.utils._pytree.tree_leaves(got)
        assert len(want_leaves) == len(got_leaves)
        for w, g in zip(want_leaves, got_leaves, strict=True):
            assert w.shape == g.shape and w.dtype == g.dtype, f"rank {rank}: {g.shape}/{g.dtype} vs {w.shape}/{w.dtype}"
            if not torch.equal(w, g):
                diff = (w.float() - g.float()).abs()
                raise AssertionError(f"rank {rank}: rewritten output differs from the original in "
                                     f"{int((diff > 0).sum())} elements (max {diff.max().item():.3g}); {case}")


# -- "left exactly as it was" -------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSignature:
    """What a node is, structurally: its inputs by name, everything else by value."""

    name: str
    op: str
    target: str
    args: Any
    kwargs: Any


def _structure(value: Any) -> Any:
    if isinstance(value, Node):
        return ("%", value.name)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__ if isinstance(value, tuple) else "list", tuple(_structure(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _structure(v)) for k, v in value.items()))
    if isinstance(value, torch.Tensor):
        return ("tensor", repr(value))
    return value


def graph_signature(graph: Graph | GraphModule) -> tuple[NodeSignature, ...]:
    """Every node in graph order: name, op, target, and the structure of its args and kwargs.
    Two graphs with equal signatures compute the same thing the same way; `gm.code` cannot say
    that of a graph changed after its last `recompile()`."""
    graph = graph.graph if isinstance(graph, GraphModule) else graph
    return tuple(NodeSignature(n.name, n.op, n._pretty_print_target(n.target), _structure(n.args),
                               _structure(n.kwargs)) for n in graph.nodes)


def _inputs_match(old: Any, new: Any, erased: set[str]) -> bool:
    """Equal, except that an input the rewrite erased may now be any other node (its replacement)."""
    if isinstance(old, tuple) and len(old) == 2 and old[0] == "%":
        return old == new or (old[1] in erased and isinstance(new, tuple) and len(new) == 2 and new[0] == "%")
    if isinstance(old, tuple) and isinstance(new, tuple) and len(old) == len(new):
        return all(_inputs_match(o, n, erased) for o, n in zip(old, new, strict=True))
    return old == new


def changes_beyond(before: tuple[NodeSignature, ...], graph: Graph, rewritten: set[int]) -> list[str]:
    """How `graph` differs from `before` other than by the rewrite of the sites `rewritten`: every
    original node that is left must be as it was (but for inputs a rewritten site replaced), in the
    same order, and every new node must belong to a rewritten site."""
    now = graph_signature(graph)
    if not rewritten:
        return [] if now == before else [_first_difference(before, now)]
    old = {sig.name: sig for sig in before}
    erased = set(old) - {sig.name for sig in now}
    problems = []
    kept = [sig.name for sig in now if sig.name in old]
    if kept != [sig.name for sig in before if sig.name not in erased]:
        problems.append("original nodes were reordered")
    nodes = {n.name: n for n in graph.nodes}
    for sig in now:
        was = old.get(sig.name)
        if was is None:
            tag = nodes[sig.name].meta.get("hcms")
            if tag is None or tag["site"] not in rewritten:
                problems.append(f"new node {sig.name} ({sig.target}) belongs to no rewritten site: {tag}")
        elif (sig.op, sig.target, sig.kwargs) != (was.op, was.target, was.kwargs) or \
                not _inputs_match(was.args, sig.args, erased):
            problems.append(f"{sig.name} changed: {was} -> {sig}")
    return problems


def _first_difference(before: tuple[NodeSignature, ...], now: tuple[NodeSignature, ...]) -> str:
    for i, (was, sig) in enumerate(zip(before, now, strict=False)):
        if was != sig:
            return f"node {i} changed: {was} -> {sig}"
    extra = now[len(before):] or before[len(now):]
    return f"{len(before)} nodes before, {len(now)} after; first unmatched: {extra[0]}"


def assert_untouched(before: GraphModule, result: RewriteResult) -> None:
    """A skipped site is left exactly as it was: with nothing rewritten the returned graph is
    structurally identical to `before`; otherwise only the rewritten sites' nodes (and the inputs of
    their users) changed, and every skipped site's attention node is still there, as it was."""
    rewritten = {s.index for s in result.rewritten}
    problems = changes_beyond(graph_signature(before), result.graph_module.graph, rewritten)
    assert not problems, "; ".join(problems[:5])
    old = {sig.name: sig for sig in graph_signature(before)}
    now = {sig.name: sig for sig in graph_signature(result.graph_module)}
    for site in result.sites:
        if not site.rewritten:
            assert now.get(site.attention) == old[site.attention], f"skipped site {site.attention} changed"


@contextlib.contextmanager
def every_site_checked() -> Iterator[list[str]]:
    """Check every site any rewrite attempts meanwhile (`rewrite`, `rewrite_graph`, the backend):
    a skipped site leaves the graph structurally as it was, a rewritten one changes only its own
    nodes. Yields the problems found, and raises at the first."""
    problems: list[str] = []
    apply = hcms_compile.api._apply

    def checked(graph: Graph, found: Any, *args: Any) -> Any:
        before = graph_signature(graph)
        report = apply(graph, found, *args)
        found_problems = changes_beyond(before, graph, {report.index} if report.rewritten else set())
        if found_problems:
            problems.append(f"site {report.index} ({report.attention}, {report.status}: {report.reason}): "
                            + "; ".join(found_problems[:5]))
            raise AssertionError(problems[-1])
        return report

    hcms_compile.api._apply = checked
    try:
        yield problems
    finally:
        hcms_compile.api._apply = apply
