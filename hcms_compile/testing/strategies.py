"""Hypothesis strategies that draw Ulysses attention cases and chunk specs.

- `ulysses_cases`: world size, batch, heads, tokens, head dim, dtype, causal, layout and a chunk
  split (uneven ones included), over every layout in `layouts.py` (the in-place `dist_inplace`
  included: every front end's form of it is rewritten) or those named by `layouts=`.
- `variant_cases`: the same in the funcol layout, plus KV heads (grouped, or fewer than the ranks),
  how attention sees them (`enable_gqa` or repeated), a mask kind and a scale (`variants.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch.distributed._local_tensor import LocalTensor

from . import ranks
from .layouts import LAYOUTS, Layout
from .variants import KV_STYLES, MASKS, Variant, attn_variant, valid_kv_heads


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
    variant: Variant = Variant()

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

    @property
    def kv_heads(self) -> int:
        return self.variant.kv_heads or self.heads

    def function(self):
        """`f(q, k, v)` (and the mask, for variants with one) running this case's Ulysses attention."""
        group = ranks.group(self.world_size)
        if self.variant.plain:
            return functools.partial(_call, self.spec.fn, group, self.causal)
        if self.layout != "funcol":
            raise ValueError(f"attention variants use the funcol layout, not {self.layout!r}")
        return functools.partial(_call_variant, group, self.causal, self.variant)

    def _shapes(self, world_size: int) -> list[tuple[int, ...]]:
        q = self.spec.local_shape(self.batch, self.seq, self.heads, self.head_dim, world_size)
        kv = (*q[:-2], self.kv_heads, q[-1])  # variants are [B, S/P, H, D]
        return [q, kv if not self.variant.plain else q, kv if not self.variant.plain else q]

    def example_inputs(self) -> list[torch.Tensor]:
        tensors = [torch.zeros(shape, dtype=self.dtype) for shape in self._shapes(self.world_size)]
        mask = self.variant.mask_for(self.local_heads, self.seq)
        return tensors + ([mask.to(self._mask_dtype(mask))] if mask is not None else [])

    def sharded_inputs(self, seed: int = 0) -> list:
        gen = torch.Generator().manual_seed(seed)
        fulls = [torch.randn(shape, generator=gen).to(self.dtype) for shape in self._shapes(1)]
        inputs = [ranks.shard(t, self.spec.seq_dim, self.world_size) for t in fulls]
        if self.variant.mask == "none":
            return inputs
        # a per-head mask differs by rank (each rank holds its own heads'); a shared one does not
        per_head = self.variant.mask.endswith("per-head")
        masks = {r: self.variant.mask_for(self.local_heads, self.seq, seed + r if per_head else seed)
                 for r in range(self.world_size)}
        return inputs + [LocalTensor({r: m.to(self._mask_dtype(m)) for r, m in masks.items()})]

    def _mask_dtype(self, mask: torch.Tensor) -> torch.dtype:
        return torch.bool if mask.dtype == torch.bool else self.dtype


def _call(fn, group, causal, q, k, v):
    return fn(q, k, v, group, is_causal=causal)


def _call_variant(group, causal, variant, q, k, v, mask=None):
    return attn_variant(q, k, v, mask, group, variant=variant, is_causal=causal)


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
    layouts: Sequence[str] = tuple(LAYOUTS),
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


@st.composite
def variant_cases(draw: st.DrawFn, max_world: int = 4, max_local_heads: int = 6,
                  dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16)) -> UlyssesCase:
    """Ulysses cases with GQA/MQA, masks and scales; at least 32 tokens so that the CPU kernel's
    chunked arithmetic is bitwise (see passes/exactness.py) and skips stay the exception."""
    world = draw(st.integers(1, max_world))
    local_heads = draw(st.integers(2, max_local_heads))
    heads = world * local_heads
    # MHA, GQA with whole KV heads per rank, or fewer KV heads than ranks, each when possible
    kinds = [[heads], [kv for kv in valid_kv_heads(heads, world) if world <= kv < heads],
             [kv for kv in valid_kv_heads(heads, world) if kv < world]]
    kv_heads = draw(st.sampled_from(draw(st.sampled_from([kind for kind in kinds if kind]))))
    variant = Variant(kv_heads=kv_heads, kv_style=draw(st.sampled_from(KV_STYLES)),
                      mask=draw(st.sampled_from(MASKS)), scale=draw(st.sampled_from([None, 0.3])))
    tokens = draw(st.sampled_from([8, 16, 32])) * draw(st.sampled_from([1, 2]))
    return UlyssesCase(
        layout="funcol", world_size=world, batch=draw(st.integers(1, 2)), local_heads=local_heads,
        tokens_per_rank=max(tokens, -(-32 // world)), head_dim=draw(st.sampled_from([4, 8])),
        dtype=draw(st.sampled_from(list(dtypes))), causal=draw(st.booleans()), chunks=draw(st.integers(2, 3)),
        variant=variant)
