"""Trace a function into the FX graphs HCMS must handle, the way each PyTorch front end does."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx import GraphModule

TRACERS = ("make_fx", "make_fx_real", "export", "dynamo", "aot")


def trace(fn: Callable[..., Any], example_inputs: Sequence[torch.Tensor], tracer: str = "make_fx") -> GraphModule:
    """One GraphModule of `fn` as produced by `tracer` (see `TRACERS`).

    - make_fx: an ATen graph traced with fake tensors.
    - make_fx_real: the same traced with `example_inputs` themselves (make_fx's default mode), which
      records each node's value under a fake mode of its own. The functions' collectives run on the
      fake process group (`ranks.group`), which gives outputs of the right shape on one rank.
    - export: `torch.export.export(...).module()`.
    - dynamo: the torch-level graph Dynamo hands a backend (call_method nodes, OpOverloadPackets).
    - aot: the forward graph AOTAutograd hands its compiler (inference, no grad).
    """
    inputs = tuple(example_inputs)
    if tracer == "make_fx":
        from torch.fx.experimental.proxy_tensor import make_fx

        return make_fx(fn, tracing_mode="fake")(*inputs)
    if tracer == "make_fx_real":
        from torch.fx.experimental.proxy_tensor import make_fx

        return make_fx(fn)(*inputs)
    if tracer == "export":
        return torch.export.export(_Wrap(fn), inputs, strict=False).module()
    if tracer == "dynamo":
        return _capture(fn, inputs, aot=False)
    if tracer == "aot":
        return _capture(fn, inputs, aot=True)
    raise ValueError(f"unknown tracer {tracer!r}; choose from {TRACERS}")


class _Wrap(torch.nn.Module):
    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> Any:
        return self.fn(*args)


def _capture(fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], aot: bool) -> GraphModule:
    graphs: list[GraphModule] = []

    def keep(gm: GraphModule, _example: Any) -> Callable[..., Any]:
        graphs.append(gm)
        return gm.forward

    backend: Any = keep
    if aot:
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def keep_boxed(gm: GraphModule, example: Any) -> Callable[..., Any]:
            keep(gm, example)
            return make_boxed_func(gm.forward)

        backend = aot_autograd(fw_compiler=keep_boxed, bw_compiler=keep_boxed)
    torch._dynamo.reset()  # a fresh cache: shapes of earlier captures must not hit the recompile limit
    with torch.no_grad():
        torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    if len(graphs) != 1:
        raise RuntimeError(f"expected one graph from the {'aot' if aot else 'dynamo'} capture, got {len(graphs)}")
    return graphs[0]
