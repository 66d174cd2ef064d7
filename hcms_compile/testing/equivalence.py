"""`assert_equivalent`: prove on your own code that HCMS did not change a bit.

Runs a function or module on N ranks in one process, compiled once by AOTAutograd alone and once
through HCMS, for one forward and backward step, and asserts that every output and every gradient
(of the inputs and of the module's parameters) is `torch.equal` on every rank. A mismatch names the
rank, the tensor, the position (with your dimension names) and both values.

    from hcms_compile.testing import assert_equivalent, ranks

    group = ranks.group(4)
    model = MyUlyssesBlock(group)                       # built on the in-process group
    x = ranks.shard(torch.randn(2, 1024, 512), dim=1, world_size=4)
    assert_equivalent(model, [x], world_size=4, chunks=(2, 1), dim_names=("batch", "token", "hidden"))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed._local_tensor import LocalTensor

from ..backend import GraphReport, make_backend
from ..passes import ChunkSpec
from ..report import SiteReport
from . import ranks
from .compiled import compile_graphs, hcms_disabled, run_training_step


@dataclass
class Equivalence:
    """What `assert_equivalent` compared."""

    graphs: list[GraphReport] = field(default_factory=list)
    compared: int = 0  # tensors compared, summed over ranks

    @property
    def sites(self) -> list[SiteReport]:
        return [site for graph in self.graphs for site in graph.sites]

    @property
    def rewritten(self) -> list[SiteReport]:
        return [site for site in self.sites if site.rewritten]


def _flat_call(fn: Callable[..., Any], names: list[str]) -> Callable[..., Any]:
    """`fn` with its parameters as leading positional inputs, so they get gradients too."""
    if not names:
        return fn

    def call(*flat: torch.Tensor) -> Any:
        params = dict(zip(names, flat[: len(names)], strict=True))
        return torch.func.functional_call(fn, params, tuple(flat[len(names):]))

    return call


def _rank0(value: Any) -> torch.Tensor:
    return value._local_tensors[0] if isinstance(value, LocalTensor) else value


def _where(index: tuple[int, ...], dim_names: Sequence[str] | None) -> str:
    if dim_names and len(dim_names) == len(index):
        return ", ".join(f"{name} {i}" for name, i in zip(dim_names, index, strict=True))
    return f"index {index}"


def _compare(label: str, rank: int, want: torch.Tensor, got: torch.Tensor, dim_names: Sequence[str] | None) -> None:
    if want.shape != got.shape or want.dtype != got.dtype:
        raise AssertionError(f"rank {rank}, {label}: HCMS gives {tuple(got.shape)} {got.dtype}, "
                             f"plain gives {tuple(want.shape)} {want.dtype}")
    if torch.equal(want, got):
        return
    differ = want.ne(got) & ~(want.isnan() & got.isnan())
    first = tuple(int(i) for i in differ.nonzero()[0])
    raise AssertionError(
        f"rank {rank}, {label}: {int(differ.sum())} of {want.numel()} elements differ; first at "
        f"{_where(first, dim_names)}: plain {want[first].item()!r} vs HCMS {got[first].item()!r}")


def assert_equivalent(fn: Callable[..., Any], inputs: Sequence[Any], *, world_size: int, chunks: ChunkSpec = 2,
                      exact: bool | str = True, dim_names: Sequence[str] | None = None,
                      require_rewrite: bool = True, seed: int = 0) -> Equivalence:
    """Assert that HCMS leaves `fn`'s outputs and gradients bitwise unchanged on every rank.

    `inputs` are per-rank values (`ranks.shard`, `ranks.replicate`); `fn` must use process groups
    of the in-process world (`ranks.group(world_size)`). With `require_rewrite=True` a run in which
    no site was rewritten fails, so the check cannot pass vacuously.
    """
    names = [n for n, _ in fn.named_parameters()] if isinstance(fn, torch.nn.Module) else []
    params = [p.detach() for _, p in fn.named_parameters()] if names else []
    call = _flat_call(fn, names)
    flat_inputs = [ranks.replicate(p, world_size) for p in params] + list(inputs)
    examples = [_rank0(x) for x in flat_inputs]

    hcms = compile_graphs(call, examples, make_backend(chunks=chunks, inner="aot_eager", exact=exact))
    with hcms_disabled():
        plain = compile_graphs(call, examples, make_backend(chunks=chunks, inner="aot_eager"))
    result = Equivalence([hcms.forward, hcms.backward])
    if require_rewrite and not result.rewritten:
        reasons = "; ".join(f"{s.attention}: {s.reason}" for s in result.sites) or "no attention op found"
        raise AssertionError(f"HCMS rewrote no site, so there is nothing to compare ({reasons})")

    gen = torch.Generator().manual_seed(seed)
    graph = plain.forward.graph_module.graph
    returned = next(n for n in reversed(graph.nodes) if n.op == "output").args[0]
    n_out = len(returned) - plain.saved_count
    cotangents = []
    for node in returned[:n_out]:
        val = node.meta["val"]
        cotangents.append(LocalTensor({r: torch.randn(tuple(val.shape), generator=gen).to(val.dtype)
                                       for r in range(world_size)}))
    outs_p, grads_p = run_training_step(plain, flat_inputs, cotangents, world_size)
    outs_h, grads_h = run_training_step(hcms, flat_inputs, cotangents, world_size)
    labels = [f"output {i}" for i in range(n_out)]
    grad_labels = [f"gradient of {name}" for name in names] + [f"gradient of input {i}" for i in range(len(inputs))]
    for rank in range(world_size):
        for label, want, got in zip(labels, outs_p[rank], outs_h[rank], strict=True):
            _compare(label, rank, want, got, dim_names)
        for label, want, got in zip(grad_labels, grads_p[rank], grads_h[rank], strict=True):
            if want is None and got is None:
                continue
            _compare(label, rank, want, got, dim_names if label.startswith("gradient of input") else None)
            result.compared += 1
        result.compared += n_out
    return result
