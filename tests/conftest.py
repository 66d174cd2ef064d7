"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

FAKE_WORLD_SIZE = 8


@pytest.fixture(scope="session")
def fake_group() -> Callable[[int], dist.ProcessGroup]:
    """Init a fake world of 8 once per session; return P -> cached group of ranks 0..P-1.

    Pair it with ``torch.distributed._local_tensor.LocalTensorMode(P)`` for real per-rank data.
    """
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=FAKE_WORLD_SIZE)
    groups: dict[int, dist.ProcessGroup] = {}

    def get(p: int) -> dist.ProcessGroup:
        if p not in groups:
            groups[p] = dist.new_group(list(range(p)))
        return groups[p]

    return get
