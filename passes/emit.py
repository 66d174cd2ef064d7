"""Build nodes in a graph's own dialect, with the shape metadata later passes expect.

Terms
- dialect: "aten" (OpOverload targets; metadata under `val`) or "torch" (Dynamo: `call_method`,
  metadata under `example_value`).
- fake value: a FakeTensor computed for every new node from its inputs' fake values, so shapes are
  checked while the graph is built and Inductor/AOTAutograd find the metadata they need.
- the emitter's fake mode: the mode of the graph's first fake value. Values of any other mode are
  converted into it before use: `make_fx` with real tensors (its default) records every node's
  value under a fake mode of its own, and AOTAutograd leaves Dynamo's values beside its own.

Steps of each `Emitter` call:
1. Create the node before the anchor (the schedule moves it later) and record it, so that the
   caller can tag it and `rollback` can erase it whatever happens next.
2. Compute its fake value under the emitter's fake mode; a failure raises `EmitError`, and the
   rewrite calls `rollback`, which erases every recorded node, users first, leaving the graph as
   it was.

Symbolic sizes (a dynamic sequence length): a size argument that is a SymInt becomes a node that
computes it, never a constant, so the graph stays valid for every value (`size_arg`). It is an
existing node of that value before the anchor (a SymInt placeholder, a `floordiv` Dynamo traced),
else `sym_size` of a tensor before the anchor that has that size, else products, sums and floor
divisions of those; never from a node in `avoid` (the site being replaced) or computed from one.
These size nodes stay before the anchor, outside the pipeline stages, so every chunk can use them;
a size that cannot be built is an `EmitError`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx import Graph, Node
from torch.fx.node import map_arg
from torch.utils._pytree import tree_map_only
from torch.utils._sympy.functions import FloorDiv

from .symbolic import Size, is_symbolic, known, known_contiguous, same, size

aten = torch.ops.aten


class EmitError(Exception):
    """A new node whose shapes do not check."""


class RollbackError(RuntimeError):
    """New nodes that cannot be erased because original nodes already use them: the graph can no
    longer be restored, so this must reach the caller instead of a report that says "skipped"."""


def dialect_of(graph: Graph) -> str:
    for node in graph.nodes:
        if node.op == "call_method" or "example_value" in node.meta:
            return "torch"
    return "aten"


def value_key(graph: Graph) -> str:
    """Where the graph keeps its values: Dynamo's `example_value`, else `val` (make_fx, export,
    AOTAutograd, `FakeTensorProp`)."""
    return "example_value" if any("example_value" in node.meta for node in graph.nodes) else "val"


def _fake_mode(graph: Graph, key: str) -> FakeTensorMode:
    """The fake mode of the graph's own values (not the ambient tracing context's, which can differ
    when a compiler is running)."""
    for node in graph.nodes:
        val = node.meta.get(key)
        if isinstance(val, FakeTensor):
            return val.fake_mode
    return FakeTensorMode()


def viewable(shape: Sequence[Size], stride: Sequence[Size], new_shape: Sequence[Size]) -> bool:
    """Whether eager `view` accepts this reshape; ATen's stride rule (fake tensors are laxer). With
    symbolic sizes, only when that holds for every value (otherwise the caller copies)."""
    if not shape or known(math.prod(shape) == 0):
        return True
    view_d = len(new_shape) - 1
    base = stride[-1]
    tensor_numel: Size = 1
    view_numel: Size = 1
    for d in range(len(shape) - 1, -1, -1):
        tensor_numel = tensor_numel * shape[d]
        if d == 0 or not (same(shape[d - 1], 1) or same(stride[d - 1], tensor_numel * base)):
            while view_d >= 0 and (known(view_numel < tensor_numel) or same(new_shape[view_d], 1)):
                view_numel = view_numel * new_shape[view_d]
                view_d -= 1
            if not same(view_numel, tensor_numel):
                return False
            if d > 0:
                base = stride[d - 1]
                tensor_numel = view_numel = 1
    return view_d == -1


@dataclass(frozen=True)
class _Sizes:
    """Where symbolic sizes can be read before one insertion point."""

    values: dict[sympy.Expr, Node]  # nodes whose value is the size
    dims: dict[sympy.Expr, tuple[Node, int]]  # (tensor, dim) of that size


class Emitter:
    def __init__(self, graph: Graph, anchor: Node) -> None:
        self.graph = graph
        self.anchor = anchor
        self.dialect = dialect_of(graph)
        self.key = value_key(graph)
        self.mode = _fake_mode(graph, self.key)
        self.created: list[Node] = []
        self.size_nodes: list[Node] = []  # symbolic size arguments, outside the pipeline stages
        self._sizes: dict[Node, _Sizes] = {}  # per insertion point
        self.avoid: set[Node] = set()  # nodes a size must not be read from: they are about to go

    # -- fake values ---------------------------------------------------------------------------
    def _fake(self, value: Any) -> Any:
        """`value` with every tensor in it a fake tensor of this emitter's mode."""
        return tree_map_only(torch.Tensor, self._convert, value)

    def _convert(self, tensor: torch.Tensor) -> FakeTensor:
        if isinstance(tensor, FakeTensor) and tensor.fake_mode is self.mode:
            return tensor
        # the mode memoises by tensor, so a value read twice is one fake tensor, aliasing included
        return self.mode.from_tensor(tensor, static_shapes=True)

    def _value(self, node: Node) -> Any:
        val = node.meta.get(self.key, node.meta.get("val", node.meta.get("example_value")))
        if val is None:
            raise EmitError(f"{node.name} has no fake value")
        try:
            return self._fake(val)
        except Exception as err:  # noqa: BLE001 - a value this mode cannot hold leaves the site as it was
            raise EmitError(f"{node.name}'s value cannot be converted to the graph's fake mode: {err}") from err

    def _annotate(self, node: Node) -> Node:
        self.created.append(node)  # before its value is computed: a node that does not check is erased too
        args = map_arg(node.args, self._value)
        kwargs = map_arg(node.kwargs, self._value)
        try:
            with self.mode:
                if node.op == "call_method":
                    val = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    val = node.target(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any failure means the new node is invalid
            raise EmitError(f"{node.format_node()}: {err}") from err
        node.meta[self.key] = val
        return node

    # -- node builders -------------------------------------------------------------------------
    def call(self, target: Any, *args: Any, **kwargs: Any) -> Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        return self._annotate(node)

    def method(self, name: str, *args: Any, **kwargs: Any) -> Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_method(name, args, kwargs)
        return self._annotate(node)

    def copy(self, node: Node, replace: dict[Node, Node]) -> Node:
        """`node` again, with some inputs replaced."""
        with self.graph.inserting_before(self.anchor):
            new = self.graph.node_copy(node, lambda n: replace.get(n, n))
        new.meta = {k: v for k, v in node.meta.items() if k not in ("val", "example_value", "tensor_meta")}
        return self._annotate(new)

    def getitem(self, node: Node, index: int) -> Node:
        return self.call(operator.getitem, node, index)

    def narrow(self, x: Node, dim: int, start: Size, length: Size) -> Node:
        if self.dialect == "torch":
            return self.method("narrow", x, dim, self.size_arg(start), self.size_arg(length))
        return self.call(aten.slice.Tensor, x, dim, self.size_arg(start), self.size_arg(size(start) + size(length)))

    def contiguous(self, x: Node) -> Node:
        if self.dialect == "torch":
            return self.method("contiguous", x)
        return self.call(aten.clone.default, x, memory_format=torch.contiguous_format)

    def is_contiguous(self, x: Node) -> bool:
        return known_contiguous(self._value(x))

    def reshape(self, x: Node, shape: Sequence[Size], like: Node | None = None) -> Node:
        """A view where the strides allow one, else a copy; `like` keeps the original op's kind."""
        shape = [size(s) for s in shape]
        args = self.size_args(shape)
        if self.dialect == "torch":
            return self.method("reshape", x, args)
        if like is not None and like.target is aten.reshape.default:
            return self.call(aten.reshape.default, x, args)  # graphs that keep reshape (export) get it back
        val = self._value(x)
        if not viewable(tuple(size(s) for s in val.shape), tuple(size(s) for s in val.stride()), shape):
            return self.call(aten._unsafe_view.default, self.contiguous(x), args)
        target = aten._unsafe_view.default if like is not None and like.target is aten._unsafe_view.default \
            else aten.view.default
        return self.call(target, x, args)

    def expand(self, x: Node, shape: Sequence[Size]) -> Node:
        args = self.size_args(shape)
        if self.dialect == "torch":
            return self.method("expand", x, args)
        return self.call(aten.expand.default, x, args)

    def cat(self, xs: Sequence[Node], dim: int) -> Node:
        if self.dialect == "torch":
            return self.call(torch.cat, list(xs), dim)
        return self.call(aten.cat.default, list(xs), dim)

    def restride(self, x: Node, like: Node) -> Node:
        """`x` with the strides of `like` (same shape): saved tensors must keep the layout the
        backward graph was compiled for. Dynamo graphs are retraced, so there it is a no-op."""
        have, want = self._value(x), self._value(like)
        if self.dialect == "torch" or all(map(same, map(size, have.stride()), map(size, want.stride()))):
            return x
        empty = self.call(aten.empty_strided.default, self.size_args(want.shape), self.size_args(want.stride()),
                          dtype=want.dtype, device=want.device)
        return self.call(aten.copy.default, empty, x)

    # -- symbolic size arguments ---------------------------------------------------------------
    def size_args(self, shape: Sequence[Size]) -> list[int | Node]:
        return [self.size_arg(s) for s in shape]

    def size_arg(self, value: Size, before: Node | None = None) -> int | Node:
        """An int, or a node that computes the symbolic size `value`, placed before `before` (by
        default the anchor) and built from nodes before it."""
        value = size(value)
        if not is_symbolic(value):
            return value
        return self._build(value.node.expr, self.anchor if before is None else before)

    def _known_sizes(self, before: Node) -> _Sizes:
        """SymInt values, and tensors' symbolic dims, of the nodes before `before` (found once)."""
        if before not in self._sizes:
            known = self._sizes[before] = _Sizes({}, {})
            tainted = set(self.avoid)
            for node in self.graph.nodes:
                if node is before:
                    break
                if node in tainted or any(arg in tainted for arg in node.all_input_nodes):
                    tainted.add(node)
                    continue
                val = node.meta.get(self.key)
                if isinstance(val, torch.SymInt) and is_symbolic(val):
                    known.values.setdefault(val.node.expr, node)
                elif isinstance(val, torch.Tensor):
                    for dim, n in enumerate(val.shape):
                        if is_symbolic(n):
                            known.dims.setdefault(n.node.expr, (node, dim))
        return self._sizes[before]

    def _build(self, expr: sympy.Expr, before: Node) -> int | Node:
        if expr.is_Integer:
            return int(expr)
        known = self._known_sizes(before)
        if expr in known.values:
            return known.values[expr]
        if expr in known.dims:
            tensor, dim = known.dims[expr]
            node = self._size_node(before, "size" if self.dialect == "torch" else aten.sym_size.int, tensor, dim)
        elif isinstance(expr, (sympy.Mul, sympy.Add)):
            combine = operator.mul if isinstance(expr, sympy.Mul) else operator.add
            parts = [self._build(arg, before) for arg in expr.args]
            node = parts[0]
            for part in parts[1:]:
                node = self._size_node(before, combine, node, part)
        elif isinstance(expr, FloorDiv):
            node = self._size_node(before, operator.floordiv, *(self._build(arg, before) for arg in expr.args))
        else:
            raise EmitError(f"cannot express the symbolic size {expr} with values of the graph")
        known.values[expr] = node
        return node

    def _size_node(self, before: Node, target: Any, *args: Any) -> Node:
        with self.graph.inserting_before(before):
            if isinstance(target, str):
                node = self.graph.call_method(target, args)
            else:
                node = self.graph.call_function(target, args)
        values = map_arg(args, self._value)
        try:
            with self.mode:
                val = getattr(values[0], target)(*values[1:]) if isinstance(target, str) else target(*values)
        except Exception as err:  # noqa: BLE001 - any failure means the size cannot be built here
            self.graph.erase_node(node)
            raise EmitError(f"{node.format_node()}: {err}") from err
        node.meta[self.key] = val
        self.size_nodes.append(node)
        return node

    def drop_unused_sizes(self) -> None:
        for node in reversed(self.size_nodes):
            if not node.users:
                self.graph.erase_node(node)
        self.size_nodes = [node for node in self.size_nodes if not getattr(node, "_erased", False)]

    def rollback(self) -> None:
        """Erase every node this emitter created. A node is created after its inputs, so in reverse
        order each node's users among the new nodes are already gone; any other user is an original
        node the rewrite had already rewired."""
        for node in [*reversed(self.created), *reversed(self.size_nodes)]:
            if node.users:
                users = ", ".join(user.name for user in node.users)
                raise RollbackError(f"cannot undo the rewrite: the new node {node.name} is already used by {users}")
            self.graph.erase_node(node)
        self.created.clear()
        self.size_nodes.clear()
