"""Real processes, real gloo all-to-alls: the rewritten graph matches the original on every rank."""

from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hcms_compile.spawn import spawn_gloo

WORLD = 3
B, S, H, D = 2, 96, 6, 8  # S=96: a shape the CPU kernel computes identically per head


def _worker(rank: int, out_dir: str) -> None:
    import hcms_compile
    from hcms_compile.testing.layouts import LAYOUTS
    from hcms_compile.testing.tracing import trace

    group = dist.group.WORLD
    results = {}
    for name in ("funcol", "fused_qkv", "xdit"):
        lay = LAYOUTS[name]
        gen = torch.Generator().manual_seed(0)
        full = [torch.randn(lay.local_shape(B, S, H, D, 1), generator=gen) for _ in range(3)]
        local = [t.chunk(WORLD, dim=lay.seq_dim)[rank].contiguous() for t in full]
        gm = trace(functools.partial(_attend, lay.fn, group), local)
        result = hcms_compile.rewrite(gm, chunks=(1, 1))
        want, got = gm(*local), result.graph_module(*local)
        bhsd = [t.permute(lay.batch_dim, lay.head_dim, lay.seq_dim, 3) for t in full]
        reference = _to_layout(F.scaled_dot_product_attention(*bhsd, is_causal=True).transpose(1, 2), lay)
        results[name] = (result.sites[0].status, torch.equal(want, got), want,
                         reference.chunk(WORLD, dim=lay.seq_dim)[rank])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _attend(fn, group, q, k, v):
    return fn(q, k, v, group, is_causal=True)


def _to_layout(bshd: torch.Tensor, lay) -> torch.Tensor:
    canonical = {lay.batch_dim: 0, lay.seq_dim: 1, lay.head_dim: 2, 3: 3}
    return bshd.permute(*(canonical[pos] for pos in range(4)))


def test_rewrite_is_bitwise_over_gloo(tmp_path):
    spawn_gloo(_worker, WORLD, str(tmp_path))
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for name, (status, equal, out, reference) in results.items():
            assert status == "rewritten", name
            assert equal, f"{name}: rank {rank} differs after the rewrite"
            # and the model itself is right: its shard of single-process attention
            torch.testing.assert_close(out, reference)
