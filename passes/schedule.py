"""Pipeline order for the nodes of one rewritten site.

Terms
- stage: the nodes of one chunk that belong together on one lane: `send` (slice, layout copies and
  the input all-to-alls), `receive` (the waits and layout ops up to attention), `attend` (attention,
  output layout and the output all-to-all), `collect` (the output wait and its view).
- pipeline order: chunk c+1's input exchange is issued before chunk c's attention, chunk c's output
  exchange right after its attention, and each wait sits just before its first use.

Steps of `pipeline_order(stages, tail)`:
1. Issue chunk 0's and chunk 1's sends.
2. For each chunk c: its receive and attend stages, then chunk c+2's send, so that one input
   exchange is always in flight behind the running attention.
3. The collect stages in chunk order, then `tail` (the reassembly), which is the first use of every
   output wait.
`apply_order` then moves the nodes, in that order, before an anchor node.
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
    order: list[Node] = []
    for chunk in stages[:2]:
        order += chunk.send
    for c, chunk in enumerate(stages):
        order += chunk.receive + chunk.attend
        if c + 2 < len(stages):
            order += stages[c + 2].send
    for chunk in stages:
        order += chunk.collect
    return order + tail


def apply_order(order: list[Node], anchor: Node) -> None:
    for node in order:
        anchor.prepend(node)


def pin_pipeline(graph: Graph) -> int:
    """Make the pipeline order data dependencies, so that Inductor's scheduler cannot undo it.

    Inductor's default memory-driven reordering moves each wait up next to its collective, which
    serialises the exchanges again. `control_deps` (Inductor's ordering HOP) pins, per site:
    chunk c+1's input all-to-alls before chunk c's attention, their waits after it, chunk c's
    output all-to-all before chunk c+1's attention, and the output waits after the last output
    all-to-all. Returns the number of pinned nodes.
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
        deps.setdefault(node, OrderedSet()).update(before)

    for chunks in tagged.values():
        order = [chunks[c] for c in sorted(chunks)]
        for this, nxt in zip(order, order[1:], strict=False):
            (attention,) = this["attention"]
            need(attention, nxt["all_to_all"])
            for wait in nxt["wait"]:
                need(wait, [attention])
            need(nxt["attention"][0], this["output_all_to_all"])
        last_sent = order[-1]["output_all_to_all"]
        for chunk in order[:-1]:
            for wait in chunk["output_wait"]:
                need(wait, last_sent)
    preserve_node_ordering(graph, deps)
    return len(deps)
