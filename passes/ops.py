"""What a traced node means, whatever the tracer that produced it.

Terms
- dialect: "aten" for graphs of OpOverloads (make_fx, torch.export, AOTAutograd) and "torch" for
  Dynamo graphs (torch functions, `call_method` nodes, OpOverloadPackets).
- layout op: a node that only moves elements of one tensor (see `layout.py`); `LayoutOp` names its
  kind and the arguments the dimension algebra needs. A conversion (`to`, `_to_copy`) that keeps the
  dtype, device and layout is an identity; one that converts computes.
- attention op: SDPA in any of its forms; `AttentionOp` says where q, k, v and the options sit.
- exchange op: the functional all-to-all; a wait is the node that completes it.
- join: a stack or cat whose inputs are all the pieces of one split, chunk or unbind of a single
  tensor, in order (`torch.stack(x.chunk(P, d))`, `torch.cat(x.unbind(0), d)`, or the selects and
  slices AOTAutograd writes for their backward). It only regroups that tensor, so it is a layout op
  whose source is the split's input; the split node and its getitems (or the selects or slices)
  are its pieces (`join_pieces`). A stack of several different tensors is not a layout op.
- in-place exchange: a collective whose result a fresh buffer (`empty_like`, `zeros_like`,
  `new_empty`, ...) receives by `copy_` (Dynamo, export) or by the functional `copy`
  (AOTAutograd); `inplace_fill` finds the fill.
- c10d exchange: make_fx records `dist.all_to_all_single(out, x)` as the non-functional
  `c10d.alltoall_base_(out, x, <ProcessGroup>, out_splits, in_splits, async_op)`, which writes `out`
  and returns a Work handle no node waits on. When it runs synchronously into a fresh buffer of the
  sent tensor's shape and dtype that nothing touches before it, the buffer after it holds the
  exchanged tensor: the buffer stands for the wait (`c10d_exchange`), and the rewrite emits
  functional all-to-alls on the process group's name in its place.

Steps of `layout_op(node)`:
1. Normalise the target to a name (`aten.view.default`, `torch.reshape` and `x.reshape()` are all
   "reshape"-like).
2. Read the dims the op touches from its arguments (Dynamo passes them as varargs or a list); for a
   stack or cat, prove its inputs are the pieces of one split, in order.
3. Return None for anything else; callers stop their walk there.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node

aten = torch.ops.aten
c10d = torch.ops._c10d_functional

REGROUP = "regroup"
PERMUTE = "permute"
TRANSPOSE = "transpose"
SQUEEZE = "squeeze"
UNSQUEEZE = "unsqueeze"
SELECT = "select"
UNBIND = "unbind"
IDENTITY = "identity"
EXPAND = "expand"  # dims: the target sizes
REPEAT = "repeat"  # dims: (dim, repeats) of repeat_interleave
NEW_AXES = "new_axes"  # dims: where `x[:, None]`-style indexing inserts size-1 dims
# a stack or cat of all the pieces of one split/chunk/unbind, in order: a regroup of that one tensor.
# dims: (split dim, pieces, 1 if the pieces lost the split dim (unbind) else 0, stack or cat dim)
STACK = "stack"
CAT = "cat"


@dataclass(frozen=True)
class LayoutOp:
    kind: str
    source: Node
    dims: tuple[int, ...] = ()


def target_name(node: Node) -> str:
    """A dialect-free name: "view" for aten.view.default, torch.Tensor.view and x.view()."""
    target = node.target
    if node.op == "call_method":
        return str(target)
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def _ints(values: Sequence[Any]) -> tuple[int, ...]:
    if len(values) == 1 and isinstance(values[0], (list, tuple, torch.Size)):
        values = values[0]
    if not all(isinstance(v, int) for v in values):
        raise TypeError("dims are not static integers")
    return tuple(values)


_REGROUP = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "view_as", "reshape_as"}
_IDENTITY = {"contiguous", "clone", "detach", "alias", "lift_fresh_copy"}
# `x.to(...)` and its ATen copy: the same values when they change neither dtype, device nor layout
# (yunchang's one-step ring merge casts its fp32 output to fp32 twice; `to` then returns `x` itself)
_CONVERSIONS = {"to", "_to_copy"}
_CALLABLE_OPS: dict[Any, str] = {
    torch.reshape: "reshape",
    torch.flatten: "flatten",
    torch.unflatten: "unflatten",
    torch.permute: "permute",
    torch.transpose: "transpose",
    torch.swapaxes: "transpose",
    torch.swapdims: "transpose",
    torch.squeeze: "squeeze",
    torch.unsqueeze: "unsqueeze",
    torch.select: "select",
    torch.unbind: "unbind",
    torch.clone: "clone",
    torch.detach: "detach",
    torch.repeat_interleave: "repeat_interleave",
    torch.stack: "stack",
    torch.cat: "cat",
    torch.concat: "cat",
    torch.concatenate: "cat",
}


def _tensor_input(node: Node) -> Node | None:
    arg = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    return arg if isinstance(arg, Node) else None


def _dtype(node: Node) -> Any:
    val = node.meta.get("val", node.meta.get("example_value"))
    return getattr(val, "dtype", None)


def _same_kind(node: Node, source: Node) -> bool:
    """Whether conversion `node` provably keeps every value of `source`: both recorded as tensors of one
    dtype, device and layout (a conversion never reshapes), and no memory format other than preserve or
    contiguous asked for (a channels-last copy changes strides, which the layout algebra does not follow)."""
    have, want = (n.meta.get("val", n.meta.get("example_value")) for n in (node, source))
    if not isinstance(have, torch.Tensor) or not isinstance(want, torch.Tensor):
        return False
    if (have.dtype, have.device, have.layout) != (want.dtype, want.device, want.layout):
        return False
    fmt = node.kwargs.get("memory_format")
    return fmt in (None, torch.preserve_format, torch.contiguous_format)


def layout_op(node: Node) -> LayoutOp | None:
    """The layout meaning of `node`, or None when it computes, or its effect cannot be proven."""
    step = _layout_op(node)
    if step is not None and step.kind != UNBIND and _dtype(node) != _dtype(step.source):
        return None  # `view(dtype)` reinterprets bits: not a layout op
    return step


def _layout_op(node: Node) -> LayoutOp | None:
    if node.op not in ("call_function", "call_method"):
        return None
    if node.target is operator.getitem and isinstance(node.args[0], Node):
        return _tensor_index(node)
    name = _CALLABLE_OPS.get(node.target, target_name(node)) if node.op == "call_function" else str(node.target)
    if name in _JOINS:
        return _join(node, _JOINS[name])
    source = _tensor_input(node)
    if source is None:
        return None
    if is_wait(node):
        # A wait completes a collective; on anything else (a waited tensor, a view of one) it is a no-op.
        return None if _is_c10d(source) and not is_wait(source) else LayoutOp(IDENTITY, source)
    rest = list(node.args[1:])
    try:
        if name in _REGROUP:
            return LayoutOp(REGROUP, source)
        if name in _IDENTITY:
            fmt = node.kwargs.get("memory_format", torch.contiguous_format)
            if fmt not in (torch.contiguous_format, torch.preserve_format):
                return None
            return LayoutOp(IDENTITY, source)
        if name in _CONVERSIONS:
            return LayoutOp(IDENTITY, source) if _same_kind(node, source) else None
        if name == "permute":
            return LayoutOp(PERMUTE, source, _ints(rest or [node.kwargs["dims"]]))
        if name in ("transpose", "swapaxes", "swapdims"):
            return LayoutOp(TRANSPOSE, source, _ints(rest or [node.kwargs["dim0"], node.kwargs["dim1"]]))
        if name == "unsqueeze":
            return LayoutOp(UNSQUEEZE, source, _ints(rest or [node.kwargs["dim"]]))
        if name == "squeeze":
            dims = rest or ([node.kwargs["dim"]] if "dim" in node.kwargs else [])
            return LayoutOp(SQUEEZE, source, _ints(dims)) if dims else None
        if name == "select":
            dim = rest[0] if rest else node.kwargs["dim"]
            return LayoutOp(SELECT, source, _ints([dim]))
        if name == "unbind":
            return LayoutOp(UNBIND, source, _ints(rest or [node.kwargs.get("dim", 0)]))
        if name == "expand":
            return LayoutOp(EXPAND, source, _ints(rest or [node.kwargs["size"]]))
        if name == "repeat_interleave":
            repeats, dim = (rest + [None, None])[:2]
            repeats, dim = node.kwargs.get("repeats", repeats), node.kwargs.get("dim", dim)
            if not isinstance(repeats, int) or not isinstance(dim, int) or "output_size" in node.kwargs:
                return None  # a tensor of repeat counts, or a flattening repeat
            return LayoutOp(REPEAT, source, (dim, repeats))
    except (TypeError, KeyError):
        return None
    return None


def _tensor_index(node: Node) -> LayoutOp | None:
    """Dynamo keeps tensor indexing as getitem: `x[i]` selects along dim 0, and an index of full
    slices and Nones (`x[:, :, None]`) inserts size-1 dims."""
    source, index = node.args[0], node.args[1]
    source_val = source.meta.get("val", source.meta.get("example_value"))
    if not isinstance(source_val, torch.Tensor):
        return None
    if isinstance(index, int):
        return LayoutOp(SELECT, source, (0,))
    full = slice(None, None, None)
    if not isinstance(index, tuple) or any(i is not None and i != full for i in index):
        return None
    return LayoutOp(NEW_AXES, source, tuple(pos for pos, i in enumerate(index) if i is None))


_JOINS = {"stack": STACK, "cat": CAT, "concat": CAT, "concatenate": CAT}
_SPLITS = {"split", "chunk", "unbind", "split_with_sizes", "tensor_split"}


def _join(node: Node, kind: str) -> LayoutOp | None:
    """A stack or cat of all the equal pieces of one tensor, in order; None for anything else (a
    stack of q, k and v, say, which gathers several tensors)."""
    pieces = node.args[0] if node.args else node.kwargs.get("tensors")
    if not isinstance(pieces, (list, tuple)) or not pieces or not all(isinstance(p, Node) for p in pieces):
        return None
    split = _split_items(pieces) or _slices(pieces)
    if split is None:
        return None
    source, dim, count, squeezed = split
    rank = len(_shape(source)) - squeezed + (kind == STACK)
    join_dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0))
    if not isinstance(join_dim, int) or not -rank <= join_dim < rank:
        return None
    return LayoutOp(kind, source, (dim, count, squeezed, join_dim % rank))


def _split_items(pieces: Sequence[Node]) -> tuple[Node, int, int, int] | None:
    """`getitem(split(x), i)` for every piece i of one split, chunk or unbind, in order."""
    parent = pieces[0].args[0] if pieces[0].args else None
    if not isinstance(parent, Node):
        return None
    split = _split(parent)
    if split is None:
        return None
    if [(p.args[0], p.args[1]) if _is_item(p) else None for p in pieces] != [(parent, i) for i in range(split[2])]:
        return None
    return split


def _slices(pieces: Sequence[Node]) -> tuple[Node, int, int, int] | None:
    """`select(x, d, i)` for every i, or `slice(x, d, i*m, (i+1)*m)` for equal blocks covering dim d in
    order: what AOTAutograd writes for the backward of a stack or cat."""
    first = pieces[0]
    if first.op != "call_function" or first.target not in (aten.select.int, aten.slice.Tensor):
        return None
    source = first.args[0]
    shape = _shape(source) if isinstance(source, Node) else ()
    params = ("self", "dim", "start", "end", "step") if first.target is aten.slice.Tensor else ("self", "dim", "index")
    calls = []
    for piece in pieces:
        if piece.op != "call_function" or piece.target is not first.target:
            return None
        calls.append({"dim": 0, "start": None, "end": None, "step": 1, **dict(zip(params, piece.args, strict=False)),
                      **piece.kwargs})
    if not shape or not all(isinstance(n, int) for n in shape) or not isinstance(calls[0]["dim"], int) \
            or any(c["self"] is not source or c["dim"] != calls[0]["dim"] for c in calls):
        return None
    dim = calls[0]["dim"] % len(shape)
    size, count = shape[dim], len(pieces)
    if first.target is aten.select.int:
        return (source, dim, count, 1) if [c["index"] for c in calls] == list(range(size)) else None
    width = size // count
    blocks = [(c["start"] or 0, size if c["end"] is None else min(c["end"], size), c["step"]) for c in calls]
    if size % count or blocks != [(i * width, (i + 1) * width, 1) for i in range(count)]:
        return None
    return source, dim, count, 0


def _is_item(node: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target is operator.getitem \
        and isinstance(node.args[1], int)


def _shape(node: Node) -> tuple[int, ...]:
    val = node.meta.get("val", node.meta.get("example_value"))
    return tuple(getattr(val, "shape", ()))


def _split(parent: Node) -> tuple[Node, int, int, int] | None:
    """(source, dim, piece count, 1 for unbind else 0) of a split of one tensor into equal pieces."""
    if parent.op not in ("call_function", "call_method"):
        return None
    name = _CALLABLE_OPS.get(parent.target, target_name(parent)) if parent.op == "call_function" \
        else str(parent.target)
    source = _tensor_input(parent)
    values = parent.meta.get("val", parent.meta.get("example_value"))
    if name not in _SPLITS or source is None or not isinstance(values, (list, tuple)) or not values:
        return None
    shape = _shape(source)
    if name == "unbind":
        dim = parent.args[1] if len(parent.args) > 1 else parent.kwargs.get("dim", 0)
    else:
        dim = parent.args[2] if len(parent.args) > 2 else parent.kwargs.get("dim", 0)
    if not isinstance(dim, int) or not shape or not all(isinstance(s, int) for s in shape):
        return None
    dim %= len(shape)
    count = len(values)
    squeezed = int(name == "unbind")
    piece = shape[:dim] + (() if squeezed else (shape[dim] // count,)) + shape[dim + 1:]
    if shape[dim] % count or any(tuple(getattr(v, "shape", ())) != piece for v in values):
        return None  # unequal pieces are not one regroup
    return source, dim, count, squeezed


def join_pieces(node: Node) -> tuple[Node, ...]:
    """The nodes between a join (see `layout_op`) and its source: the split node and its getitems,
    or the selects or slices; empty for other nodes."""
    step = layout_op(node)
    if step is None or step.kind not in (STACK, CAT):
        return ()
    items = tuple(node.args[0] if node.args else node.kwargs["tensors"])
    return (items[0].args[0], *items) if _is_item(items[0]) else items


def joined_by(node: Node) -> Node | None:
    """The join that reads `node` as one of its pieces (a split node, a getitem of it, a select or
    slice), when the pieces feed nothing but that join: then they need no layout or replay of their own."""
    for user in (node, *node.users):
        for join in user.users:
            pieces = join_pieces(join)
            if node in pieces and all(set(p.users) <= {*pieces, join} for p in pieces):
                return join
    return None


def unbind_item(node: Node) -> tuple[Node, int] | None:
    """`getitem(unbind(x), i)` -> (the unbind node, i)."""
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], Node):
        parent = node.args[0]
        op = layout_op(parent)
        if op is not None and op.kind == UNBIND and isinstance(node.args[1], int):
            return parent, node.args[1]
    return None


@dataclass(frozen=True)
class Stack:
    """`stack(tensors, dim)` or `cat(tensors, dim)`: one buffer holding each tensor in a slot."""

    sources: tuple[Node, ...]
    dim: int  # as written: may be negative
    new_dim: bool  # stack adds the slot dim; cat puts the slot outermost in an existing dim


def stack_of(node: Node) -> Stack | None:
    """The tensors a stack or cat node joins, or None for any other node (and for one tensor)."""
    if node.op != "call_function":
        return None
    name = {torch.stack: "stack", torch.cat: "cat", torch.concat: "cat"}.get(node.target, target_name(node))
    if name not in ("stack", "cat", "concat"):
        return None
    values = dict(zip(("tensors", "dim"), node.args, strict=False)) | dict(node.kwargs)
    tensors, dim = values.get("tensors"), values.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or len(tensors) < 2 or not isinstance(dim, int):
        return None
    if not all(isinstance(t, Node) for t in tensors):
        return None
    return Stack(tuple(tensors), dim, name == "stack")


# -- exchanges --------------------------------------------------------------------------------

_A2A_NAMES = {"all_to_all_single", "all_to_all_single_autograd"}


def is_all_to_all(node: Node) -> bool:
    return node.op == "call_function" and target_name(node) in _A2A_NAMES and _is_c10d(node)


def is_wait(node: Node) -> bool:
    """Any wait_tensor; `layout_op` tells a real wait (on a collective) from a no-op one."""
    return node.op == "call_function" and target_name(node) == "wait_tensor" and _is_c10d(node)


def _is_c10d(node: Node) -> bool:
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    target = node.target
    ns = getattr(target, "namespace", None) or getattr(getattr(target, "_schema", None), "name", "").split("::")[0]
    if isinstance(target, torch._ops.OpOverloadPacket):
        ns = target._qualified_op_name.split("::")[0]
    return ns in ("_c10d_functional", "_c10d_functional_autograd")


@dataclass(frozen=True)
class ExchangeArgs:
    input: Node
    output_splits: Any
    input_splits: Any
    group: Any  # the group name (a c10d exchange's process group object is resolved to its name)


def exchange_args(node: Node) -> ExchangeArgs:
    if is_c10d_all_to_all(node):
        names = ("output", "input", "process_group", "output_split_sizes", "input_split_sizes")
        values = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
        return ExchangeArgs(values["input"], values["output_split_sizes"], values["input_split_sizes"],
                            _group_name(values["process_group"]))
    names = ("input", "output_split_sizes", "input_split_sizes", "group_name")
    values = dict(zip(names, node.args, strict=False))
    values.update(node.kwargs)
    return ExchangeArgs(*(values[name] for name in names))


def is_c10d_all_to_all(node: Node) -> bool:
    """make_fx's record of `dist.all_to_all_single(out, x)`: `c10d.alltoall_base_`, in place on `out`."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name == "c10d::alltoall_base_"
    return isinstance(target, torch._ops.OpOverloadPacket) and target._qualified_op_name == "c10d::alltoall_base_"


