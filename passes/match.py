"""Find all-to-all -> attention -> all-to-all sites and prove what each exchange does.

Terms
- site: one attention op whose q, k and v each arrive from an all-to-all through layout-only ops,
  and whose output leaves through layout-only ops into an all-to-all.
- input exchange: one all-to-all feeding the attention (three for separate q, k, v; one for a fused
  stacked qkv). Its send path runs from a root (the last node that is not a layout op) to the send
  buffer; its receive tree runs from the wait to the attention's inputs.
- output exchange: the all-to-all that takes the attention's output back to sequence sharding.
- head atom: the factor (see `layout.py`) that indexes the attention's local heads; chunking cuts it.

Steps of `match_sites(gm)`:
1. Find every attention op in graph order; each is a candidate and yields a `Site` or a `Skip`.
2. Reject options that would change bits per chunk (dropout) or that this version does not slice
   (masks, GQA).
3. Walk back from q, k and v through layout ops to a wait and its all-to-all; walk back from each
   all-to-all's input to its root. Check every receive node is used only on the way to attention.
4. Follow the atoms from each root through the send path, the exchange and the receive tree; read
   the head atom at the attention's head axis (dim -3) and prove: the destination-rank factor sits
   right above the head atom at the root (the exchange scatters heads) and the source-rank factor
   leads the sequence axis (it gathers sequence).
5. Walk forward from the attention output to the output all-to-all and prove it scatters sequence
   while keeping the head atom whole, so per-chunk receive buffers can be concatenated on it.
Every failed proof is a `Skip` with a reason; a skipped site is never touched.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from . import layout as L
from .layout import Atom, AtomSpace, Layout, LayoutError
from .ops import (
    IDENTITY,
    PERMUTE,
    REGROUP,
    SELECT,
    SQUEEZE,
    TRANSPOSE,
    UNBIND,
    UNSQUEEZE,
    AttentionOp,
    attention_args,
    attention_op,
    exchange_args,
    inplace_fill,
    is_all_to_all,
    is_wait,
    layout_op,
    target_name,
    unbind_item,
)

QKV = ("query", "key", "value")


class NoMatch(Exception):
    """The reason a candidate is not a site."""


@dataclass(frozen=True)
class InputExchange:
    all_to_all: Node
    wait: Node
    send_path: tuple[Node, ...]  # root first, send buffer last (one node when the root is the buffer)
    receive: tuple[Node, ...]  # graph order, from the first node after the waits to q/k/v
    head: Atom
    feeds: tuple[str, ...]  # which of query, key, value this exchange carries
    fill: Node | None = None  # `copy_(buffer, wait)` of an in-place exchange; the buffer is in `receive`


@dataclass(frozen=True)
class OutputExchange:
    source: Node  # the attention's output tensor (a getitem for ops that return tuples)
    send_path: tuple[Node, ...]  # layout nodes after `source`, send buffer last
    all_to_all: Node
    wait: Node
    head: Atom
    fill: Node | None = None  # `copy_(buffer, wait)` of an in-place exchange


@dataclass
class Site:
    index: int
    attention: Node
    op: AttentionOp
    inputs: tuple[InputExchange, ...]
    output: OutputExchange
    group: Any
    world_size: int
    local_heads: int
    qkv: dict[str, Node]
    atoms: AtomSpace
    layouts: dict[Node, Layout] = field(repr=False)

    @property
    def kernel(self) -> str:
        return self.op.kernel


@dataclass(frozen=True)
class Skip:
    index: int
    attention: Node
    kernel: str
    reason: str
    world_size: int | None = None
    local_heads: int | None = None


def value_of(node: Node) -> Any:
    """The (fake) value the tracer recorded for `node`, or None."""
    return node.meta.get("val", node.meta.get("example_value"))


def shape_of(node: Node) -> tuple[int, ...]:
    """The static shape recorded by the tracer; NoMatch when absent or symbolic."""
    val = value_of(node)
    shape = getattr(val, "shape", None)
    if shape is None:
        tm = node.meta.get("tensor_meta")
        shape = getattr(tm, "shape", None)
    if shape is None:
        raise NoMatch(f"{node.name} has no shape metadata (trace with make_fx, export or Dynamo)")
    if not all(isinstance(s, int) for s in shape):
        raise NoMatch(f"{node.name} has a symbolic shape {tuple(shape)}")
    return tuple(int(s) for s in shape)


def world_size_of(group: Any) -> int:
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        return _resolve_process_group(group if not isinstance(group, int) else str(group)).size()
    except Exception as err:  # noqa: BLE001 - any failure means the group is unknown here
        raise NoMatch(f"cannot resolve process group {group!r}: {err}") from None


def match_sites(gm: GraphModule) -> list[Site | Skip]:
    found: list[Site | Skip] = []
    for node in gm.graph.nodes:
        op = attention_op(node)
        if op is None:
            continue
        index = len(found)
        try:
            found.append(_Matcher(node, op, index).run())
        except NoMatch as err:
            found.append(Skip(index, node, op.kernel, str(err)))
    return _drop_shared_exchanges(found)


def _drop_shared_exchanges(found: list[Site | Skip]) -> list[Site | Skip]:
    """Two sites that claim one all-to-all cannot both own its chunks."""
    owners: dict[Node, list[int]] = {}
    for i, site in enumerate(found):
        if isinstance(site, Site):
            for ex in site.inputs:
                owners.setdefault(ex.all_to_all, []).append(i)
    shared = {i for ids in owners.values() if len(ids) > 1 for i in ids}
    return [
        Skip(s.index, s.attention, s.kernel, "an input all-to-all also feeds another attention op",
             s.world_size, s.local_heads) if i in shared else s
        for i, s in enumerate(found)
    ]


class _Matcher:
    def __init__(self, attention: Node, op: AttentionOp, index: int) -> None:
        self.attention = attention
        self.op = op
        self.index = index
        self.atoms = AtomSpace()
        self.layouts: dict[Node, Layout] = {}
        self.world_size: int | None = None
        self.local_heads: int | None = None

    def run(self) -> Site | Skip:
        try:
            return self._run()
        except NoMatch as err:
            return Skip(self.index, self.attention, self.op.kernel, str(err), self.world_size, self.local_heads)
        except LayoutError as err:
            return Skip(self.index, self.attention, self.op.kernel, f"layout not understood: {err}",
                        self.world_size, self.local_heads)

    # -- step 2 --------------------------------------------------------------------------------
    def _check_options(self, args: dict[str, Any]) -> None:
        dropout = args.get("dropout_p", 0.0)
        if not isinstance(dropout, (int, float)) or dropout != 0.0:
            raise NoMatch(f"dropout_p={dropout}: per-chunk random streams would change the bits")
        if self.op.mask is not None and args.get(self.op.mask) is not None:
            raise NoMatch(f"{self.op.mask} is set: masked attention is not chunked yet")
        if args.get("enable_gqa"):
            raise NoMatch("enable_gqa=True: grouped-query attention is not chunked yet")
        for name in QKV:
            if not isinstance(args[name], Node):
                raise NoMatch(f"{name} is not a tensor in the graph")

    def _run(self) -> Site:
        args = attention_args(self.attention, self.op)
        self._check_options(args)
        qkv = {name: args[name] for name in QKV}
        shapes = {name: shape_of(n) for name, n in qkv.items()}
        if len(shapes["query"]) < 3:
            raise NoMatch(f"query has shape {shapes['query']}: no head axis")
        batch = {name: s[:-2] for name, s in shapes.items()}
        if len(set(batch.values())) != 1:
            raise NoMatch(f"q, k, v head/batch dims differ ({batch}): broadcast or GQA is not chunked yet")
        self.local_heads = shapes["query"][-3]

        # step 3: q, k, v back to their exchanges
        routes: dict[Node, tuple[list[str], set[Node], Node]] = {}
        for name, node in qkv.items():
            a2a, wait, path = self._walk_back(name, node)
            feeds, nodes, _ = routes.setdefault(a2a, ([], set(), wait))
            feeds.append(name)
            nodes.update(path)
        group, world = None, None
        exchanges = []
        for a2a, (feeds, nodes, wait) in routes.items():
            g = exchange_args(a2a).group
            if group is not None and g != group:
                raise NoMatch("q, k and v are exchanged over different process groups")
            group, world = g, world_size_of(g)
            self.world_size = world
            exchanges.append(self._input_exchange(a2a, wait, feeds, nodes, qkv, world))
        output = self._output_exchange(exchanges[0], group, world)
        return Site(self.index, self.attention, self.op, tuple(exchanges), output, group, world,
                    self.local_heads, qkv, self.atoms, self.layouts)

    def _walk_back(self, name: str, node: Node) -> tuple[Node, Node, list[Node]]:
        """From q, k or v back through layout ops to the wait that completes an all-to-all."""
        path: list[Node] = []
        while True:
            item = unbind_item(node)
            if item is not None:
                path.append(node)
                node = item[0]
            fill = inplace_fill(node)
            if fill is not None:
                path.append(node)
                node = fill.args[1]
                break
            step = layout_op(node)
            if step is None:
                break
            path.append(node)
            node = step.source
        if not is_wait(node):
            raise NoMatch(f"{name} reaches {node.name} ({target_name(node)}) before any all-to-all")
        a2a = node.args[0]
        if not is_all_to_all(a2a):
            raise NoMatch(f"{name} waits on {a2a.name} ({target_name(a2a)}), which is not an all-to-all")
        return a2a, node, path

    def _send_path(self, buffer: Node) -> tuple[Node, ...]:
        """Root first: the walk stops at the first node that is not a layout op (or is a wait)."""
        path = [buffer]
        node = buffer
        while True:
            item = unbind_item(node)
            if item is not None:
                node = item[0]
                path.append(node)
            step = layout_op(node)
            if step is None or is_wait(node):
                return tuple(reversed(path))
            node = step.source
            path.append(node)

    def _follow(self, node: Node) -> Layout:
        """The layout of a layout-op node from its source's (already known) layout."""
        fill = inplace_fill(node)
        if fill is not None:
            return self.layouts[fill.args[1]]
        item = unbind_item(node)
        if item is not None:
            parent, _ = item
            return L.select(self.layouts[layout_op(parent).source], layout_op(parent).dims[0])
        step = layout_op(node)
        assert step is not None
        if step.kind == UNBIND:
            return ()
        src = self.layouts[step.source]
        if step.kind == REGROUP:
            return self.atoms.regroup(src, shape_of(node))
        if step.kind == PERMUTE:
            return L.permute(src, step.dims)
        if step.kind == TRANSPOSE:
            return L.transpose(src, *step.dims)
        if step.kind == SQUEEZE:
            return L.squeeze(src, step.dims)
        if step.kind == UNSQUEEZE:
            return L.unsqueeze(src, step.dims[0])
        if step.kind == SELECT:
            return L.select(src, step.dims[0])
        if step.kind == IDENTITY:
            return src
        raise LayoutError(f"no rule for {step.kind}")

    # -- step 4 --------------------------------------------------------------------------------
    def _input_exchange(self, a2a: Node, wait: Node, feeds: list[str], nodes: set[Node],
                        qkv: dict[str, Node], world: int) -> InputExchange:
        if len(a2a.users) != 1:
            raise NoMatch(f"{a2a.name} has {len(a2a.users)} users; expected one wait")
        send = exchange_args(a2a)
        _check_equal_splits(send, shape_of(send.input), world)
        path = self._send_path(send.input)
        root = path[0]
        self.layouts[root] = self.atoms.root(shape_of(root))
        for node in path[1:]:
            self.layouts[node] = self._follow(node)
        received, dest, src = self.atoms.exchange(self.layouts[send.input], world)
        self.layouts[a2a] = self.layouts[wait] = received
        receive = tuple(sorted(nodes, key=_position(a2a.graph)))
        fills = {inplace_fill(n) for n in receive} - {None}
        if len(fills) > 1 or (fills and next(iter(fills)).args[1] is not wait):
            raise NoMatch(f"{a2a.name}'s result is copied into more than one buffer")
        allowed = set(receive) | fills | {self.attention}
        for node in (wait, *receive):
            outside = [u.name for u in node.users if u not in allowed]
            if outside:
                raise NoMatch(f"{node.name} (between {a2a.name} and attention) is also used by {outside}")
        for node in receive:
            self.layouts[node] = self._follow(node)

        heads = {self._head_atom(qkv[name], name, dest) for name in feeds}
        if len(heads) != 1:
            raise NoMatch(f"{', '.join(feeds)} share {a2a.name} but not one head axis")
        (head,) = heads
        self._check_scatter_heads(root, dest, head, a2a)
        for name in feeds:
            seq = self.atoms.expand(self.layouts[qkv[name]][-2])
            if seq[: len(src)] != src:
                raise NoMatch(f"{a2a.name} does not gather the sequence: the source rank is not the "
                              f"leading factor of {name}'s sequence axis")
        return InputExchange(a2a, wait, path, receive, head, tuple(feeds), next(iter(fills), None))

    def _head_atom(self, node: Node, name: str, dest: tuple[Atom, ...]) -> Atom:
        group = self.atoms.expand(self.layouts[node][-3])
        if self.local_heads == 1:
            return -1  # nothing to chunk; the plan step reports it
        if len(group) != 1:
            raise NoMatch(f"{name}'s head axis mixes {len(group)} factors; cannot tell heads apart")
        (atom,) = group
        if atom in dest:
            raise NoMatch(f"{name}'s head axis is the all-to-all's rank axis")
        return atom

    def _check_scatter_heads(self, root: Node, dest: tuple[Atom, ...], head: Atom, a2a: Node) -> None:
        if not dest or head < 0:
            return
        flat = self.atoms.expand([a for dim in self.layouts[root] for a in dim])
        i = flat.index(dest[0])
        if flat[i : i + len(dest) + 1] != (*dest, head):
            raise NoMatch(f"{a2a.name} does not scatter heads: at {root.name} the rank factor is not "
                          "directly above the local heads")

    # -- step 5 --------------------------------------------------------------------------------
    def _output_exchange(self, first: InputExchange, group: Any, world: int) -> OutputExchange:
        source = self._attention_output()
        q = self.layouts[self._q_node()]
        q_batch = self.atoms.resolve(q[:-2])
        out_shape = shape_of(source)
        head = -1
        dims: list[tuple[Atom, ...]] = []
        for group_atoms in q_batch:
            new_dim = []
            for atom in group_atoms:
                (fresh,) = self.atoms.new(self.atoms.sizes[atom])
                if atom == first.head:
                    head = fresh
                new_dim.append(fresh)
            dims.append(tuple(new_dim))
        seq_atoms = self.atoms.new(out_shape[-2])
        self.layouts[source] = (*dims, seq_atoms, self.atoms.new(out_shape[-1]))

        path: list[Node] = []
        node = source
        fill: Node | None = None
        while True:
            users = set(node.users)
            buffers = {u for u in users if inplace_fill(u) is not None}
            a2as = {u for u in users if is_all_to_all(u)}
            if a2as and len(users - buffers) == 1 and len(buffers) <= 1:
                user = next(iter(a2as))
                if buffers:
                    fill = inplace_fill(next(iter(buffers)))
                break
            if len(users) != 1:
                raise NoMatch(f"attention output {node.name} has {len(users)} users; expected one "
                              "path to an all-to-all")
            (user,) = users
            step = layout_op(user)
            if step is None or step.source is not node or step.kind == UNBIND:
                raise NoMatch(f"attention output reaches {user.name} ({target_name(user)}) before an all-to-all")
            self.layouts[user] = self._follow(user)
            path.append(user)
            node = user
        a2a = user
        args = exchange_args(a2a)
        if args.group != group:
            raise NoMatch("the output all-to-all uses another process group than the inputs")
        _check_equal_splits(args, shape_of(args.input), world)
        wait = next(iter(a2a.users)) if len(a2a.users) == 1 else None
        if wait is None or not is_wait(wait):
            raise NoMatch(f"{a2a.name} is not followed by a single wait")
        if fill is not None and fill.args[1] is not wait:
            raise NoMatch(f"{a2a.name}'s result is not what fills its in-place buffer")
        received, dest, _ = self.atoms.exchange(self.layouts[args.input], world)
        self.layouts[a2a] = self.layouts[wait] = received
        if head >= 0:
            if head in dest or self.atoms.expand([head]) != (head,):
                raise NoMatch(f"{a2a.name} splits the local heads across ranks")
            seq = self.atoms.expand(seq_atoms)
            if dest and seq[: len(dest)] != dest:
                raise NoMatch(f"{a2a.name} does not scatter the sequence: the rank factor is not the "
                              "leading factor of the attention output's sequence axis")
        return OutputExchange(source, tuple(path), a2a, wait, head, fill)

    def _q_node(self) -> Node:
        return attention_args(self.attention, self.op)["query"]

    def _attention_output(self) -> Node:
        if not self.op.returns_tuple:
            return self.attention
        out = None
        for user in self.attention.users:
            if user.op == "call_function" and user.target is operator.getitem:
                if user.args[1] == 0:
                    out = user
                elif user.users:
                    raise NoMatch(f"attention output {user.args[1]} ({user.name}) is used; only the "
                                  "main output is reassembled")
            else:
                raise NoMatch(f"attention result used whole by {user.name}")
        if out is None:
            raise NoMatch("attention output is unused")
        return out


def _check_equal_splits(args: Any, shape: tuple[int, ...], world: int) -> None:
    rows = shape[0] if shape else 0
    if rows % world:
        raise NoMatch(f"all-to-all dim 0 of size {rows} is not divisible by {world} ranks")
    for splits in (args.output_splits, args.input_splits):
        if splits is None or (isinstance(splits, (list, tuple)) and len(splits) == 0):
            continue
        if not isinstance(splits, (list, tuple)) or any(not isinstance(s, int) for s in splits):
            raise NoMatch(f"all-to-all split sizes {splits!r} are not static")
        if list(splits) != [rows // world] * world:
            raise NoMatch(f"uneven all-to-all split sizes {list(splits)} are not chunked yet")


def _position(graph: torch.fx.Graph):
    order = {node: i for i, node in enumerate(graph.nodes)}
    return order.__getitem__
