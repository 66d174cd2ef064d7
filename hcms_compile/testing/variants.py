"""Ulysses attention in the variants real models use: fewer KV heads, masks, a scale.

`attn_variant(q, k, v, mask, group, variant=..., is_causal=...)` takes this rank's S/P tokens in the
funcol layout ([B, S/P, H, D] for q; [B, S/P, H_kv, D] for k and v) and returns [B, S/P, H, D]:
- KV heads: when H_kv is a multiple of P each rank receives H_kv/P KV heads; when H_kv < P every
  KV head is first repeated P/H_kv times (as DeepSpeed does) so that each rank receives one.
  The attention then sees fewer KV heads through `enable_gqa=True`, or repeats them itself after
  the exchange (`kv_style="repeat"`, as Llama's repeat_kv does).
- masks: "bool" and "additive" are [S, S] and shared by every head; "bool-per-head" and
  "additive-per-head" are [1, H/P, S, S], this rank's heads, passed in as `mask`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .layouts import _funcol_in, _funcol_out

MASKS = ("none", "bool", "additive", "bool-per-head", "additive-per-head")
KV_STYLES = ("enable_gqa", "repeat")


@dataclass(frozen=True)
class Variant:
    kv_heads: int | None = None  # global KV heads; None: as many as query heads
    kv_style: str = "enable_gqa"
    mask: str = "none"
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {self.mask!r}")
        if self.kv_style not in KV_STYLES:
            raise ValueError(f"kv_style must be one of {KV_STYLES}, got {self.kv_style!r}")

    @property
    def plain(self) -> bool:
        return self == Variant()

    def mask_for(self, local_heads: int, seq: int, seed: int = 0) -> Tensor | None:
        """This rank's mask for `local_heads` heads (rank-independent when shared by every head)."""
        if self.mask == "none":
            return None
        gen = torch.Generator().manual_seed(seed)
        heads = local_heads if self.mask.endswith("per-head") else 1
        keep = torch.rand(heads, seq, seq, generator=gen) < 0.7
        keep |= torch.eye(seq, dtype=torch.bool)  # no row masked out entirely (that would be NaN)
        if self.mask.startswith("bool"):
            mask = keep
        else:
            mask = torch.where(keep, torch.randn(heads, seq, seq, generator=gen), torch.tensor(-1e4))
        return mask[0] if heads == 1 else mask.unsqueeze(0)


def valid_kv_heads(heads: int, world_size: int) -> list[int]:
    """KV head counts a Ulysses model can use with `heads` query heads over `world_size` ranks."""
    return [kv for kv in range(1, heads + 1) if heads % kv == 0
            and (kv % world_size == 0 or world_size % kv == 0)]


def _replicate_kv(x: Tensor, world_size: int) -> Tensor:
    b, s, kv, d = x.shape
    if kv >= world_size:
        return x
    return x[:, :, :, None].expand(b, s, kv, world_size // kv, d).reshape(b, s, world_size, d)


def _repeat_kv(x: Tensor, n: int) -> Tensor:
    if n == 1:
        return x
    b, kv, s, d = x.shape
    return x[:, :, None].expand(b, kv, n, s, d).reshape(b, kv * n, s, d)


def attn_variant(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, group: dist.ProcessGroup, *,
                 variant: Variant, is_causal: bool = False) -> Tensor:
    p = group.size()
    k, v = (_funcol_in(_replicate_kv(x, p), group) for x in (k, v))
    q = _funcol_in(q, group)
    gqa = k.shape[1] != q.shape[1]
    if gqa and variant.kv_style == "repeat":
        k, v = (_repeat_kv(x, q.shape[1] // x.shape[1]) for x in (k, v))
        gqa = False
    mask = None if mask is None else mask.detach()
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                       scale=variant.scale, enable_gqa=gqa)
    return _funcol_out(o, group)
