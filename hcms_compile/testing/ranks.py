"""Run code on N ranks inside one process, with real per-rank data.

A fake process group provides group names that traced graphs can carry; `LocalTensorMode` then
executes every op once per rank and performs collectives across the ranks' tensors, so a graph's
all-to-alls move real data without threads or processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._local_tensor import LocalTensor, LocalTensorMode

MAX_RANKS = 8
_groups: dict[int, dist.ProcessGroup] = {}


def fake_world(max_ranks: int = MAX_RANKS) -> None:
    """Initialise a fake default process group of `max_ranks` ranks, once per process."""
    if dist.is_initialized():
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=max_ranks)


def group(world_size: int) -> dist.ProcessGroup:
    """A process group of ranks 0..world_size-1 in the fake world (cached)."""
    fake_world()
    if not 1 <= world_size <= dist.get_world_size():
        raise ValueError(f"world size {world_size} is outside 1..{dist.get_world_size()}")
    if world_size not in _groups:
        _groups[world_size] = dist.new_group(list(range(world_size)))
    return _groups[world_size]


def shard(full: torch.Tensor, dim: int, world_size: int) -> LocalTensor:
    """Rank r holds the r-th of `world_size` equal slices of `full` along `dim`."""
    if full.shape[dim] % world_size:
        raise ValueError(f"dim {dim} of size {full.shape[dim]} does not split over {world_size} ranks")
    pieces = full.chunk(world_size, dim=dim)
    return LocalTensor({r: pieces[r].contiguous() for r in range(world_size)})


def replicate(value: torch.Tensor, world_size: int) -> LocalTensor:
    return LocalTensor({r: value.clone() for r in range(world_size)})


def per_rank(value: Any, world_size: int) -> list[Any]:
    """The value each rank holds: one entry per rank, outputs flattened through pytrees."""
    leaves, spec = torch.utils._pytree.tree_flatten(value)
    ranks = []
    for r in range(world_size):
        mine = [leaf._local_tensors[r] if isinstance(leaf, LocalTensor) else leaf for leaf in leaves]
        ranks.append(torch.utils._pytree.tree_unflatten(mine, spec))
    return ranks


def run_on_ranks(fn: Callable[..., Any], inputs: Sequence[Any], world_size: int) -> list[Any]:
    """`fn(*inputs)` on every rank at once; returns what each rank computed."""
    with LocalTensorMode(world_size):
        out = fn(*inputs)
    return per_rank(out, world_size)