def is_exchange(node: Node) -> bool:
    """A functional all-to-all, or a c10d one that `c10d_exchange` proves fills its buffer."""
    return is_all_to_all(node) or (is_c10d_all_to_all(node) and c10d_exchange(node.args[0]) is node)


def _group_name(group: Any) -> Any:
    """The name of the process group a c10d op's argument holds (make_fx keeps the group as a
    get_attr of a torchbind object); the argument itself when it cannot be read here, so that
    resolving it later fails with a reason."""
    obj = group
    if isinstance(group, Node) and group.op == "get_attr" and group.graph.owning_module is not None:
        obj = getattr(group.graph.owning_module, str(group.target), group)
    try:
        from torch._C._distributed_c10d import ProcessGroup

        return ProcessGroup.unbox(obj).group_name if isinstance(obj, torch.ScriptObject) else obj.group_name
    except Exception:  # noqa: BLE001 - no distributed build, or not a process group
        return group


def c10d_writer(buffer: Node) -> Node | None:
    """The c10d all-to-all that writes `buffer` in place, if one does."""
    return next((u for u in buffer.users if is_c10d_all_to_all(u) and u.args[0] is buffer), None)


def c10d_exchange(buffer: Node) -> Node | None:
    """The `c10d.alltoall_base_` whose result `buffer` provably holds after it (see the module
    docstring), or None; `c10d_unproven` says why not."""
    writer = c10d_writer(buffer) if isinstance(buffer, Node) else None
    return writer if writer is not None and c10d_unproven(writer) is None else None


