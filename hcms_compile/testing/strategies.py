"""Hypothesis strategies that draw Ulysses attention cases and chunk specs."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from . import ranks
from .layouts import LAYOUTS, Layout

FUNCTIONAL_LAYOUTS = tuple(name for name, lay in LAYOUTS.items() if lay.functional)


@dataclass(frozen=True)
class UlyssesCase:
    """One Ulysses attention problem: global sizes, its sharding over P ranks, and a chunk spec."""

    layout: str
    world_size: int
    batch: int
    local_heads: int
    tokens_per_rank: int
    head_dim: int
    dtype: torch.dtype
    causal: bool
    chunks: int | tuple[int, ...]

    @property
    def heads(self) -> int:
        return self.world_size * self.local_heads

    @property
    def seq(self) -> int:
        return self.world_size * self.tokens_per_rank

    @property
    def spec(self) -> Layout:
        return LAYOUTS[self.layout]

    @property
    def chunk_count(self) -> int:
        return self.chunks if isinstance(self.chunks, int) else len(self.chunks)

    def local_shape(self) -> tuple[int, ...]:
        return self.spec.local_shape(self.batch, self.seq, self.heads, self.head_dim, self.world_size)

    def global_shape(self) -> tuple[int, ...]:
        return self.spec.local_shape(self.batch, self.seq, self.heads, self.head_dim, 1)

    def function(self):
        """`f(q, k, v)` running this layout's Ulysses attention on the case's process group."""
        return functools.partial(_call, self.spec.fn, ranks.group(self.world_size), self.causal)

    def example_inputs(self) -> list[torch.Tensor]:
        return [torch.zeros(self.local_shape(), dtype=self.dtype) for _ in range(3)]

    def sharded_inputs(self, seed: int = 0) -> list:
        gen = torch.Generator().manual_seed(seed)
        fulls = [torch.randn(self.global_shape(), generator=gen).to(self.dtype) for _ in range(3)]
        return [ranks.shard(t, self.spec.seq_dim, self.world_size) for t in fulls]


def _call(fn, group, causal, q, k, v):
    return fn(q, k, v, group, is_causal=causal)


@st.composite
def compositions(draw: st.DrawFn, total: int, min_parts: int = 1) -> tuple[int, ...]:
    """An ordered split of `total` into positive parts (uneven splits included)."""
    parts = draw(st.integers(min(min_parts, total), total))
    cuts = sorted(draw(st.lists(st.integers(1, total - 1), min_size=parts - 1, max_size=parts - 1,
                                unique=True))) if parts > 1 and total > 1 else []
    bounds = [0, *cuts, total]
    return tuple(b - a for a, b in zip(bounds, bounds[1:], strict=False))


def chunk_specs(local_heads: int, min_chunks: int = 2) -> st.SearchStrategy[int | tuple[int, ...]]:
    """A chunk count or explicit local-head counts summing to local_heads; at least `min_chunks`
    chunks where the heads allow it."""
    low = min(min_chunks, local_heads)
    return st.one_of(st.integers(low, local_heads), compositions(local_heads, low))


@st.composite
def ulysses_cases(
    draw: st.DrawFn,
    layouts: Sequence[str] = FUNCTIONAL_LAYOUTS,
    max_world: int = ranks.MAX_RANKS,
    max_local_heads: int = 8,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
    min_chunks: int = 2,
    min_local_heads: int = 1,
) -> UlyssesCase:
    local_heads = draw(st.integers(min_local_heads, max_local_heads))
    return UlyssesCase(
        layout=draw(st.sampled_from(list(layouts))),
        world_size=draw(st.integers(1, max_world)),
        batch=draw(st.integers(1, 2)),
        local_heads=local_heads,
        tokens_per_rank=draw(st.sampled_from([1, 2, 3, 4, 8, 16])),
        head_dim=draw(st.sampled_from([2, 4, 8])),  # D=1 makes ATen fall back to decomposed math
        dtype=draw(st.sampled_from(list(dtypes))),
        causal=draw(st.booleans()),
        chunks=draw(chunk_specs(local_heads, min_chunks)),
    )
