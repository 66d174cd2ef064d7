"""`assert_equivalent`: prove on your own code that HCMS did not change a bit.

Runs a function or module on N ranks, compiled once without HCMS and once through it, for one
forward and backward step, and asserts that every output and every gradient (of the inputs and of
the module's parameters) is `torch.equal` on every rank. A mismatch names the rank, the tensor, the
position (with your dimension names) and both values. Two ways to run it (`inner=`):

- "aot_eager" (default): the graphs AOTAutograd hands the backend, run on N ranks inside this
  process (LocalTensorMode over the fake process group); fast, for property tests.
- "inductor": what Inductor users get. The real Inductor-compiled model, forward and backward, on
  N gloo processes, against the same Inductor compile without HCMS (`HCMS_DISABLE`); see
  `inductor.py`. Each call spawns N processes and compiles four graphs per rank: seconds to minutes.

    from hcms_compile.testing import assert_equivalent, ranks

    group = ranks.group(4)
    model = MyUlyssesBlock(group)                       # built on the in-process group
    x = ranks.shard(torch.randn(2, 1024, 512), dim=1, world_size=4)
    assert_equivalent(model, [x], world_size=4, chunks=(2, 1), dim_names=("batch", "token", "hidden"))
    assert_equivalent(model, [x], world_size=4, chunks=(2, 1), inner="inductor")
"""

from __future__ import annotations

import functools
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
from .inductor import Job, RankStep, run_inductor_steps

INNERS = ("aot_eager", "inductor")


@dataclass(frozen=True)
class Check:
    """One call of `assert_equivalent`, for `assert_equivalent_all`."""

    fn: Callable[..., Any]
    inputs: Sequence[Any]
    chunks: ChunkSpec = 2
    exact: bool | str = True
    dim_names: Sequence[str] | None = None
    require_rewrite: bool = True


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


def _require_rewrite(result: Equivalence) -> None:
    if not result.rewritten:
        reasons = "; ".join(f"{s.attention}: {s.reason}" for s in result.sites) or "no attention op found"
        raise AssertionError(f"HCMS rewrote no site, so there is nothing to compare ({reasons})")


def assert_equivalent(fn: Callable[..., Any], inputs: Sequence[Any], *, world_size: int, chunks: ChunkSpec = 2,
                      exact: bool | str = True, dim_names: Sequence[str] | None = None,
                      require_rewrite: bool = True, seed: int = 0, inner: str = "aot_eager",
                      setup: Callable[[], Any] | None = None) -> Equivalence:
    """Assert that HCMS leaves `fn`'s outputs and gradients bitwise unchanged on every rank.

    `inputs` are per-rank values (`ranks.shard`, `ranks.replicate`); `fn` must use process groups
    of the in-process world (`ranks.group(world_size)`). With `require_rewrite=True` a run in which
    no site was rewritten fails, so the check cannot pass vacuously. `inner="inductor"` checks the
    real Inductor-compiled step on `world_size` gloo processes instead (see the module docstring):
    `fn` must then be picklable, its groups become the gloo world, and `setup` (picklable too) runs
    in each process before compiling (to import or register what the model needs).
    """
    check = Check(fn, inputs, chunks, exact, dim_names, require_rewrite)
    return assert_equivalent_all([check], world_size=world_size, seed=seed, inner=inner, setup=setup)[0]


def assert_equivalent_all(checks: Sequence[Check], *, world_size: int, seed: int = 0, inner: str = "aot_eager",
                          setup: Callable[[], Any] | None = None) -> list[Equivalence]:
    """`assert_equivalent` of several functions; under `inner="inductor"` they share one spawn of the
    gloo processes (starting them and importing torch costs seconds). A failure names its check."""
    if inner not in INNERS:
        raise ValueError(f"inner={inner!r}: choose from {INNERS}")
    if inner == "aot_eager":
        if setup is not None:
            raise ValueError("setup= runs in the gloo processes of inner='inductor'; in-process checks share this "
                             "process's state: set it up before calling")
        runs = [functools.partial(_in_process, c, world_size, seed) for c in checks]
    else:
        steps = run_inductor_steps([Job(c.fn, c.inputs, c.chunks, c.exact) for c in checks], world_size, seed, setup)
        runs = [functools.partial(_compare_steps, c, s) for c, s in zip(checks, steps, strict=True)]
    return [_named(i, len(checks), run) for i, run in enumerate(runs)]


def _named(index: int, count: int, run: Callable[[], Equivalence]) -> Equivalence:
    if count == 1:
        return run()
    try:
        return run()
    except AssertionError as err:
        raise AssertionError(f"check {index}: {err}") from None


def _grad_labels(fn: Any, inputs: Sequence[Any]) -> list[str]:
    names = [n for n, _ in fn.named_parameters()] if isinstance(fn, torch.nn.Module) else []
    return [f"gradient of {name}" for name in names] + [f"gradient of input {i}" for i in range(len(inputs))]


def _compare_steps(check: Check, steps: list[RankStep]) -> Equivalence:
    result = Equivalence(steps[0].graphs)
    if check.require_rewrite:
        _require_rewrite(result)
    labels = _grad_labels(check.fn, check.inputs)
    for rank, step in enumerate(steps):
        result.compared += _compare_rank(rank, step.outputs, step.grads, labels, check.dim_names)
    return result


def _in_process(check: Check, world_size: int, seed: int) -> Equivalence:
    fn, inputs, chunks, exact, dim_names = check.fn, check.inputs, check.chunks, check.exact, check.dim_names
    names = [n for n, _ in fn.named_parameters()] if isinstance(fn, torch.nn.Module) else []
    grad_labels = _grad_labels(fn, inputs)
    params = [p.detach() for _, p in fn.named_parameters()] if names else []
    call = _flat_call(fn, names)
    flat_inputs = [ranks.replicate(p, world_size) for p in params] + list(inputs)
    examples = [_rank0(x) for x in flat_inputs]

    hcms = compile_graphs(call, examples, make_backend(chunks=chunks, inner="aot_eager", exact=exact))
    with hcms_disabled():
        plain = compile_graphs(call, examples, make_backend(chunks=chunks, inner="aot_eager"))
    result = Equivalence([hcms.forward, hcms.backward])
    if check.require_rewrite:
        _require_rewrite(result)

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
    for rank in range(world_size):
        result.compared += _compare_rank(rank, (outs_p[rank], outs_h[rank]), (grads_p[rank], grads_h[rank]),
                                         grad_labels, dim_names)
    return result


def _compare_rank(rank: int, outputs: tuple[Sequence[Any], Sequence[Any]], grads: tuple[Sequence[Any], Sequence[Any]],
                  grad_labels: list[str], dim_names: Sequence[str] | None) -> int:
    """Compare one rank's (plain, HCMS) outputs and gradients; the number of tensors compared."""
    (outs_p, outs_h), (grads_p, grads_h) = outputs, grads
    if len(outs_p) != len(outs_h):
        raise AssertionError(f"rank {rank}: HCMS gives {len(outs_h)} outputs, plain gives {len(outs_p)}")
    compared = 0
    for i, (want, got) in enumerate(zip(outs_p, outs_h, strict=True)):
        _compare(f"output {i}", rank, want, got, dim_names)
        compared += 1
    for label, want, got in zip(grad_labels, grads_p, grads_h, strict=True):
        if want is None and got is None:
            continue
        if want is None or got is None:
            raise AssertionError(f"rank {rank}, {label}: {'plain' if want is None else 'HCMS'} gives none")
        _compare(label, rank, want, got, dim_names if label.startswith("gradient of input") else None)
        compared += 1
    return compared