def c10d_unproven(op: Node) -> str | None:
    """Why the buffer of c10d all-to-all `op` is not provably its exchanged tensor; None when it is."""
    names = ("output", "input", "process_group", "output_split_sizes", "input_split_sizes", "async_op")
    values = dict(zip(names, op.args, strict=False)) | dict(op.kwargs)
    buffer, sent = values["output"], values["input"]
    if values.get("async_op", True) is not False:
        return "with async_op=True: make_fx records no wait on its Work, so the graph does not say when it is filled"
    if op.users:
        return "and its Work handle is used"
    if not _is_fresh(buffer):
        return f"but {buffer.name} is not a fresh buffer (empty_like, zeros_like, new_empty, ...)"
    have, want = (n.meta.get("val", n.meta.get("example_value")) for n in (buffer, sent))
    if getattr(have, "shape", None) != getattr(want, "shape", None) or _dtype(buffer) != _dtype(sent):
        return "but the buffer has another shape or dtype than the sent tensor"
    order = {n: i for i, n in enumerate(op.graph.nodes)}
    if any(order[u] < order[op] or (u is not op and buffer in mutated_args(u)) for u in buffer.users):
        return "but the buffer is read or written before the exchange fills it, or written again after it"
    return None


# -- attention --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionOp:
    """Where an attention op (forward or backward) keeps its per-head tensors.

    `head_params` maps each parameter indexed by head to its head axis; `head_outputs` does the same
    for outputs (index 0 for ops that return one tensor). Outputs not listed (RNG state, sequence
    offsets) are the same for every chunk when dropout is off.
    """

    kernel: str
    params: tuple[str, ...]  # positional parameter names, in order
    mask: str | None
    returns_tuple: bool
    head_params: dict[str, int]
    head_outputs: dict[int, int]
    backward: bool = False
    native_gqa: bool = False  # takes fewer KV heads than query heads without an enable_gqa flag


