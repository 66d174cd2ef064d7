"""What a traced node means, whatever the tracer that produced it.

Terms
- dialect: "aten" for graphs of OpOverloads (make_fx, torch.export, AOTAutograd) and "torch" for
  Dynamo graphs (torch functions, `call_method` nodes, OpOverloadPackets).
- layout op: a node that only moves elements of one tensor (see `layout.py`); `LayoutOp` names its
  kind and the arguments the dimension algebra needs.
- attention op: SDPA in any of its forms; `AttentionOp` says where q, k, v and the options sit.
- exchange op: the functional all-to-all; a wait is the node that completes it.

Steps of `layout_op(node)`:
1. Normalise the target to a name (`aten.view.default`, `torch.reshape` and `x.reshape()` are all
   "reshape"-like).
2. Read the dims the op touches from its arguments (Dynamo passes them as varargs or a list).
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
}


def _tensor_input(node: Node) -> Node | None:
    arg = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    return arg if isinstance(arg, Node) else None


def _dtype(node: Node) -> Any:
    val = node.meta.get("val", node.meta.get("example_value"))
    return getattr(val, "dtype", None)


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
    group: Any


def exchange_args(node: Node) -> ExchangeArgs:
    names = ("input", "output_split_sizes", "input_split_sizes", "group_name")
    values = dict(zip(names, node.args, strict=False))
    values.update(node.kwargs)
    return ExchangeArgs(*(values[name] for name in names))


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


def _is_empty_like(node: Node) -> bool:
    if node.op != "call_function":
        return False
    return node.target in (torch.empty_like, aten.empty_like.default) and node.kwargs.get(
        "memory_format", torch.preserve_format) in (torch.preserve_format, torch.contiguous_format)


def _is_copy(node: Node) -> bool:
    if node.op == "call_method":
        return node.target == "copy_"
    return node.op == "call_function" and node.target in (aten.copy_.default, torch.Tensor.copy_)


def inplace_fill(buffer: Node) -> Node | None:
    """The `copy_(buffer, wait)` that fills a fresh `empty_like` buffer with a collective's result.

    Dynamo turns `dist.all_to_all_single(out, x)` into a functional all-to-all, a wait and
    `out.copy_(result)`; readers then read `out`. The buffer is an alias of the wait when it is
    fresh, filled once, and read only after the fill.
    """
    if not _is_empty_like(buffer):
        return None
    fills = [u for u in buffer.users if _is_copy(u) and u.args[0] is buffer]
    if len(fills) != 1 or fills[0].users:
        return None
    fill = fills[0]
    source = fill.args[1]
    if not (isinstance(source, Node) and is_wait(source)):
        return None
    order = {n: i for i, n in enumerate(buffer.graph.nodes)}
    if any(order[u] < order[fill] for u in buffer.users if u is not fill):
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
