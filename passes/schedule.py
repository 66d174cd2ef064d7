"""Pipeline order for the nodes of one rewritten site.

Terms
- stage: the nodes of one chunk that belong together on one lane: `send` (slice, layout copies, the
  fused buffer and the input all-to-alls), `receive` (the waits and layout ops up to attention),
  `attend` (attention, output layout and the output all-to-all), `collect` (the output wait and its
  view).
- comm stream: ProcessGroupNCCL runs every collective of a group on one stream, in issue order, and
  makes that stream wait for all compute issued before each collective (shared/PERFORMANCE.md, section 3).
  An input exchange issued after an output exchange therefore waits for it, and for the attention
  that output exchange waits for, although it depends on neither.
- pipeline order (inputs first): every chunk's send stage in chunk order, then per chunk its
  receive and attend stages, then the collects. No input exchange is queued behind an output
  exchange, chunk c's output exchange is issued right after its attention, and each wait sits just
  before its first use. All inputs are in flight at once, as in the site before the rewrite.

Steps of `pipeline_order(stages, tail)`:
1. Every chunk's send stage, in chunk order.
2. For each chunk c: its receive and attend stages.
3. The collect stages in chunk order, then `tail` (the reassembly), which is the first use of every
   output wait.
`apply_order` then moves the nodes, in that order, before an anchor node; `pin_pipeline` makes the
order data dependencies for Inductor.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

from torch.fx import Graph, Node
from torch.utils._ordered_set import OrderedSet


@dataclass
class ChunkStages:
    send: list[Node] = field(default_factory=list)
    receive: list[Node] = field(default_factory=list)
    attend: list[Node] = field(default_factory=list)
    collect: list[Node] = field(default_factory=list)


def pipeline_order(stages: list[ChunkStages], tail: list[Node]) -> list[Node]:
    order: list[Node] = [node for chunk in stages for node in chunk.send]
    for chunk in stages:
        order += chunk.receive + chunk.attend
    for chunk in stages:
        order += chunk.collect
    return order + tail


def apply_order(order: list[Node], anchor: Node) -> None:
    for node in order:
        anchor.prepend(node)


def pin_pipeline(graph: Graph) -> int:
    """Make the pipeline order data dependencies, so that Inductor's scheduler cannot undo it.

    Inductor's default memory-driven reordering moves each wait up next to its collective, which
    serialises the exchanges again. `control_deps` (Inductor's ordering HOP) pins, per site: every
    input all-to-all before chunk 0's attention (so none is queued behind an output exchange),
    chunk c+1's input waits after chunk c's attention, chunk c's output all-to-all before chunk
    c+1's attention, and the output waits after the last output all-to-all. Returns the number of
    pinned nodes.
    """
    try:
        from torch._inductor.fx_passes.control_dependencies import preserve_node_ordering
    except ImportError:  # an Inductor without control_deps: the order is left to its scheduler
        return 0

    tagged: dict[int, dict[int, dict[str, list[Node]]]] = {}
    for node in graph.nodes:
        tag = node.meta.get("hcms")
        if tag is None or tag["chunk"] is None:
            continue
        if tag["role"] == "attention" and node.target is operator.getitem:
            continue
        tagged.setdefault(tag["site"], {}).setdefault(tag["chunk"], {}).setdefault(tag["role"], []).append(node)
    deps: dict[Node, OrderedSet[Node]] = {}

    def need(node: Node, before: list[Node]) -> None:
        if before:  # one chunk (the fused plain site) has nothing to pin
            deps.setdefault(node, OrderedSet()).update(before)

    for chunks in tagged.values():
        order = [chunks[c] for c in sorted(chunks)]
        need(order[0]["attention"][0], [a2a for chunk in order[1:] for a2a in chunk["all_to_all"]])
        for this, nxt in zip(order, order[1:], strict=False):
            (attention,) = this["attention"]
            for wait in nxt["wait"]:
                need(wait, [attention])
            need(nxt["attention"][0], this["output_all_to_all"])
        last_sent = order[-1]["output_all_to_all"]
        for chunk in order[:-1]:
            for wait in chunk["output_wait"]:
                need(wait, last_sent)
    preserve_node_ordering(graph, deps)
    return len(deps)