_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_QKV_HEADS = {"query": -3, "key": -3, "value": -3}
# [B, H, S, D] tensors have heads at -3; log-sum-exp is [B, H, S(, 1)], heads at 1
_HEAD_AXIS = {"query": -3, "key": -3, "value": -3, "out": -3, "grad_out": -3, "grad_out_": -3, "logsumexp": 1}


def _aten_attention() -> dict[Any, AttentionOp]:
    table: dict[Any, AttentionOp] = {
        aten.scaled_dot_product_attention.default: AttentionOp(
            "sdpa", _SDPA_PARAMS, "attn_mask", False, _QKV_HEADS, {0: -3}),
    }
    kernels = {  # ATen name: (kernel, mask parameter, per-head outputs)
        "_scaled_dot_product_flash_attention_for_cpu": ("flash_cpu", "attn_mask", {0: -3, 1: 1}),
        "_scaled_dot_product_flash_attention": ("flash", None, {0: -3, 1: 1}),
        "_scaled_dot_product_efficient_attention": ("efficient", "attn_bias", {0: -3, 1: 1}),
        "_scaled_dot_product_cudnn_attention": ("cudnn", "attn_bias", {0: -3, 1: 1}),
        "_scaled_dot_product_flash_attention_for_cpu_backward": ("flash_cpu", "attn_mask", {0: -3, 1: -3, 2: -3}),
        "_scaled_dot_product_flash_attention_backward": ("flash", None, {0: -3, 1: -3, 2: -3}),
        "_scaled_dot_product_efficient_attention_backward": ("efficient", "attn_bias", {0: -3, 1: -3, 2: -3}),
        "_scaled_dot_product_cudnn_attention_backward": ("cudnn", "attn_bias", {0: -3, 1: -3, 2: -3}),
    }
    for op_name, (kernel, mask, outputs) in kernels.items():
        packet = getattr(aten, op_name, None)
        if packet is None:
            continue
        overload = packet.default
        params = tuple(a.name for a in overload._schema.arguments)
        heads = {name: axis for name, axis in _HEAD_AXIS.items() if name in params}
        table[overload] = AttentionOp(kernel, params, mask, True, heads, outputs, op_name.endswith("_backward"),
                                      native_gqa=kernel in ("flash_cpu", "flash"))
    return table


