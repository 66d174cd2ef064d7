"""Compile a function with a backend in the fake world, then run its graphs on real ranks.

`torch.compile` cannot run under LocalTensorMode, so the compiled graphs are captured (the
`aot_eager` backends keep them) and executed directly: the forward graph on sharded primals, then
the backward graph on the saved tensors and the cotangents, exactly as AOTAutograd would.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule

from ..backend import GraphReport, HcmsBackend
from . import ranks


@dataclass
class CompiledGraphs:
    forward: GraphReport
    backward: GraphReport | None

    @property
    def saved_count(self) -> int:
        assert self.backward is not None and self.backward.graph_module is not None
        return sum(1 for n in self.backward.graph_module.graph.nodes
                   if n.op == "placeholder" and not n.name.startswith("tangents"))


def compile_graphs(fn: Callable[..., Any], example_inputs: Sequence[torch.Tensor], backend: HcmsBackend,
                   train: bool = True) -> CompiledGraphs:
    """Compile `fn` with an aot_eager `backend` and return the forward (and backward) graphs."""
    if backend.inner != "aot_eager":
        raise ValueError("graphs can be captured only from an aot_eager backend")
    before = len(backend.reports)
    torch._dynamo.reset()
    inputs = [t.detach().clone().requires_grad_(train and t.is_floating_point()) for t in example_inputs]
    out = torch.compile(functools.partial(_inputs_in_order, fn), backend=backend, fullgraph=True)(*inputs)
    if train:
        torch.autograd.backward(out, [torch.ones_like(o) for o in _leaves(out)])
    reports = backend.reports[before:]
    forward = next(r for r in reports if r.phase in ("forward", "inference"))
    backward = next((r for r in reports if r.phase == "backward"), None)
    return CompiledGraphs(forward, backward)


def _inputs_in_order(fn: Callable[..., Any], *args: Any) -> Any:
    # Dynamo numbers graph inputs in the order the code first uses them; touch them all first so
    # that the captured graphs take them in argument order, as `run_training_step` passes them
    for arg in args:
        arg.shape  # noqa: B018
    return fn(*args)


@contextlib.contextmanager
def hcms_disabled() -> Iterator[None]:
    """`HCMS_DISABLE=1` for the duration: the same backend then compiles without the pass."""
    previous = os.environ.get("HCMS_DISABLE")
    os.environ["HCMS_DISABLE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["HCMS_DISABLE"]
        else:
            os.environ["HCMS_DISABLE"] = previous


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def run_training_step(graphs: CompiledGraphs, inputs: Sequence[Any], cotangents: Sequence[Any],
                      world_size: int) -> tuple[list[Any], list[Any]]:
    """Outputs and input gradients of every rank: the forward graph, then the backward graph."""
    forward: GraphModule = graphs.forward.graph_module
    backward: GraphModule = graphs.backward.graph_module
    n_saved = graphs.saved_count

    def step(*args: Any) -> tuple[Any, Any]:
        primals, tangents = args[: len(inputs)], args[len(inputs):]
        results = list(forward(*primals))
        outs, saved = results[: len(results) - n_saved], results[len(results) - n_saved:]
        # AOTAutograd hands the backward cotangents laid out like the outputs; so do we
        tangents = [torch.empty_like(o).copy_(t) for o, t in zip(outs, tangents, strict=True)]
        grads = backward(*saved, *tangents)
        return outs, list(grads)

    per_rank = ranks.run_on_ranks(step, [*inputs, *cotangents], world_size)
    return [r[0] for r in per_rank], [r[1] for r in per_rank]
