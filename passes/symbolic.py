"""Sizes that may be symbolic: decisions without guards, hints, and value ranges.

Terms
- size: an `int`, or a `torch.SymInt` of the graph's shape environment (a sequence length that
  Dynamo made dynamic, say). A SymInt whose expression is a number is turned into an `int`.
- known: a condition the shape environment proves for every value the compiled artifact may see
  (`statically_known_true`). Asking never adds a guard: evaluating `bool(symint == n)` would, and
  would specialise the artifact behind the user's back. A condition that is not known is treated as
  possibly false, so every decision here errs towards "cannot prove".
- hint: the value a symbolic size had in the example that triggered the compile. Only the cost model
  reads hints; nothing that decides correctness does.
- range: the lowest and highest value the shape environment allows a size (Dynamo's dynamic dims
  start at 2; `torch._dynamo.mark_dynamic(x, dim, min=..., max=...)` narrows them).
- size query: a node that reads a tensor's size and nothing else (`aten.sym_size.int`, `x.size(d)`);
  make_fx and export graphs compute their symbolic sizes so. It is not a use of the tensor's values:
  the matcher ignores it, and the rewrite recomputes it from tensors outside the site.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import sympy
import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

Size = int | torch.SymInt

# the prefix of every skip reason that dynamic shapes cause; such skips are also logged as a warning
SYMBOLIC = "symbolic shapes: "


def size(value: Any) -> Size:
    """`value` as an int where it is one (a SymInt of a constant expression too)."""
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        return int(expr) if expr.is_number else value
    return int(value)


def is_symbolic(value: Any) -> bool:
    return isinstance(value, torch.SymInt) and not value.node.expr.is_number


def expr(value: Size) -> sympy.Expr:
    return value.node.expr if isinstance(value, torch.SymInt) else sympy.Integer(value)


def known(condition: Any) -> bool:
    """Whether `condition` (a bool or a SymBool) holds for every value of its symbols; no guard."""
    if isinstance(condition, bool):
        return condition
    return bool(statically_known_true(condition))


def same(a: Size, b: Size) -> bool:
    return a is b or known(a == b)


def divides(d: Size, n: Size) -> bool:
    """Whether `d` divides `n` for every value of the symbols."""
    if isinstance(d, int) and isinstance(n, int):
        return d != 0 and n % d == 0
    return known(n % d == 0)


def hint(value: Size) -> int:
    """The example's value of a size (never a guard)."""
    if isinstance(value, torch.SymInt):
        expr_ = value.node.expr
        if expr_.is_number:
            return int(expr_)
        h = value.node.hint
        if h is None:
            h = value.node.shape_env.size_hint(expr_, allow_none=True)
        if h is None:
            raise ValueError(f"symbolic size {expr_} has no example value (an unbacked size)")
        return int(h)
    return int(value)


def hints(shape: Sequence[Size]) -> tuple[int, ...]:
    return tuple(hint(s) for s in shape)


def value_range(value: Size) -> tuple[int, float]:
    """(lowest, highest) value the shape environment allows; highest may be `math.inf`."""
    if not is_symbolic(value):
        return int(value), int(value)
    bounds = value.node.shape_env.bound_sympy(value.node.expr)
    upper = bounds.upper
    return int(bounds.lower), (int(upper) if isinstance(upper, sympy.Integer) else math.inf)


def free_symbols(values: Sequence[Any]) -> set[sympy.Symbol]:
    out: set[sympy.Symbol] = set()
    for value in values:
        if is_symbolic(value):
            out |= value.node.expr.free_symbols
    return out


def shape_env(values: Sequence[Any]) -> Any:
    return next((v.node.shape_env for v in values if is_symbolic(v)), None)


def known_contiguous(value: torch.Tensor) -> bool:
    """Whether a (fake) tensor is contiguous for every value of its symbolic sizes; no guard."""
    shape, strides = [size(s) for s in value.shape], [size(s) for s in value.stride()]
    if not any(is_symbolic(s) for s in (*shape, *strides)):
        return bool(value.is_contiguous())
    expected: Size = 1
    for dim, stride in zip(reversed(shape), reversed(strides), strict=True):
        if not (same(dim, 1) or same(stride, expected)):
            return False
        expected = expected * dim
    return True


# looked up by name: an op a torch build lacks is simply not a size query there
_SIZE_QUERIES = {getattr(getattr(torch.ops.aten, name, None), overload, None)
                 for name, overload in (("sym_size", "int"), ("sym_numel", "default"), ("sym_stride", "int"),
                                        ("sym_storage_offset", "default"))} - {None}
_SIZE_METHODS = {"size", "stride", "numel", "dim", "storage_offset"}


def is_size_query(node: Node) -> bool:
    """Whether `node` only reads its tensor argument's size (see the module docstring)."""
    if node.op == "call_method":
        return str(node.target) in _SIZE_METHODS
    return node.op == "call_function" and node.target in _SIZE_QUERIES
