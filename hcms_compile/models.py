"""A small Ulysses transformer: the model the demo (and later the benchmarks) compile."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor, nn

from .testing.layouts import LAYOUTS


@dataclass(frozen=True)
class UlyssesConfig:
    heads: int = 12
    head_dim: int = 32
    blocks: int = 4
    mlp_ratio: int = 2
    layout: str = "funcol"  # any functional entry of hcms_compile.testing.layouts.LAYOUTS
    causal: bool = False

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


class UlyssesBlock(nn.Module):
    """Pre-norm transformer block whose attention runs Ulysses sequence parallelism over `group`."""

    def __init__(self, cfg: UlyssesConfig, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.cfg, self.group = cfg, group
        self.norm1 = nn.LayerNorm(cfg.hidden)
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.norm2 = nn.LayerNorm(cfg.hidden)
        self.mlp = nn.Sequential(nn.Linear(cfg.hidden, cfg.mlp_ratio * cfg.hidden), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.hidden, cfg.hidden))

    def forward(self, x: Tensor) -> Tensor:
        b, s_local, _ = x.shape
        cfg = self.cfg
        q, k, v = self.qkv(self.norm1(x)).view(b, s_local, 3, cfg.heads, cfg.head_dim).unbind(2)
        lay = LAYOUTS[cfg.layout]
        if lay.seq_dim == 0:  # sequence-first layouts take [S/P, B, H, D]
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        elif lay.head_dim == 1:  # head-first layouts take [B, H, S/P, D]
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        o = lay.fn(q, k, v, self.group, is_causal=cfg.causal)
        if lay.seq_dim == 0:
            o = o.transpose(0, 1)
        elif lay.head_dim == 1:
            o = o.transpose(1, 2)
        x = x + self.proj(o.reshape(b, s_local, cfg.hidden))
        return x + self.mlp(self.norm2(x))


class UlyssesTransformer(nn.Module):
    def __init__(self, cfg: UlyssesConfig, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(UlyssesBlock(cfg, group) for _ in range(cfg.blocks))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x