_ATTENTION: dict[Any, AttentionOp] = {
    F.scaled_dot_product_attention: AttentionOp("sdpa", _SDPA_PARAMS, "attn_mask", False, _QKV_HEADS, {0: -3}),
    aten.scaled_dot_product_attention: AttentionOp("sdpa", _SDPA_PARAMS, "attn_mask", False, _QKV_HEADS, {0: -3}),
    **_aten_attention(),
}


def attention_op(node: Node) -> AttentionOp | None:
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverloadPacket):  # Dynamo keeps `torch.ops.aten.x` calls as packets
        target = getattr(target, "default", target)
    return _ATTENTION.get(target)


def attention_args(node: Node, op: AttentionOp) -> dict[str, Any]:
    """All arguments by parameter name, defaults filled in for the options HCMS checks."""
    values: dict[str, Any] = {"attn_mask": None, "attn_bias": None, "dropout_p": 0.0, "is_causal": False,
                              "scale": None, "enable_gqa": False}
    values.update(zip(op.params, node.args, strict=False))
    values.update(node.kwargs)
    return values


def replace_attention_inputs(node: Node, op: AttentionOp, new: dict[str, Node]) -> tuple[tuple, dict]:
    """The node's args and kwargs with some tensor parameters replaced."""
    args = tuple(new.get(name, value) for name, value in zip(op.params, node.args, strict=False))
    kwargs = {k: new.get(k, v) for k, v in node.kwargs.items()}
    return args, kwargs



