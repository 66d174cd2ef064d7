"""Rewrite one matched site into per-chunk nodes in pipeline order.

Terms
- chunk: a contiguous range [start, start + size) of the site's local heads. Chunking the local
  head atom (never the global head axis) keeps every head on the rank that owned it.
- override: the atom sizes of a chunk (the head atom resized), from which every replayed reshape
  gets its shape.
- slice point: the earliest node on an input's send path where the head atom is a whole dim, so
  that the slice is a view and the path's own copy (its `contiguous`) is the only copy.
- annotation: `node.meta["hcms"] = {"site", "chunk", "role", "stream"}` on every new node; the
  stream is "comm" for all-to-alls and their waits, "compute" otherwise. Symbolic size arguments
  (role "size") serve every chunk, so their chunk is None.
- c10d exchange: make_fx's in-place `c10d.alltoall_base_` (see `ops.py`). Its chunks are
  functional all-to-alls on the process group's name with a `wait_tensor` each; the buffer it
  filled, which stood for its wait, is replaced by the reassembled result.
- fused exchange (`plan.fused`): one chunk's exchanges of one direction, process group and dtype
  (q, k, v; dq, dk, dv) as one all-to-all. Each buffer is viewed rank-major as [P, n_i] and the
  views are concatenated on dim 1; the received [P, sum n_i] buffer is sliced back on dim 1, and
  each [P, n_i] piece is what its exchange would have received (an all-to-all only moves bytes).
- exchange kind (`plan.exchange`): every all-to-all and wait the rewrite emits goes through
  `exchanges.EXCHANGES[kind]` (the group's own all-to-all, in the traced op's form, or the
  copy-engine op); nothing else here depends on the kind.
- whole: a plan of one chunk, the fused plain site: the send buffers are sent as they are and the
  received output is the result, with no slicing or concatenation.

Steps of `rewrite_site(graph, site, plan)`:
1. For each chunk and each input exchange: slice at the slice point (or view the send buffer by
   atoms and slice it) and replay the rest of the send path with the chunk's sizes; exchange the
   buffers (fused or one by one, `transfer`), wait, and replay the receive tree up to the
   attention's inputs from each received piece (a view where every user of the wait reshapes it;
   a wait on a waited tensor is skipped); slice local inputs on their head axis.
   A stack or cat of one tensor's pieces is replayed from the atoms (view, permute, reshape), so
   its split sizes follow the chunk; its pieces are not replayed.
2. Per chunk: the attention op on the chunk's inputs; replay each output exchange's path, then
   exchange (fused or not) and wait. Outputs stacked into one exchange (dq, dk, dv) are stacked the
   same way from the chunk's slices.
3. Reassemble: view each chunk's receive buffer by atoms, concatenate on the head atom, view back
   to the original receive shape, and hand that to the original output wait's users. Escapes get
   the concatenation of their chunks, with the original strides: attention inputs and outputs on
   their head axis, receive-tree nodes (a wait, a permute, a repeat) the way output waits are
   collected, on the head atom; outputs that are the same in every chunk (RNG state) come from
   chunk 0. A no-op wait the user put on the output wait (funcol waits twice) is dropped, so that
   Inductor can let a pointwise consumer read the chunks' pieces instead of their concatenation.
4. Recompute every size query of the site's nodes (make_fx's `sym_size` of an exchanged tensor) from
   nodes outside the site, order the new nodes with `schedule.pipeline_order`, then erase the
   original site. Symbolic sizes (a dynamic sequence length) are graph nodes throughout: replayed
   reshapes, atom views and split sizes take them from `Emitter.size_arg`.
Any shape that does not check raises `EmitError` before the original nodes are touched; the
caller then calls `Emitter.rollback()` and the site stays as it was.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from torch.fx import Graph, Node
from torch.fx.node import map_arg

from . import symbolic
from .emit import Emitter
from .exchanges import EXCHANGES
from .layout import Atom, Layout
from .match import Escape, InputExchange, Site, shape_of, value_of
from .ops import (
    CAT,
    EXPAND,
    IDENTITY,
    REGROUP,
    STACK,
    aten,
    inplace_fill,
    is_c10d_all_to_all,
    is_wait,
    joined_by,
    layout_op,
    replace_attention_inputs,
)
from .plan import ChunkPlan, fusion_key
from .schedule import ChunkStages, apply_order, pipeline_order
from .symbolic import Size, is_size_query, same

COMM = "comm"
COMPUTE = "compute"


@dataclass(frozen=True)
class _Send:
    """One chunk's buffer for one exchange: what `_SiteWriter.transfer` sends."""

    buffer: Node  # contiguous, rank-major on dim 0
    original: Node  # the all-to-all it stands in for
    original_wait: Node
    shape: tuple[Size, ...]  # the buffer's shape in this chunk

    @property
    def rows(self) -> Size:
        return self.shape[0]


