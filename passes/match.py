"""Find all-to-all -> attention -> all-to-all sites and prove what each exchange does.

Terms
- site: one attention op, forward or backward, with at least one per-head input arriving from an
  all-to-all through layout-only ops and at least one per-head output leaving through layout-only
  ops into an all-to-all. Forward: q, k, v in, the output out. Backward: the output gradient in,
  dq, dk, dv out, with q, k, v, out and log-sum-exp as local inputs.
- input exchange: one all-to-all feeding the attention (three for separate q, k, v; one for a fused
  stacked qkv). Its send path runs from a root (the last node that is not a layout op) to the send
  buffer; its receive tree runs from the wait to the attention's inputs.
- local input: a per-head input that is already on this rank (saved activations in a backward
  graph); a chunk takes a slice of its head axis.
- output exchange: an all-to-all that takes attention outputs back to sequence sharding: one output,
  or several stacked into one buffer (the backward of a fused qkv exchange sends dq, dk, dv with one
  all-to-all). Stacked outputs share one head atom; the stack adds a slot factor.
- escape: a per-head attention input or output, or a node of a receive tree (the wait included),
  also used outside the site (AOTAutograd saves q, k, v, out and log-sum-exp for the backward, and
  the exchanged keys and values before their repeat); the rewrite concatenates the chunks' values
  for it: on the head axis, or, for a receive node, on the head atom of its layout.
- head atom: the factor (see `layout.py`) that indexes the attention's local heads; chunking cuts it.
- KV group: how many consecutive query heads read one exchanged KV head, under grouped-query
  attention (`enable_gqa`, or an ATen flash kernel given fewer KV heads) or because keys and values
  are repeated after the exchange (a broadcast factor under the KV head factor). Chunks then hold
  whole groups.
- shared KV: one KV head per rank (fewer KV heads than ranks). It cannot be cut, so its exchange
  stays whole before the chunks: every chunk reads it (`enable_gqa`), or slices its heads of the
  repeated tensor as a local input.

Steps of `match_sites(graph)`:
1. Find every attention op in graph order; each is a candidate and yields a `Site` or a `Skip`.
2. Reject options that would change bits per chunk (dropout), and attention ops whose q also feeds
   another attention op of the same direction (ring attention). Every per-head tensor must have the
   same local-head count, up to the KV group; a mask broadcast over heads is shared by all chunks,
   a per-head mask is a local input.
3. Walk back from each per-head input through layout ops to a wait and its all-to-all (or call it
   local), and from each all-to-all's input to its root. A stack or cat of one tensor's pieces is a
   layout op (its pieces join the path), and the fresh buffer of an in-place exchange and its fill
   stand for the wait; so does the buffer a c10d exchange fills (make_fx), whose all-to-all is the
   `c10d.alltoall_base_` itself. Receive nodes also used elsewhere are escapes, proven in step 4; a
   size query (`sym_size`) is no use, the rewrite recomputes it. When no per-head input arrives from
   an all-to-all, the reason names why: no all-to-all in the graph, a graph input (graph break), a
   c10d all-to-all not provably an exchange (async, Work used, buffer not fresh or touched before), a
   copy that is no alias of the result, an op that is not a layout op, or a forward attention
   recomputed in a backward graph.
4. Follow the atoms from each root through the send path, the exchange and the receive tree; read
   the head atom at the input's head axis and prove: the destination-rank factor sits right above
   the head atom at the root (the exchange scatters heads) and the source-rank factor leads the
   sequence axis (it gathers sequence). A receive node used outside the site (not by a later
   receive node or the attention) is an escape when its other users come after the attention, it is
   no piece of a join, its layout holds the head atom exactly once (a repeated tensor's head axis is
   (KV head, repeat): the KV head atom) and no two of its elements share memory; else a skip. A
   shared KV exchange stays whole, so its receive nodes may be used anywhere.
5. Walk forward from each per-head output (through layout ops and joins of its pieces) to an
   output all-to-all and prove it scatters sequence
   while keeping the head atom whole, so per-chunk receive buffers can be concatenated on it; other
   uses of an output are escapes. A path that meets a stack (or cat) of several tensors is followed
   only when every stacked tensor is a distinct per-head output of this attention op, of one shape,
   in the order the op returns them, laid out alike at the stack: they then share one head atom.
Every failed proof is a `Skip` with a reason; a skipped site is never touched.
Shapes may be symbolic (`symbolic.py`): sequence and batch sizes are SymInts that the dimension
algebra carries; head counts must be static ints. A skip that dynamic shapes cause starts with
`symbolic.SYMBOLIC`, and `rewrite_graph` logs those once per graph as a warning.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Graph, Node

from . import layout as L
from .layout import Atom, AtomSpace, Layout, LayoutError, SymbolicLayoutError
from .ops import (
    CAT,
    EXPAND,
    IDENTITY,
    NEW_AXES,
    PERMUTE,
    REGROUP,
    REPEAT,
    SELECT,
    SQUEEZE,
    STACK,
    TRANSPOSE,
    UNBIND,
    UNSQUEEZE,
    AttentionOp,
    attention_args,
    attention_op,
    c10d_exchange,
    c10d_unproven,
    c10d_writer,
    exchange_args,
    inplace_fill,
    is_all_to_all,
    is_c10d_all_to_all,
    is_exchange,
    is_wait,
    join_pieces,
    joined_by,
    layout_op,
    mutated_args,
    stack_of,
    storage_root,
    target_name,
    unbind_item,
)
from .symbolic import SYMBOLIC, Size, divides, is_size_query, is_symbolic, same, size

# parameters and outputs indexed by KV head: fewer of them under grouped-query attention
KV = ("key", "value")
KV_GRADIENTS = (1, 2)  # dk, dv of the backward ops


class NoMatch(Exception):
    """The reason a candidate is not a site."""


class SharedKV(NoMatch):
    """An exchange that brings one KV head per rank: it cannot be chunked, so it stays whole."""


@dataclass(frozen=True)
class InputExchange:
    all_to_all: Node
    wait: Node
    send_path: tuple[Node, ...]  # root first, send buffer last (one node when the root is the buffer)
    receive: tuple[Node, ...]  # graph order, from the first node after the waits to q/k/v
    head: Atom
    feeds: tuple[str, ...]  # which of query, key, value this exchange carries
    fill: Node | None = None  # `copy_(buffer, wait)` of an in-place exchange; the buffer is in `receive`
    # the send path's atoms for this exchange: q, k and v may share nodes (one projection, unbound)
    send_layouts: dict[Node, Layout] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class OutputExchange:
    # (which attention output, its tensor: a getitem for ops that return tuples); several when the
    # outputs are stacked into one buffer (dq, dk, dv), in stack order
    sources: tuple[tuple[int, Node], ...]
    send_path: tuple[Node, ...]  # layout nodes (and the stack) after the sources, graph order, send buffer last
    all_to_all: Node
    wait: Node
    head: Atom  # shared by every source
    fill: Node | None = None  # `copy_(buffer, wait)` of an in-place exchange

    @property
    def nodes(self) -> tuple[Node, ...]:
        return tuple(node for _, node in self.sources)


@dataclass(frozen=True)
class Escape:
    """A per-head value used outside the site: its chunks are concatenated for `users`, on `axis`
    (an attention input or output), or on the head atom `head` (a receive-tree node, whose head
    axis may merge the heads with other factors)."""

    node: Node
    axis: int | None  # non-negative head axis of `node`; None for a receive-tree node
    users: tuple[Node, ...]
    output: int | None  # attention output index, or None for an attention input or receive-tree node
    head: Atom | None = None  # the local-head atom of a receive-tree node's layout


@dataclass
class Site:
    index: int
    attention: Node
    op: AttentionOp
    inputs: tuple[InputExchange, ...]
    outputs: tuple[OutputExchange, ...]
    locals: dict[str, int]  # per-head parameters already on this rank -> head axis
    escapes: tuple[Escape, ...]
    shared_outputs: dict[int, tuple[Node, ...]]  # non-head outputs in use (same in every chunk)
    group: Any
    world_size: int
    local_heads: int
    heads: dict[str, Node]  # every per-head parameter -> its node
    kv_group: int  # query heads per KV head (1 unless grouped-query attention)
    atoms: AtomSpace
    layouts: dict[Node, Layout] = field(repr=False)

    @property
    def kernel(self) -> str:
        return self.op.kernel

    def divisor(self, name: str | None = None, output: int | None = None) -> int:
        """How many query heads share one head of this parameter (or output): 1, or the GQA group."""
        kv = name in KV if name is not None else (self.op.backward and output in KV_GRADIENTS)
        return self.kv_group if kv else 1

    def is_stale(self) -> bool:
        """Whether rewriting an earlier site erased a node this record refers to (its root, say)."""
        nodes = [self.attention, *self.heads.values()]
        for ex in self.inputs:
            nodes += [*ex.send_path, ex.all_to_all, ex.wait, *ex.receive]
        for out in self.outputs:
            nodes += [*out.nodes, *out.send_path, out.all_to_all, out.wait]
        return any(getattr(node, "_erased", False) for node in nodes)


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


def shape_of(node: Node) -> tuple[Size, ...]:
    """The shape recorded by the tracer: ints, and SymInts for dynamic dims; NoMatch when absent."""
    val = value_of(node)
    shape = getattr(val, "shape", None)
    if shape is None:
        tm = node.meta.get("tensor_meta")
        shape = getattr(tm, "shape", None)
    if shape is None:
        raise NoMatch(f"{node.name} has no shape metadata (trace with make_fx, export or Dynamo)")
    return tuple(size(s) for s in shape)


def head_count(node: Node, axis: int, name: str) -> int:
    """The (static) number of heads of `node` on `axis`: a symbolic head count cannot be chunked."""
    n = shape_of(node)[axis]
    if is_symbolic(n):
        raise NoMatch(f"{SYMBOLIC}{name} has a symbolic head count {n}: chunks are cut from a static number of "
                      "heads (mark only the sequence and batch dims dynamic, or reshape heads with constants)")
    return n


def world_size_of(group: Any) -> int:
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        return _resolve_process_group(group if not isinstance(group, int) else str(group)).size()
    except Exception as err:  # noqa: BLE001 - any failure means the group is unknown here
        raise NoMatch(f"cannot resolve process group {group!r}: {err} (rewrite where the group exists: "
                      "on the ranks, after init_process_group)") from None


def match_sites(graph: Graph) -> list[Site | Skip]:
    found: list[Site | Skip] = []
    order = _position(graph)  # one graph order for every candidate: the graph does not change here
    for node in graph.nodes:
        op = attention_op(node)
        if op is None:
            continue
        index = len(found)
        try:
            found.append(_Matcher(node, op, index, order).run())
        except NoMatch as err:
            found.append(Skip(index, node, op.kernel, str(err)))
    return _drop_shared_exchanges(found)


def match_again(site: Site) -> Site | Skip:
    """Match one attention op again, after earlier rewrites changed the graph around it."""
    try:
        return _Matcher(site.attention, site.op, site.index, _position(site.attention.graph)).run()
    except NoMatch as err:
        return Skip(site.index, site.attention, site.op.kernel, str(err))


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
    def __init__(self, attention: Node, op: AttentionOp, index: int, order: Callable[[Node], int]) -> None:
        self.attention = attention
        self.order = order
        self.op = op
        self.index = index
        self.atoms = AtomSpace()
        self.layouts: dict[Node, Layout] = {}
        self.world_size: int | None = None
        self.local_heads: int | None = None
        self.kv_group = 1
        self._shared_kv: dict[str, Node] = {}  # one KV head per rank under enable_gqa: passed whole
        self._kv_repeats: dict[str, tuple[str, int]] = {}  # key/value repeated after the exchange: how
        self._heads_out: dict[Node, Atom] = {}  # attention output -> its local-head atom
        self._stacked: dict[Node, OutputExchange | None] = {}  # stack of several outputs -> its exchange
        self._receive_escapes: list[Escape] = []  # receive-tree nodes also used outside the site

    def run(self) -> Site | Skip:
        try:
            return self._run()
        except NoMatch as err:
            return Skip(self.index, self.attention, self.op.kernel, str(err), self.world_size, self.local_heads)
        except LayoutError as err:
            prefix = SYMBOLIC if isinstance(err, SymbolicLayoutError) else ""
            return Skip(self.index, self.attention, self.op.kernel, f"{prefix}layout not understood: {err}",
                        self.world_size, self.local_heads)

    # -- step 2 --------------------------------------------------------------------------------
    def _check_options(self, args: dict[str, Any]) -> None:
        dropout = args.get("dropout_p", 0.0)
        if not isinstance(dropout, (int, float)) or dropout != 0.0:
            raise NoMatch(f"dropout_p={dropout}: per-chunk random streams would change the bits; "
                          "sites are chunked with dropout off (dropout_p=0, e.g. in eval mode)")

    def _head_inputs(self, args: dict[str, Any]) -> dict[str, Node]:
        heads = {name: args.get(name) for name in self.op.head_params}
        for name, node in heads.items():
            if not isinstance(node, Node):
                raise NoMatch(f"{name} is not a tensor in the graph")
        counts = {name: head_count(node, self.op.head_params[name], name) for name, node in heads.items()}
        q_heads = counts["query"]
        kv = {name: n for name, n in counts.items() if name in KV}
        if any(n != q_heads for n in kv.values()):
            # grouped-query attention: each KV head serves `kv_group` consecutive query heads
            gqa = args.get("enable_gqa") or self.op.native_gqa
            if not gqa or len(set(kv.values())) != 1 or q_heads % next(iter(kv.values())):
                raise NoMatch(f"per-head inputs disagree on the head count {counts} and this is not "
                              "grouped-query attention")
            kv_heads = next(iter(kv.values()))
            if kv_heads == 1:
                if self.op.backward:
                    raise NoMatch("one KV head on this rank serves every query head: each chunk's key and value "
                                  "gradients would be summed in another order than the kernel sums them")
                # every chunk attends to the rank's one KV head, exchanged whole before the chunks
                for name in kv:
                    self._shared_kv[name] = heads.pop(name)
            else:
                self.kv_group = q_heads // kv_heads
        others = {name: n for name, n in counts.items() if name not in KV and n != q_heads}
        if others:
            raise NoMatch(f"per-head inputs disagree on the head count {counts}")
        lead = {name: shape_of(n)[:-3] for name, n in heads.items() if self.op.head_params[name] == -3}
        first = next(iter(lead.values()))
        if any(len(dims) != len(first) or not all(map(same, dims, first)) for dims in lead.values()):
            raise NoMatch(f"batch dims differ {lead}: attention that broadcasts over batch is not chunked yet; "
                          "expand q, k and v to one batch shape")
        self.local_heads = q_heads
        self._add_mask(args, heads)
        return heads

    def _add_mask(self, args: dict[str, Any], heads: dict[str, Node]) -> None:
        """A mask broadcast over heads goes to every chunk as it is; a per-head mask (a bias with
        one slice per local head, ALiBi say) becomes a local input, sliced like the heads."""
        name = self.op.mask
        mask = args.get(name) if name is not None else None
        if mask is None:
            return
        if not isinstance(mask, Node):
            raise NoMatch(f"{name} is not a tensor in the graph")
        shape = shape_of(mask)
        if len(shape) < 3 or same(shape[-3], 1):
            return
        if is_symbolic(shape[-3]):
            raise NoMatch(f"{SYMBOLIC}{name} has a symbolic head dim {shape[-3]}: cannot tell a per-head mask "
                          "from a broadcast one")
        if shape[-3] != self.local_heads:
            raise NoMatch(f"{name} has {shape[-3]} heads but the site has {self.local_heads} local heads")
        heads[name] = mask
    def _run(self) -> Site:
        args = attention_args(self.attention, self.op)
        self._check_options(args)
        heads = self._head_inputs(args)
        # (a backward graph may also recompute the forward op on the saved q: that one does not count)
        others = [u.name for u in heads["query"].users if u is not self.attention
                  and getattr(attention_op(u), "backward", None) == self.op.backward]
        if others:
            # ring attention (USP) attends to one q once per ring step and merges the partial results;
            # chunking that means chunking the whole ring region, merges and p2p included
            raise NoMatch(f"the query also feeds {len(others)} other attention op(s) ({', '.join(others[:3])}): "
                          "a ring attention or several attentions on one exchange; only sites of one attention "
                          "op are chunked")

        # step 3: per-head inputs back to their exchanges, or local
        routes: dict[Node, tuple[list[str], set[Node], Node]] = {}
        local: dict[str, int] = {}
        unexchanged: dict[str, str] = {}  # per-head input -> why it does not come from an all-to-all
        for name, node in heads.items():
            if name == self.op.mask:
                local[name] = -3  # a per-head mask belongs to this rank's heads already
                continue
            try:
                a2a, wait, path = self._walk_back(name, node)
            except NoMatch as err:
                local[name] = self.op.head_params[name]
                unexchanged[name] = str(err)
                continue
            feeds, nodes, _ = routes.setdefault(a2a, ([], set(), wait))
            feeds.append(name)
            nodes.update(path)
        if not routes:
            raise NoMatch(self._no_exchange(heads, unexchanged))
        groups = {exchange_args(a2a).group for a2a in routes}
        if len(groups) != 1:
            raise NoMatch("the inputs are exchanged over different process groups: a site is one Ulysses group's "
                          "exchanges")
        (group,) = groups
        world = self.world_size = world_size_of(group)
        exchanges = []
        for a2a, (feeds, nodes, wait) in routes.items():
            try:
                exchanges.append(self._input_exchange(a2a, wait, feeds, nodes, heads, world))
            except SharedKV:
                # exchanged whole before the chunks; each chunk slices its heads of the repeated tensor
                local.update({name: self.op.head_params[name] for name in feeds})
        self._check_kv_repeats(heads)
        self._check_no_mutation(exchanges)
        # keys shared whole must exist before the chunks, like local inputs
        self._check_locals_independent(exchanges, {**{name: heads[name] for name in local}, **self._shared_kv})
        escapes = self._input_escapes(exchanges, heads)
        reference = next((ex for ex in exchanges if set(ex.feeds) - set(KV)), None)
        if reference is None:
            raise NoMatch("only keys and values arrive by all-to-all; the query heads are not exchanged")
        outputs, out_escapes, shared = self._outputs(reference, heads, group, world)
        return Site(self.index, self.attention, self.op, tuple(exchanges), outputs, local,
                    escapes + out_escapes, shared, group, world, self.local_heads, heads, self.kv_group,
                    self.atoms, self.layouts)

    def _check_no_mutation(self, exchanges: list[InputExchange]) -> None:
        """The chunks read the send paths later than the original exchanges did (just before the
        attention); an in-place write to that storage in between would change what they read."""
        order = self.order
        storages = {storage_root(n) for ex in exchanges for n in ex.send_path}
        fills = {ex.fill for ex in exchanges}
        node = min((ex.send_path[0] for ex in exchanges), key=order)
        while node is not self.attention:
            if node not in fills and any(storage_root(arg) in storages for arg in mutated_args(node)):
                raise NoMatch(f"{node.name} writes in place to storage an input all-to-all sends; moving the "
                              "chunked sends past it is not safe: make that write out of place, or move it "
                              "after the attention")
            node = node.next

    def _check_locals_independent(self, exchanges: list[InputExchange], local: dict[str, Node]) -> None:
        """A local input computed from an exchanged one cannot be sliced before the chunks exist."""
        order = self.order
        floor = min(order(ex.all_to_all) for ex in exchanges)
        site_nodes = {n for ex in exchanges for n in (ex.all_to_all, ex.wait, *ex.receive)}
        for name, node in local.items():
            stack, seen = [node], set()
            while stack:
                current = stack.pop()
                if current in site_nodes:
                    raise NoMatch(f"{name} is computed from the exchanged inputs, so it does not exist before the "
                                  "chunks that read it")
                if current in seen or order(current) < floor:
                    continue
                seen.add(current)
                stack.extend(current.all_input_nodes)

    def _no_exchange(self, heads: dict[str, Node], unexchanged: dict[str, str]) -> str:
        """Why no per-head input arrives from an all-to-all, naming the fix where there is one."""
        graph = self.attention.graph
        query = heads["query"]
        if not self.op.backward and any(getattr(attention_op(u), "backward", False) for u in query.users):
            return ("a forward attention op recomputed from saved tensors in the backward graph: the backward "
                    "attention op is the site, this recompute is left alone (nothing to fix)")
        if not any(is_all_to_all(n) or n.op == "call_function" and _namespace(n) == "c10d" for n in graph.nodes):
            return ("no all-to-all in this graph: attention without sequence parallelism is left alone (if this "
                    "model does exchange q, k and v, the exchange is in another graph: look for a graph break)")
        names = [n for n in heads if n in unexchanged and (n != "query" or not self.op.backward)]
        first = "grad_out" if self.op.backward and "grad_out" in unexchanged else next(iter(names), "query")
        return unexchanged.get(first, "no per-head input arrives from an all-to-all")

    def _walk_back(self, name: str, node: Node) -> tuple[Node, Node, list[Node]]:
        """From q, k or v back through layout ops to the wait that completes an all-to-all (or the
        buffer a c10d all-to-all fills, which stands for its wait)."""
        path: list[Node] = []
        while True:
            item = unbind_item(node)
            if item is not None:
                path.append(node)
                node = item[0]
            writer = c10d_exchange(node)
            if writer is not None:
                return writer, node, path
            fill = inplace_fill(node)
            if fill is not None:
                path += [node, fill, fill.args[0]]  # the buffer and its fill both stand for the wait
                node = fill.args[1]
                break
            step = layout_op(node)
            if step is None:
                break
            path += [node, *join_pieces(node)]
            node = step.source
        if not is_wait(node):
            feeds_exchange = any(is_all_to_all(n) for n in _reachable(self.attention))
            raise NoMatch(_not_exchanged(name, node, feeds_exchange))
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
            path += reversed(join_pieces(node))
            node = step.source
            path.append(node)

    def _follow(self, node: Node) -> Layout:
        """The layout of a layout-op node from its source's (already known) layout."""
        fill = inplace_fill(node)
        if fill is not None:
            return self.layouts[fill.args[1]]
        if joined_by(node) is not None:
            return ()  # a piece of a join: the join is followed from the split's input
        item = unbind_item(node)
        if item is not None:
            parent, _ = item
            return L.select(self.layouts[layout_op(parent).source], layout_op(parent).dims[0])
        step = layout_op(node)
        if step is None:
            raise LayoutError(f"{node.name} ({target_name(node)}) is not a layout op")
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
        if step.kind == EXPAND:
            return self.atoms.broadcast_to(src, shape_of(step.source), step.dims)
        if step.kind == REPEAT:
            return self.atoms.repeat_each(src, *step.dims)
        if step.kind == NEW_AXES:
            for pos in step.dims:
                src = L.unsqueeze(src, pos)
            return src
        if step.kind in (STACK, CAT):
            return self.atoms.rejoin(src, *step.dims, stack=step.kind == STACK)
        raise LayoutError(f"no rule for {step.kind}")

    # -- step 4 --------------------------------------------------------------------------------
    def _input_exchange(self, a2a: Node, wait: Node, feeds: list[str], nodes: set[Node],
                        heads: dict[str, Node], world: int) -> InputExchange:
        if not is_c10d_all_to_all(a2a) and len(a2a.users) != 1:
            raise NoMatch(f"{a2a.name} has {len(a2a.users)} users; expected one wait (its result is read unwaited, "
                      "or waited more than once)")
        if any(self.op.head_params[name] != -3 for name in feeds):
            raise NoMatch(f"{', '.join(feeds)} arrive from {a2a.name}, but only [.., H, S, D] inputs may")
        if self.kv_group > 1 and len({name in KV for name in feeds}) > 1:
            raise NoMatch(f"{', '.join(feeds)} share {a2a.name} but have different head counts (GQA)")
        send = exchange_args(a2a)
        _check_equal_splits(send, shape_of(send.input), world)
        path = self._send_path(send.input)
        root = path[0]
        self.layouts[root] = self.atoms.root(shape_of(root))
        for node in path[1:]:
            self.layouts[node] = self._follow(node)
        send_layouts = {node: self.layouts[node] for node in path}
        received, dest, src = self.atoms.exchange(self.layouts[send.input], world)
        self.layouts[a2a] = self.layouts[wait] = received
        receive = tuple(sorted(nodes, key=self.order))
        fills = {inplace_fill(n) for n in receive} - {None}
        if len(fills) > 1 or (fills and next(iter(fills)).args[1] is not wait):
            raise NoMatch(f"{a2a.name}'s result is copied into more than one buffer")
        allowed = set(receive) | fills | {self.attention, a2a}  # a c10d all-to-all uses its buffer (the wait)
        terminals = {heads[name] for name in feeds}  # the attention's own inputs escape as attention inputs
        outside = {node: tuple(u for u in node.users if u not in allowed and not is_size_query(u))
                   for node in sorted({wait, *receive} - terminals, key=self.order)}
        for node in receive:
            self.layouts[node] = self._follow(node)

        head_atoms = {self._head_atom(heads[name], name, dest) for name in feeds}
        if len(head_atoms) != 1:
            raise NoMatch(f"{', '.join(feeds)} share {a2a.name} but not one head axis")
        (head,) = head_atoms
        if head >= 0 and head not in self.atoms.expand([a for dim in self.layouts[send.input] for a in dim]):
            raise NoMatch(f"the local heads of {', '.join(feeds)} are not a factor of {a2a.name}'s buffer")
        self._check_scatter_heads(path, dest, head, a2a)
        for name in feeds:
            seq = self.atoms.expand(self.layouts[heads[name]][-2])
            if seq[: len(src)] != src:
                raise NoMatch(f"{a2a.name} does not gather the sequence: the source rank is not the "
                              f"leading factor of {name}'s sequence axis")
        # (a shared KV exchange raised SharedKV above: it stays whole, so its receive tree may be read anywhere)
        # (one local head, head < 0, is never chunked: the plan leaves the site alone)
        self._receive_escapes += [self._receive_escape(node, users, head, a2a)
                                  for node, users in outside.items() if users and head >= 0]
        return InputExchange(a2a, wait, path, receive, head, tuple(feeds), next(iter(fills), None),
                             send_layouts)

    def _receive_escape(self, node: Node, users: tuple[Node, ...], head: Atom, a2a: Node) -> Escape:
        """A receive-tree node also read outside the site (AOTAutograd saves the exchanged keys and
        values before their repeat): the chunks' values, viewed one dim per atom, concatenated on
        the head atom and reshaped back, are the whole tensor, provided its layout holds the head
        atom once. A repeated tensor's head axis is (KV head, repeat): it is cut, and rejoined, on
        the KV head atom."""
        where = f"{node.name} (between {a2a.name} and attention) is also used by {[u.name for u in users]}"
        early = [u.name for u in users if self.order(u) < self.order(self.attention)]
        if early:
            raise NoMatch(f"{where}: {early} come before the attention, so they would read a tensor the chunks "
                          "have not yet reassembled; move them after the attention, or compute them before the "
                          "all-to-all")
        layout = self.layouts.get(node, ())
        if joined_by(node) is not None or layout_op(node) is not None and layout_op(node).kind == UNBIND:
            raise NoMatch(f"{where}, and it is a piece of a stack or cat the chunks rebuild whole, not a tensor they "
                          "compute; let those users read the join or the attention's input instead")
        count = self.atoms.expand([a for dim in layout for a in dim]).count(head)
        if count != 1:
            raise NoMatch(f"{where}, and its layout holds the local-head factor {count} times, so its chunks cannot "
                          "be concatenated back into it")
        if _overlapping(node):
            raise NoMatch(f"{where}, and it is an expanded view (elements share memory, or its strides are not "
                          "known) that a reassembled copy cannot take the strides of; let those users read the "
                          "repeated tensor instead")
        return Escape(node, None, users, None, head)

    def _head_atom(self, node: Node, name: str, dest: tuple[Atom, ...]) -> Atom:
        group = self.atoms.expand(self.layouts[node][-3])
        repeats = [a for a in group if a in self.atoms.broadcast]
        if repeats:
            group = self._repeated_kv(name, group, repeats)
        if self.local_heads // (self.kv_group if name in KV else 1) == 1:
            return -1  # nothing to chunk; the plan step reports it
        if len(group) != 1:
            raise NoMatch(f"{name}'s head axis mixes {len(group)} factors; cannot tell heads apart")
        (atom,) = group
        if atom in dest:
            raise NoMatch(f"{name}'s head axis is the all-to-all's rank axis")
        return atom

    def _repeated_kv(self, name: str, group: tuple[Atom, ...], repeats: list[Atom]) -> tuple[Atom, ...]:
        """Keys and values repeated after the exchange (repeat_kv): each received KV head is read by
        `n` consecutive query heads, as under grouped-query attention with a group of `n`."""
        if name not in KV or len(repeats) != 1 or group[-1] != repeats[0]:
            raise NoMatch(f"{name}'s head axis repeats heads in a way other than each KV head n times in a row")
        n = self.atoms.sizes[repeats[0]]
        if self.kv_group > 1 and not self._kv_repeats:
            raise NoMatch(f"{name} is repeated {n} times after the exchange and also grouped by {self.kv_group} "
                          "query heads (enable_gqa)")
        if len(group) == 1:
            self._kv_repeats[name] = ("shared", n)
            raise SharedKV(f"{name} has one KV head on this rank, repeated for every query head")
        self._kv_repeats[name] = ("grouped", n)
        self.kv_group = n
        return group[:-1]

    def _check_kv_repeats(self, heads: dict[str, Node]) -> None:
        """A repeat sets how chunks divide every key and value input, so they must all be repeated
        alike: a key repeated twice beside a value exchanged with all its heads would be cut in half."""
        if not self._kv_repeats:
            return
        names = [name for name in KV if name in heads]
        kinds = {self._kv_repeats.get(name) for name in names}
        if len(kinds) != 1 or None in kinds:
            how = {name: self._kv_repeats.get(name, "not repeated after an exchange") for name in names}
            raise NoMatch(f"keys and values are not repeated alike after the exchange: {how}")

    def _check_scatter_heads(self, path: tuple[Node, ...], dest: tuple[Atom, ...], head: Atom, a2a: Node) -> None:
        """Some tensor on the send path has a dim whose factors are (rank, local head): a global head
        axis that the exchange deals out in contiguous blocks, rank r getting [r*H/P, (r+1)*H/P)."""
        if not dest or head < 0:
            return
        wanted = (*dest, head)
        for node in path:
            for dim in self.atoms.resolve(self.layouts[node]):
                if any(dim[i : i + len(wanted)] == wanted for i in range(len(dim))):
                    return
        raise NoMatch(f"{a2a.name} does not scatter heads: no tensor on its send path has the rank factor "
                      "directly above the local heads in one dim (rank r must receive heads [r*H/P, (r+1)*H/P); "
                      "heads dealt out in strides are not chunked)")

    def _input_escapes(self, exchanges: list[InputExchange], heads: dict[str, Node]) -> tuple[Escape, ...]:
        escapes: dict[Node, Escape] = {e.node: e for e in self._receive_escapes}
        for ex in exchanges:
            inside = set(ex.receive) | {self.attention}
            for name in ex.feeds:
                node = heads[name]
                users = tuple(u for u in node.users if u not in inside and not is_size_query(u))
                if users and node not in escapes:
                    escapes[node] = Escape(node, len(shape_of(node)) - 3, users, None)
        return tuple(escapes.values())

    # -- step 5 --------------------------------------------------------------------------------
    def _outputs(self, first: InputExchange, heads: dict[str, Node], group: Any, world: int
                 ) -> tuple[tuple[OutputExchange, ...], tuple[Escape, ...], dict[int, tuple[Node, ...]]]:
        by_index = self._attention_outputs()
        exchanges: list[OutputExchange] = []
        escapes: list[Escape] = []
        shared: dict[int, tuple[Node, ...]] = {}
        for index, source in by_index.items():
            if index not in self.op.head_outputs:
                shared[index] = tuple(source.users)
                continue
            axis = self.op.head_outputs[index] % len(shape_of(source))
            outside: list[Node] = []
            for user in source.users:
                if is_size_query(user):
                    continue  # recomputed by the rewrite from tensors outside the site
                if inplace_fill(user) is not None or c10d_exchange(user) is not None or _later_piece(source, user):
                    continue  # the buffer an in-place exchange fills, or a piece the first one's walk covers
                found = self._output_exchange(index, source, user, first, heads, group, world)
                if found is None:
                    outside.append(user)
                elif any(ex is found for ex in exchanges):
                    continue  # a stacked exchange, met again from another output it carries
                elif any(source in ex.nodes for ex in exchanges):
                    raise NoMatch(f"attention output {index} feeds two all-to-alls")
                else:
                    exchanges.append(found)
            if outside:
                escapes.append(Escape(source, axis, tuple(outside), index))
        if not exchanges:
            raise NoMatch("no attention output reaches an all-to-all")
        return tuple(exchanges), tuple(escapes), shared

    def _attention_outputs(self) -> dict[int, Node]:
        """Each used output of the attention op by index (the node itself for one-tensor ops)."""
        if not self.op.returns_tuple:
            return {0: self.attention}
        outputs: dict[int, Node] = {}
        for user in self.attention.users:
            if not (user.op == "call_function" and user.target is operator.getitem):
                raise NoMatch(f"attention result used whole by {user.name}")
            if user.users:
                outputs[user.args[1]] = user
        return outputs

    def _mirror(self, source: Node, first: InputExchange, heads: dict[str, Node], divisor: int
                ) -> tuple[Layout, Atom]:
        """Fresh atoms for an output [.., H, S, D], split like the exchanged input's batch dims, with
        1/`divisor` of its heads."""
        reference = self.atoms.resolve(self.layouts[heads[first.feeds[0]]][:-2])
        head = -1
        dims: list[tuple[Atom, ...]] = []
        for group_atoms in reference:
            new_dim = []
            for atom in group_atoms:
                if atom == first.head:
                    head, *_ = self.atoms.new(self.atoms.sizes[atom] // divisor) or (-1,)
                    new_dim += [head] if head >= 0 else []
                else:
                    new_dim += self.atoms.new(self.atoms.sizes[atom])
            dims.append(tuple(new_dim))
        shape = shape_of(source)
        return (*dims, self.atoms.new(shape[-2]), self.atoms.new(shape[-1])), head

    def _output_divisor(self, index: int) -> int:
        # key and value gradients have one head per KV head: fewer under grouped-query attention
        return self.kv_group if self.op.backward and index in KV_GRADIENTS else 1

    def _output_exchange(self, index: int, source: Node, first_user: Node, first: InputExchange,
                         heads: dict[str, Node], group: Any, world: int) -> OutputExchange | None:
        """The exchange `source` reaches through `first_user`, or None when that use is no exchange."""
        if self.op.head_outputs[index] != -3:
            return None  # log-sum-exp and the like are never exchanged; they can only escape
        what = f"attention output {index}"
        found = self._path_to_exchange(source, first_user, what)
        if found is None:
            return None
        path, end = found
        if not is_exchange(end):
            return self._stacked_exchange(end, first, heads, group, world)
        if source not in self.layouts:
            self.layouts[source], self._heads_out[source] = self._mirror(source, first, heads,
                                                                         self._output_divisor(index))
        for node in path:
            self.layouts[node] = self._follow(node)
        return self._exchange(((index, source),), path, end, what, group, world)

    def _path_to_exchange(self, node: Node, user: Node, what: str) -> tuple[tuple[Node, ...], Node] | None:
        """The layout ops from `node` on, starting at its use `user`, and the all-to-all (or the stack
        of several tensors) that ends them; None when they lead elsewhere."""
        path: list[Node] = []
        while not is_exchange(user):
            join = _private_join(node, user)
            if join is not None:  # a stack or cat of `node`'s pieces: follow the join from `node`
                path += join_pieces(join)
                user = join
            step = layout_op(user)
            if step is None and stack_of(user) is not None:
                return tuple(path), user
            if step is None or step.source is not node or step.kind == UNBIND:
                return None
            path.append(user)
            onward = _next_on_path(user, what)
            if onward is None:
                return None
            node, user = user, onward
        return tuple(path), user

    def _stacked_exchange(self, stack: Node, first: InputExchange, heads: dict[str, Node], group: Any,
                          world: int) -> OutputExchange | None:
        """The one exchange of several stacked attention outputs (dq, dk, dv in the backward of a
        fused qkv exchange), the same record from whichever output reaches it."""
        if stack not in self._stacked:
            self._stacked[stack] = self._prove_stacked(stack, first, heads, group, world)
        return self._stacked[stack]

    def _prove_stacked(self, stack: Node, first: InputExchange, heads: dict[str, Node], group: Any,
                       world: int) -> OutputExchange | None:
        what = f"the attention outputs {stack.name} stacks"
        onward = _next_on_path(stack, what)
        if onward is None:
            return None
        found = self._path_to_exchange(stack, onward, what)
        if found is None:
            return None  # not on the way to an exchange: the stacked outputs escape
        after, a2a = found
        if not is_exchange(a2a):
            raise NoMatch(f"{what} are stacked again by {a2a.name} before the all-to-all")
        sources, before = self._stacked_sources(stack)
        shapes = {shape_of(node) for _, node in sources}
        if len(shapes) != 1:
            # (equal shapes also mean equal divisors: a key gradient has fewer heads exactly under GQA)
            raise NoMatch(f"{stack.name} joins attention outputs of different shapes {sorted(shapes)} (fewer key and "
                          "value heads than query heads): one chunk cannot cut their heads alike")
        index, node = sources[0]
        layout, head = self._mirror(node, first, heads, self._output_divisor(index))
        for _, node in sources:  # one set of atoms: slot i of the stack then holds the heads slot 0 does
            self.layouts[node], self._heads_out[node] = layout, head
        for node in before:
            self.layouts[node] = self._follow(node)
        self.layouts[stack] = self._stack_layout(stack)
        for node in after:
            self.layouts[node] = self._follow(node)
        return self._exchange(tuple(sources), (*before, stack, *after), a2a, what, group, world)

    def _stacked_sources(self, stack: Node) -> tuple[list[tuple[int, Node]], list[Node]]:
        """The attention output behind each stacked tensor (stack order), and the layout ops between
        them and the stack (graph order)."""
        outputs = {node: index for index, node in self._attention_outputs().items()}
        sources: list[tuple[int, Node]] = []
        between: list[Node] = []
        for item in stack_of(stack).sources:
            node, chain = item, []
            while node not in outputs:
                step = layout_op(node)
                if step is None:
                    raise NoMatch(f"{stack.name} stacks {item.name}, which is not an output of {self.attention.name}: "
                                  "only its per-head outputs (dq, dk, dv) may share the all-to-all")
                chain.append(node)
                node = step.source
            for link, onward in zip(chain, [stack, *chain], strict=False):
                others = [u.name for u in link.users if u is not onward and not is_size_query(u)]
                if others:
                    raise NoMatch(f"{link.name} (between {node.name} and {stack.name}) is also used by {others}")
            sources.append((outputs[node], node))
            between += chain
        indices = [index for index, _ in sources]
        flat = [index for index in indices if self.op.head_outputs.get(index) != -3]
        if flat:
            raise NoMatch(f"{stack.name} stacks attention output(s) {flat}, which have no [.., H, S, D] head axis")
        if len(set(indices)) != len(indices):
            raise NoMatch(f"{stack.name} stacks one attention output more than once (outputs {indices})")
        if indices != sorted(indices):
            # chunking would keep the bits of any order; the rule admits what the backward of a fused
            # q, k, v stack produces (dq, dk, dv in the kernel's order) rather than guessing at other code
            raise NoMatch(f"{stack.name} stacks attention outputs in the order {indices}, not in the order the "
                          f"attention op returns them ({sorted(indices)}): not the backward of a fused qkv exchange")
        return sources, sorted(between, key=self.order)

    def _stack_layout(self, stack: Node) -> Layout:
        """The layout the stacked tensors share, with a fresh slot atom saying which tensor: a new dim
        (stack), or the outermost factor of the joined dim (cat)."""
        spec = stack_of(stack)
        layouts = {self.atoms.resolve(self.layouts[node]) for node in spec.sources}
        if len(layouts) != 1:
            raise NoMatch(f"the tensors {stack.name} stacks are laid out differently, so its slots would not hold "
                          "the same heads")
        (layout,) = layouts
        slot = self.atoms.new(len(spec.sources))
        if spec.new_dim:
            dim = spec.dim % (len(layout) + 1)
            return (*layout[:dim], slot, *layout[dim:])
        dim = spec.dim % len(layout)
        return (*layout[:dim], slot + layout[dim], *layout[dim + 1 :])

    def _exchange(self, sources: tuple[tuple[int, Node], ...], path: tuple[Node, ...], a2a: Node, what: str,
                  group: Any, world: int) -> OutputExchange:
        """Prove that `a2a` sends the end of `path`, scatters the sources' sequence and keeps their
        head atom whole."""
        node = path[-1] if path else sources[0][1]
        args = exchange_args(a2a)
        if args.input is not node:
            raise NoMatch(f"{a2a.name} does not send {what}")
        buffers = [u for u in node.users if inplace_fill(u) is not None]
        if len(buffers) > 1:
            raise NoMatch(f"{node.name} is copied into more than one in-place buffer")
        fill = inplace_fill(buffers[0]) if buffers else None
        if args.group != group:
            raise NoMatch("the output all-to-all uses another process group than the inputs")
        _check_equal_splits(args, shape_of(args.input), world)
        if is_c10d_all_to_all(a2a):
            wait = a2a.args[0]  # `is_exchange` proved that its buffer holds the result after it
        else:
            wait = next(iter(a2a.users)) if len(a2a.users) == 1 else None
        if wait is None or not (is_wait(wait) or is_c10d_all_to_all(a2a)):
            raise NoMatch(f"{a2a.name} is not followed by a single wait")
        if fill is not None and fill.args[1] is not wait:
            raise NoMatch(f"{a2a.name}'s result is not what fills its in-place buffer")
        received, dest, _ = self.atoms.exchange(self.layouts[args.input], world)
        self.layouts[a2a] = self.layouts[wait] = received
        source = sources[0][1]
        head = self._heads_out[source]
        if head >= 0:
            sent = self.atoms.expand([a for dim in self.layouts[args.input] for a in dim])
            if head not in sent:
                raise NoMatch(f"the path from {what} to {a2a.name} drops the head axis")
            if head in dest or self.atoms.expand([head]) != (head,):
                raise NoMatch(f"{a2a.name} splits the local heads across ranks")
            seq = self.atoms.expand(self.layouts[source][-2])
            if dest and seq[: len(dest)] != dest:
                raise NoMatch(f"{a2a.name} does not scatter the sequence: the rank factor is not the "
                              f"leading factor of the sequence axis of {what}")
        return OutputExchange(sources, path, a2a, wait, head, fill)


def _private_join(source: Node, piece: Node) -> Node | None:
    """The join that regroups `source` through `piece`, when its pieces feed nothing but the join."""
    join = joined_by(piece)
    return join if join is not None and layout_op(join).source is source else None


def _later_piece(source: Node, user: Node) -> bool:
    """`user` is one of several pieces of `source` that one join reads: the walk follows the first."""
    join = _private_join(source, user)
    return join is not None and join_pieces(join)[0] is not user


def _not_exchanged(name: str, node: Node, feeds_exchange: bool) -> str:
    """Why the walk back from per-head input `name` stopped at `node`, a node that is no wait.
    `feeds_exchange`: the attention's result reaches an all-to-all (the output half of a site)."""
    if node.op == "placeholder" and feeds_exchange:
        return (f"{name} is a graph input: the all-to-all is in another graph (graph break?); compile with "
                "fullgraph=True or remove the break")
    writer = c10d_writer(node)
    if writer is not None:
        return (f"{name} reads {node.name}, the buffer c10d.alltoall_base_ ({writer.name}) writes in place "
                f"{c10d_unproven(writer)}: HCMS rewrites make_fx's record of dist.all_to_all_single(out, x) only "
                "when it runs synchronously into a fresh buffer of x's shape and dtype that nothing touches before "
                "it; do that, trace with torch.compile or torch.export (they functionalise it), or call "
                "torch.distributed._functional_collectives.all_to_all_single")
    writers = [u for u in node.users if node in mutated_args(u) and _namespace(u) == "c10d"]
    if writers:
        op = f"{_namespace(writers[0])}.{target_name(writers[0])}"
        return (f"{name} reads {node.name}, the buffer {op} ({writers[0].name}) writes in place: make_fx records "
                "this non-functional collective, which HCMS does not rewrite; trace with torch.compile or "
                "torch.export (they functionalise it), or use a functional collective")
    # the walk stopped at a buffer an exchange's result is copied into, or at that copy itself
    copies = [u for u in (node, *node.users) if target_name(u) in ("copy_", "copy") and len(u.args) > 1
              and isinstance(u.args[1], Node) and is_wait(u.args[1]) and (u is node or u.args[0] is node)]
    if copies:
        return (f"{name} reads {node.name}, a buffer an all-to-all result is copied into, but not as a fresh "
                "buffer filled once with the same shape and dtype and read only after the copy; use the result "
                "itself or an empty_like buffer filled once")
    if any(_reaches_exchange(arg) for arg in node.all_input_nodes):
        return (f"{name} reaches {node.name} ({_namespace(node)}.{target_name(node)}), which is not a layout op HCMS "
                "follows, between the all-to-all and the attention; move it before the all-to-all or express "
                "the layout with view, reshape, permute, transpose, flatten, or a stack/cat of one tensor's pieces")
    return (f"{name} does not come from an all-to-all (it is computed by {node.name}, {target_name(node)}): "
            "this graph's all-to-alls feed other ops, so this attention is not a Ulysses site")


def _namespace(node: Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[0]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[0]
    return "Tensor" if node.op == "call_method" else getattr(target, "__module__", None) or "python"


def _reaches_exchange(node: Node) -> bool:
    """Whether `node` is an all-to-all's wait seen through layout ops, joins and in-place fills."""
    while True:
        item = unbind_item(node)
        if item is not None:
            node = item[0]
        if c10d_exchange(node) is not None:
            return True
        fill = inplace_fill(node)
        if fill is not None:
            node = fill.args[1]
        step = layout_op(node)  # None for a wait that completes a collective
        if step is None:
            return is_wait(node) and is_all_to_all(node.args[0])
        node = step.source


def _overlapping(node: Node) -> bool:
    """Whether elements of `node`'s tensor share memory (an expanded view, a stride 0): no copy has its
    strides. Unknown or symbolic strides count as overlapping: nothing proves otherwise."""
    val = value_of(node)
    stride = val.stride() if hasattr(val, "stride") else getattr(node.meta.get("tensor_meta"), "stride", None)
    shape = shape_of(node)
    if stride is None or not all(isinstance(s, int) for s in (*stride, *shape)):
        return True
    dims = sorted((st, sz) for sz, st in zip(shape, stride, strict=True) if sz != 1)
    span = 1
    for step, extent in dims:
        if step < span:
            return True
        span = step * extent
    return False


def _next_on_path(node: Node, what: str) -> Node | None:
    """The one user that carries `node` on towards an output exchange (the buffers an in-place
    exchange fills, later pieces of a join and size queries do not count), or None when there is not
    exactly one; NoMatch when the path branches and an all-to-all lies beyond."""
    onward = [u for u in node.users if inplace_fill(u) is None and c10d_exchange(u) is None
              and not _later_piece(node, u) and not is_size_query(u)]
    if len(onward) == 1:
        return onward[0]
    if any(is_all_to_all(u) for u in _reachable(node)):
        raise NoMatch(f"the path from {what} to an all-to-all branches at {node.name}")
    return None


def _reachable(node: Node, limit: int = 64) -> list[Node]:
    """Nodes downstream of `node` (bounded), to tell a branching exchange path from a side use."""
    seen: list[Node] = []
    frontier = list(node.users)
    while frontier and len(seen) < limit:
        n = frontier.pop()
        if n not in seen:
            seen.append(n)
            frontier.extend(n.users)
    return seen


def _check_equal_splits(args: Any, shape: tuple[Size, ...], world: int) -> None:
    rows = shape[0] if shape else 0
    if not divides(world, rows):
        raise NoMatch(f"all-to-all dim 0 of size {rows} is not divisible by {world} ranks")
    for splits in (args.output_splits, args.input_splits):
        if splits is None or (isinstance(splits, (list, tuple)) and len(splits) == 0):
            continue
        if not isinstance(splits, (list, tuple)):
            raise NoMatch(f"all-to-all split sizes {splits!r} are not a list")
        # a symbolic split size is a node of the graph (ATen) or a SymInt (Dynamo)
        values = [value_of(s) if isinstance(s, Node) else s for s in splits]
        if any(not isinstance(v, (int, torch.SymInt)) or isinstance(v, bool) for v in values):
            raise NoMatch(f"all-to-all split sizes {splits!r} are not sizes")
        if len(values) != world or not all(same(size(v), size(rows // world)) for v in values):
            shown = [size(v) for v in values]
            if any(is_symbolic(v) for v in (*shown, rows)):
                raise NoMatch(f"{SYMBOLIC}all-to-all split sizes {shown} cannot be proven equal to {rows}/{world}")
            raise NoMatch(f"uneven all-to-all split sizes {shown} are not chunked yet")


def _position(graph: torch.fx.Graph) -> Callable[[Node], int]:
    order = {node: i for i, node in enumerate(graph.nodes)}
    return order.__getitem__