# -- in-place exchanges -------------------------------------------------------------------------


_FRESH = {"empty_like", "zeros_like", "empty", "zeros", "new_empty", "new_zeros"}


def _is_fresh(node: Node) -> bool:
    """A new dense buffer (`torch.empty_like(x)`, `x.new_empty(shape)`, ...) whose contents nobody reads
    before a copy of the same shape overwrites all of them."""
    if node.op not in ("call_function", "call_method") or target_name(node) not in _FRESH:
        return False
    return node.kwargs.get("memory_format", torch.preserve_format) in (None, torch.preserve_format,
                                                                       torch.contiguous_format)


def _is_copy(node: Node) -> bool:
    """`buffer.copy_(src)`: Dynamo's `call_method`, or export's `aten.copy_`."""
    if node.op == "call_method":
        return node.target == "copy_"
    return node.op == "call_function" and node.target in (aten.copy_.default, torch.Tensor.copy_)


def _is_functional_copy(node: Node) -> bool:
    """`aten.copy(buffer, src)`: AOTAutograd's functional form of `copy_`; its result is the filled buffer."""
    return node.op == "call_function" and node.target is aten.copy.default


def inplace_fill(node: Node) -> Node | None:
    """The node that fills a fresh receive buffer with a collective's result, for that buffer or for
    the fill itself; None for any other node.

    `dist.all_to_all_single(out, x)` with `out = torch.empty_like(...)` (or another fresh buffer) reaches the graph as a
    functional all-to-all, a wait, and then one of: `out.copy_(result)` that later nodes read through
    `out` (Dynamo) or through copy_'s result (export), or `copy(out, result)` whose result is read
    (AOTAutograd functionalisation). Either way the buffer and the fill alias the wait when the
    buffer is fresh, filled once with the same shape and dtype, and read only after the fill.
    """
    if (_is_copy(node) or _is_functional_copy(node)) and isinstance(node.args[0], Node):
        return node if _buffer_fill(node.args[0]) is node else None
    return _buffer_fill(node)