class _SiteWriter:
    def __init__(self, emitter: Emitter, site: Site) -> None:
        self.emit = emitter
        self.site = site
        self.atoms = site.atoms
        self.layouts = site.layouts
        emitter.avoid = set(_site_nodes(site))

    def tag(self, since: int, chunk: int | None, role: str, stream: str = COMPUTE) -> list[Node]:
        nodes = self.emit.created[since:]
        for node in nodes:
            node.meta["hcms"] = {"site": self.site.index, "chunk": chunk, "role": role, "stream": stream}
        return nodes

    def mark(self) -> int:
        return len(self.emit.created)

    # -- replaying layout nodes ----------------------------------------------------------------
    def replay(self, nodes: Iterable[Node], mapping: dict[Node, Node], override: dict[Atom, int],
               layouts: dict[Node, Layout] | None = None) -> None:
        layouts = self.layouts if layouts is None else layouts
        for node in nodes:
            fill = inplace_fill(node)
            if fill is not None:  # the in-place buffer is the wait's result under another name
                mapping[node] = mapping[fill.args[1]]
                continue
            if joined_by(node) is not None:
                continue  # a piece of a stack or cat: the join is replayed from the split's input
            step = layout_op(node)
            if step is not None and step.kind == IDENTITY and is_wait(node):
                # a wait on a waited tensor: its fake value would claim a fresh contiguous tensor,
                # while it returns its input, maybe a fused exchange's strided piece
                mapping[node] = mapping[step.source]
            elif step is not None and step.kind == REGROUP:
                shape = self.atoms.shape(layouts[node], override)
                mapping[node] = self.emit.reshape(mapping[step.source], shape, like=node)
            elif step is not None and step.kind == EXPAND:
                mapping[node] = self.emit.expand(mapping[step.source], self.atoms.shape(layouts[node], override))
            elif step is not None and step.kind in (STACK, CAT):
                mapping[node] = self.regroup(mapping[step.source], layouts[step.source], layouts[node], override)
            else:
                mapping[node] = self.emit.copy(node, mapping)

    def regroup(self, x: Node, source: Layout, target: Layout, override: dict[Atom, int]) -> Node:
        """`x` (laid out as `source`) moved to `target`, which orders the same atoms otherwise: a view
        with one dim per atom, a permute, and a reshape. Replays a join with the chunk's sizes."""
        flat = self.atoms.expand([a for dim in source for a in dim])
        order = self.atoms.expand([a for dim in target for a in dim])
        view = self.emit.reshape(x, [override.get(a, self.atoms.sizes[a]) for a in flat])
        dims = [flat.index(a) for a in order]
        moved = self.emit.method("permute", view, dims) if self.emit.dialect == "torch" \
            else self.emit.call(aten.permute.default, view, dims)
        return self.emit.reshape(moved, self.atoms.shape(target, override))

    def atom_view(self, node: Node, layout: Layout, head: Atom, override: dict[Atom, int]) -> tuple[Node, int]:
        """`node` (contiguous, with `layout`) viewed with one dim per atom, and the head dim."""
        flat = self.atoms.expand([a for dim in layout for a in dim])
        shape = [override.get(a, self.atoms.sizes[a]) for a in flat]
        return self.emit.reshape(node, shape), flat.index(head)

    def rejoin(self, escape: Escape, parts: list[Node]) -> Node:
        """The chunks' values of an escape concatenated into the whole tensor: on its head axis, or,
        for a receive-tree node whose head atom may share an axis with other factors, as output
        waits are collected: each viewed one dim per atom, concatenated on the head atom, reshaped."""
        if self.whole:
            return self.emit.reshape(parts[0], shape_of(escape.node))
        if escape.head is None:
            return self.emit.cat(parts, escape.axis)
        layout = self.layouts[escape.node]
        views = [self.atom_view(part, layout, escape.head, override)
                 for part, override in zip(parts, self.overrides, strict=True)]
        joined = self.emit.cat([view for view, _ in views], views[0][1])
        return self.emit.reshape(joined, shape_of(escape.node))

    def contiguous(self, send: Node) -> Node:
        """All-to-all needs a dense buffer; a slice or a replayed view may not be one."""
        return send if self.emit.is_contiguous(send) else self.emit.contiguous(send)

    def exchange(self, send: Node, original: Node, rows: object) -> Node:
        """An all-to-all of `send` (`rows` rows, split evenly between the ranks) on `original`'s group."""
        return self.kind.issue(self.emit, send, original, rows, self.site.world_size)

    def wait(self, a2a: Node, original: Node, original_wait: Node) -> Node:
        """The wait on a new chunk exchange `a2a` that replaces `original` (waited by `original_wait`)."""
        return self.kind.wait(self.emit, a2a, original, original_wait)

    def takes_view(self, ex: InputExchange, value: Node) -> bool:
        """Whether the receive tree can start from `value` as it is: the wait's own value, or a fused
        exchange's [P, n] piece that every user of the wait reshapes anyway (so the reshape, not an
        extra copy into the wait's shape, reads the piece)."""
        have, want = shape_of(value), shape_of(ex.wait)
        if value is ex.wait or (len(have) == len(want) and all(map(same, have, want))):
            return True
        receive = set(ex.receive)
        escaped = any(escape.node is ex.wait for escape in self.site.escapes)
        return not escaped and all(
            user in receive and (step := layout_op(user)) is not None and step.kind == REGROUP
            for user in ex.wait.users)

    def transfer(self, c: int, items: list[_Send], roles: tuple[str, str, str, str],
                 stages: tuple[list[Node], list[Node]]) -> list[Node]:
        """Send each item's buffer with its exchange; returns what each one received.

        Items of one fusion group travel in one all-to-all: each buffer viewed as [P, n_i] (rank
        first, as the exchange splits it), concatenated on dim 1 into one [P, sum n_i] buffer, and
        the received buffer sliced back on dim 1. An all-to-all only moves bytes, so the pieces hold
        exactly what the separate exchanges received; a received piece is a [P, n_i] view, which the
        caller views in its own shape. `roles` names the fused buffer, the all-to-all, the wait and
        the slices; `stages` takes the issuing nodes and the receiving ones.
        """
        issue, receive = stages
        world = self.site.world_size
        received: list[Node | None] = [None] * len(items)
        for group in self.fusion_groups(items):
            first = items[group[0]]
            mark = self.mark()
            if len(group) == 1:
                buffer, rows = first.buffer, first.rows
            else:
                widths = [symbolic.size(math.prod(items[i].shape) // world) for i in group]
                flat = [self.emit.reshape(items[i].buffer, [world, w]) for i, w in zip(group, widths, strict=True)]
                buffer, rows = self.emit.cat(flat, 1), world
            issue += self.tag(mark, c, roles[0])
            mark = self.mark()
            a2a = self.exchange(buffer, first.original, rows)
            issue += self.tag(mark, c, roles[1], COMM)
            mark = self.mark()
            wait = self.wait(a2a, first.original, first.original_wait)
            receive += self.tag(mark, c, roles[2], COMM)
            if len(group) == 1:
                received[group[0]] = wait
                continue
            mark = self.mark()
            start: Size = 0
            for i, width in zip(group, widths, strict=True):
                received[i] = self.emit.narrow(wait, 1, start, width)
                start = start + width
            receive += self.tag(mark, c, roles[3])
        return received

    def fusion_groups(self, items: list[_Send]) -> list[list[int]]:
        """Which items share an all-to-all: with fusion on, those with one `plan.fusion_key`."""
        groups: dict[object, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(fusion_key(item.original_wait) if self.fused else i, []).append(i)
        return list(groups.values())

    # -- step 1 --------------------------------------------------------------------------------
    def send(self, ex: InputExchange, start: int, size: int, override: dict[Atom, int]) -> Node:
        if self.whole:
            return ex.send_path[-1]  # one chunk (the fused plain site) sends the whole buffer
        mapping: dict[Node, Node] = {}
        for i, node in enumerate(ex.send_path):
            dims = self.atoms.resolve(ex.send_layouts[node])
            if (ex.head,) in dims:
                mapping[node] = self.emit.narrow(node, dims.index((ex.head,)), start, size)
                self.replay(ex.send_path[i + 1 :], mapping, override, ex.send_layouts)
                return mapping[ex.send_path[-1]]
        buffer = ex.send_path[-1]
        view, dim = self.atom_view(buffer, ex.send_layouts[buffer], ex.head, {})
        piece = self.emit.contiguous(self.emit.narrow(view, dim, start, size))
        return self.emit.reshape(piece, self.atoms.shape(ex.send_layouts[buffer], override))

    # -- steps 1 to 3 for one chunk ------------------------------------------------------------
    def chunk(self, c: int, start: int, size: int) -> ChunkStages:
        site, stages = self.site, ChunkStages()
        # under grouped-query attention a chunk of query heads takes its KV heads: fewer, by the group
        in_div = {ex: site.divisor(ex.feeds[0]) for ex in site.inputs}
        # stacked outputs share one shape, so the first one's divisor is every one's
        out_div = {out: site.divisor(output=out.sources[0][0]) for out in site.outputs}
        override = {ex.head: size // in_div[ex] for ex in site.inputs}
        override |= {out.head: size // out_div[out] for out in site.outputs}
        mapping: dict[Node, Node] = {}
        sends = []
        for ex in site.inputs:
            mark = self.mark()
            div = in_div[ex]
            buffer = self.contiguous(self.send(ex, start // div, size // div, override))
            stages.send += self.tag(mark, c, "send_layout")
            sends.append(_Send(buffer, ex.all_to_all, ex.wait, self.atoms.shape(ex.send_layouts[ex.send_path[-1]],
                                                                                 override)))
        received = self.transfer(c, sends, ("send_layout", "all_to_all", "wait", "receive_layout"),
                                 (stages.send, stages.receive))
        for ex, value in zip(site.inputs, received, strict=True):
            mark = self.mark()
            mapping[ex.wait] = value if self.takes_view(ex, value) else self.emit.reshape(
                value, self.atoms.shape(self.layouts[ex.wait], override))
            self.replay(ex.receive, mapping, override)
            stages.receive += self.tag(mark, c, "receive_layout")
        mark = self.mark()
        for name, axis in site.locals.items():
            node, div = site.heads[name], site.divisor(name)
            mapping[node] = self.emit.narrow(node, axis % len(shape_of(node)), start // div, size // div)
        stages.receive += self.tag(mark, c, "local_slice")

        mark = self.mark()
        attention = site.attention
        chunk_heads = {name: mapping[node] for name, node in site.heads.items()}
        args, kwargs = replace_attention_inputs(attention, site.op, chunk_heads)
        result = self.emit.call(attention.target, *args, **kwargs)
        wanted = {i for out in site.outputs for i, _ in out.sources}
        wanted |= {e.output for e in site.escapes if e.output is not None}
        if c == 0:
            wanted |= set(site.shared_outputs)  # RNG state and offsets: the same for every chunk
        outs = {i: self.emit.getitem(result, i) if site.op.returns_tuple else result for i in sorted(wanted)}
        stages.attend += self.tag(mark, c, "attention")
        for escape in site.escapes:
            self.parts[escape].append(outs[escape.output] if escape.output is not None else mapping[escape.node])
        self.overrides.append(override)
        if c == 0:
            self.shared = {i: outs[i] for i in site.shared_outputs}

        sends = []
        for out in site.outputs:
            mark = self.mark()
            values = {source: outs[i] for i, source in out.sources}  # a stack is replayed on the chunk's slices
            self.replay(out.send_path, values, override)
            buffer = out.send_path[-1] if out.send_path else out.sources[0][1]
            sends.append(_Send(self.contiguous(values[buffer]), out.all_to_all, out.wait,
                               self.atoms.shape(self.layouts[buffer], override)))
            stages.attend += self.tag(mark, c, "output_layout")
        received = self.transfer(c, sends, ("output_layout", "output_all_to_all", "output_wait", "collect"),
                                 (stages.attend, stages.collect))
        for k, (out, value) in enumerate(zip(site.outputs, received, strict=True)):
            mark = self.mark()
            # a fused exchange's piece is rank-major like the buffer, so its atom view is still a view
            self.collected[k].append((self.emit.reshape(value, shape_of(out.wait)), 0) if self.whole
                                     else self.atom_view(value, self.layouts[out.wait], out.head, override))
            stages.collect += self.tag(mark, c, "collect")
        return stages

    def run(self, plan: ChunkPlan) -> None:
        site = self.site
        self.fused = plan.fused
        self.kind = EXCHANGES[plan.exchange]
        self.whole = len(plan.chunk_sizes) == 1
        self.collected: list[list[tuple[Node, int]]] = [[] for _ in site.outputs]
        self.parts: dict[Escape, list[Node]] = {e: [] for e in site.escapes}
        self.shared: dict[int, Node] = {}
        self.overrides: list[dict[Atom, int]] = []  # each chunk's atom sizes, to view its escaped receive nodes
        stages = [self.chunk(c, start, size)
                  for c, (start, size) in enumerate(zip(plan.offsets, plan.chunk_sizes, strict=True))]
        mark = self.mark()
        results = []
        for out, views in zip(site.outputs, self.collected, strict=True):
            if self.whole:  # one chunk: its received tensor is the whole result
                results.append(views[0][0])
                continue
            joined = self.emit.cat([view for view, _ in views], views[0][1])
            results.append(self.emit.reshape(joined, shape_of(out.wait)))
        escaped = {e: self.emit.restride(self.rejoin(e, parts), e.node) for e, parts in self.parts.items()}
        tail = self.tag(mark, None, "reassemble")
        sizes = self.size_queries()
        apply_order(pipeline_order(stages, tail), site.attention)

        graph = self.emit.graph
        for out, result in zip(site.outputs, results, strict=True):
            if out.fill is not None:
                buffer = out.fill.args[0]
                out.fill.replace_all_uses_with(result)  # export and AOTAutograd read the fill's result
                graph.erase_node(out.fill)
                buffer.replace_all_uses_with(result)
                graph.erase_node(buffer)
            # a c10d exchange's buffer (its wait) is also its first argument: that use goes with it
            out.wait.replace_all_uses_with(result, delete_user_cb=lambda user, out=out: user is not out.all_to_all)
            _drop_noop_waits(graph, result)
        for escape, value in escaped.items():
            for user in escape.users:
                user.replace_input_with(escape.node, value)
        for index, value in self.shared.items():
            for user in site.shared_outputs[index]:
                user.replace_input_with(next(u for u in site.attention.users if u.args[1] == index), value)
        for query, value in sizes.items():
            for user in list(query.users):
                user.args = map_arg(user.args, lambda n, q=query, v=value: v if n is q else n)
                user.kwargs = map_arg(user.kwargs, lambda n, q=query, v=value: v if n is q else n)
            graph.erase_node(query)
        _erase_site(graph, site)
        self.emit.drop_unused_sizes()
        for node in self.emit.size_nodes:  # shared by every chunk, so they belong to none
            node.meta["hcms"] = {"site": site.index, "chunk": None, "role": "size", "stream": COMPUTE}

    def size_queries(self) -> dict[Node, int | Node | tuple[int | Node, ...]]:
        """Each size read from a node of the site (make_fx's `sym_size`), as a size computed from
        nodes outside it, so that the site can be erased."""
        site_nodes = set(_site_nodes(self.site))
        order = {node: i for i, node in enumerate(self.emit.graph.nodes)}
        anchor = order[self.site.attention]
        sizes: dict[Node, int | Node | tuple[int | Node, ...]] = {}
        for node in site_nodes:
            for query in (u for u in node.users if is_size_query(u)):
                # a size used before the attention (a split size, say) is rebuilt where it was read
                before = query if any(u not in site_nodes and order[u] < anchor for u in query.users) else None
                value = value_of(query)
                sizes[query] = tuple(self.emit.size_arg(v, before) for v in value) if isinstance(
                    value, (tuple, list)) else self.emit.size_arg(value, before)  # x.size(): all dims
        return sizes


def _drop_noop_waits(graph: Graph, result: Node) -> None:
    """A wait on the reassembled output (funcol waits twice: its wrapper's wait, then the user's) is
    an identity on a computed tensor; to Inductor it is an extern call, which would materialise the
    concatenation of the chunks instead of letting a pointwise consumer read the pieces."""
    for user in list(result.users):
        if is_wait(user) and user.args[0] is result and not user.kwargs:
            user.replace_all_uses_with(result)
            graph.erase_node(user)


def _site_nodes(site: Site) -> list[Node]:
    """The nodes the rewrite replaces (send paths only where nothing else uses them)."""
    nodes: list[Node] = []
    for out in site.outputs:
        nodes += [*_exchange_nodes(out.all_to_all, out.wait), *reversed(out.send_path)]
    nodes += list(site.attention.users)
    nodes.append(site.attention)
    for ex in site.inputs:
        nodes += [ex.fill] if ex.fill is not None else []
        nodes += [*reversed(ex.receive), *_exchange_nodes(ex.all_to_all, ex.wait)]
    for ex in site.inputs:
        nodes += reversed(ex.send_path[1:])
    return nodes


def _erase_site(graph: Graph, site: Site) -> None:
    erased: set[Node] = set()
    for node in _site_nodes(site):
        # send paths may be shared with other users, and so may survive
        if node not in erased and not node.users:
            graph.erase_node(node)
            erased.add(node)
    if site.attention not in erased:
        raise RuntimeError(f"internal error: {site.attention.name} still has users after the rewrite")


def _exchange_nodes(a2a: Node, wait: Node) -> list[Node]:
    """An exchange's nodes in an order they can be erased in: a c10d exchange uses its buffer (the
    wait) and the get_attr of its process group, a functional one is used by its wait."""
    if is_c10d_all_to_all(a2a):
        return [a2a, wait, *(n for n in a2a.all_input_nodes if n.op == "get_attr")]
    return [wait, a2a]


def rewrite_site(graph: Graph, site: Site, plan: ChunkPlan) -> None:
    emitter = Emitter(graph, site.attention)
    try:
        _SiteWriter(emitter, site).run(plan)
    except Exception:
        emitter.rollback()
        raise
