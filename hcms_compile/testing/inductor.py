"""What Inductor users get: one training step of the real compiled model on N gloo processes.

`assert_equivalent(..., inner="inductor")` runs here. The steps:
1. In this process: pickle the functions or modules to check (several share one spawn: starting
   the processes costs seconds), with every process group of the in-process world
   (`ranks.group(world_size)`) replaced by a reference, and split the per-rank inputs.
2. In each of `world_size` spawned processes joined by gloo (`spawn.spawn_gloo`): run `setup` if
   given, unpickle the functions, the references now naming the gloo world; for each, compile it
   with `torch.compile(backend=make_backend(...,
   inner="inductor"))`, run the forward, then the backward on seeded random cotangents; reset
   Dynamo and do the same under `HCMS_DISABLE` (the same Inductor compile without the pass). The FX
   graph and autograd caches are off, so the pass runs (and reports) on every graph.
3. Each rank saves its outputs, gradients (parameters first, then inputs) and, on rank 0, the
   site reports; this process compares them (`equivalence.py`).

Functions must be picklable: a module-level function, a `functools.partial` of one, or a module;
so must `setup`.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._local_tensor import LocalTensor

from ..backend import GraphReport, make_backend
from ..passes import ChunkSpec
from ..spawn import spawn_gloo
from .compiled import hcms_disabled


@dataclass(frozen=True)
class Job:
    """One function or module to check, with every rank's inputs."""

    fn: Callable[..., Any] | torch.nn.Module
    inputs: Sequence[Any]  # per-rank values (LocalTensor) or values every rank shares
    chunks: ChunkSpec
    exact: bool | str


@dataclass
class RankStep:
    """One rank's training step, compiled through HCMS and without it."""

    outputs: tuple[list[torch.Tensor], list[torch.Tensor]]  # (plain, HCMS)
    grads: tuple[list[torch.Tensor | None], list[torch.Tensor | None]]  # (plain, HCMS)
    graphs: list[GraphReport]  # the HCMS compile's reports (graph modules dropped)


_GROUP = "hcms-in-process-group"


class _GroupPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, world_size: int) -> None:
        super().__init__(file)
        self.world_size = world_size

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, dist.ProcessGroup):
            if obj.size() != self.world_size:
                raise ValueError(f"the function uses a process group of {obj.size()} ranks; inner='inductor' "
                                 f"runs it on a gloo world of world_size={self.world_size}")
            return _GROUP
        return None


class _GroupUnpickler(pickle.Unpickler):
    def persistent_load(self, pid: Any) -> Any:
        if pid != _GROUP:
            raise pickle.UnpicklingError(f"unknown reference {pid!r}")
        return dist.group.WORLD


def _dump(fn: Any, world_size: int) -> bytes:
    buffer = io.BytesIO()
    try:
        _GroupPickler(buffer, world_size).dump(fn)
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        raise ValueError(f"inner='inductor' runs {fn!r} in gloo processes, so it must be picklable (a module-level "
                         f"function, a functools.partial of one, or a module): {err}") from err
    return buffer.getvalue()


def _rank_inputs(inputs: Sequence[Any], world_size: int) -> list[list[Any]]:
    return [[x._local_tensors[r] if isinstance(x, LocalTensor) else x for x in inputs] for r in range(world_size)]


def run_inductor_steps(jobs: Sequence[Job], world_size: int, seed: int,
                       setup: Callable[[], Any] | None = None) -> list[list[RankStep]]:
    """For each job, every rank's `RankStep` (steps 1 to 3 of the module docstring)."""
    payload = _dump([job.fn for job in jobs], world_size)
    inputs = [_rank_inputs(job.inputs, world_size) for job in jobs]
    options = [(job.chunks, job.exact) for job in jobs]
    with tempfile.TemporaryDirectory() as out_dir:
        spawn_gloo(_rank_main, world_size, payload, inputs, options, seed, setup, out_dir)
        return [[torch.load(os.path.join(out_dir, f"job{j}-rank{r}.pt"), weights_only=False)
                 for r in range(world_size)] for j in range(len(jobs))]


def _rank_main(rank: int, payload: bytes, inputs: list[list[list[Any]]], options: list[tuple[ChunkSpec, Any]],
               seed: int, setup: Callable[[], Any] | None, out_dir: str) -> None:
    if setup is not None:
        setup()
    fns = _GroupUnpickler(io.BytesIO(payload)).load()
    # one compile worker: the ranks share this machine's cores
    with torch._inductor.config.patch(fx_graph_cache=False, compile_threads=1), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        for j, (fn, (chunks, exact)) in enumerate(zip(fns, options, strict=True)):
            mine = inputs[j][rank]
            backend = make_backend(chunks=chunks, inner="inductor", exact=exact)
            out_h, grads_h = _train_step(fn, mine, backend, seed + rank)
            with hcms_disabled():
                out_p, grads_p = _train_step(fn, mine, backend, seed + rank)
            graphs = [GraphReport(r.phase, r.sites, None, r.cached, split=r.split) for r in backend.reports] \
                if rank == 0 else []
            torch.save(RankStep((out_p, out_h), (grads_p, grads_h), graphs),
                       os.path.join(out_dir, f"job{j}-rank{rank}.pt"))


def _train_step(fn: Any, inputs: list[Any], backend: Any, seed: int) -> tuple[list[torch.Tensor], list[Any]]:
    torch._dynamo.reset()  # the second compile must not reuse the first one's code
    params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    for p in params:
        p.grad = None
    xs = [x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
          for x in inputs]
    out = torch.compile(fn, backend=backend, fullgraph=True)(*xs)
    outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    gen = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(tuple(o.shape), generator=gen).to(o.dtype) for o in outs]
    differentiable = [(o, c) for o, c in zip(outs, cotangents, strict=True) if o.requires_grad]
    if differentiable:
        torch.autograd.backward([o for o, _ in differentiable], [c for _, c in differentiable])
    grads = [p.grad for p in params] + [x.grad if isinstance(x, torch.Tensor) else None for x in xs]
    return [o.detach() for o in outs], grads
