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

from dataclasses import dataclass, field

from torch.fx import Node


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