def _buffer_fill(buffer: Node) -> Node | None:
    if not _is_fresh(buffer):
        return None
    fills = [u for u in buffer.users if (_is_copy(u) or _is_functional_copy(u)) and u.args[0] is buffer]
    if len(fills) != 1:
        return None
    fill = fills[0]
    source = fill.args[1]
    if not (isinstance(source, Node) and is_wait(source)):
        return None
    have, want = (n.meta.get("val", n.meta.get("example_value")) for n in (buffer, source))
    if getattr(have, "shape", None) != getattr(want, "shape", None) or _dtype(buffer) != _dtype(source):
        return None  # copy broadcasts and converts: not an alias of the wait
    others = [u for u in buffer.users if u is not fill]
    if _is_functional_copy(fill) and others:
        return None  # readers of the buffer itself read the uninitialised memory, not the result
    order = {n: i for i, n in enumerate(buffer.graph.nodes)}
    if any(order[u] < order[fill] for u in others):
        return None
    return fill


# -- mutation -----------------------------------------------------------------------------------


def mutated_args(node: Node) -> list[Node]:
    """The tensors `node` writes in place (empty for functional ops)."""
    target = node.target
    if node.op == "call_method":
        name = str(target)
        return [node.args[0]] if name.endswith("_") and not name.startswith("_") and node.args else []
    if node.op != "call_function":
        return []
    if isinstance(target, torch._ops.OpOverloadPacket):
        target = getattr(target, "default", None) or target
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "c10d" and target._schema.name.endswith("_"):
        # the non-functional collectives (alltoall_base_, allreduce_, ...) write their first argument,
        # a tensor or a list of them, though their schemas do not say so
        first = node.args[0] if node.args else None
        return [t for t in (first if isinstance(first, (list, tuple)) else [first]) if isinstance(t, Node)]
    if isinstance(target, torch._ops.OpOverload):
        values = dict(zip((a.name for a in target._schema.arguments), node.args, strict=False)) | dict(node.kwargs)
        return [values[a.name] for a in target._schema.arguments
                if a.alias_info is not None and a.alias_info.is_write and isinstance(values.get(a.name), Node)]
    if target in (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv):
        return [node.args[0]] if isinstance(node.args[0], Node) else []
    name = getattr(target, "__name__", "")
    if name.endswith("_") and not name.startswith("_") and node.args and isinstance(node.args[0], Node):
        return [node.args[0]]
    return []


def storage_root(node: Node) -> Node:
    """The node whose storage `node` may alias, following layout ops (conservatively)."""
    while True:
        step = layout_op(node)
        if step is None:
            item = unbind_item(node)
            if item is None:
                return node
            node = item[0]
            continue
        node = step.source
