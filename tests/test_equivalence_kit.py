"""`hcms_compile.testing.assert_equivalent` passes on correct rewrites and catches wrong ones."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hcms_compile.passes import rewrite as rewrite_module

from hcms_compile.models import UlyssesBlock, UlyssesConfig
from hcms_compile.testing import Check, assert_equivalent, assert_equivalent_all, ranks
from hcms_compile.testing.layouts import attn_funcol
from hcms_compile.testing.strategies import UlyssesCase

P, B, S, H, D = 4, 2, 128, 12, 8
BSHD = ("batch", "token", "head", "dim")


def _attention(q, k, v, group):
    return attn_funcol(q, k, v, group, is_causal=True)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return [ranks.shard(torch.randn(B, S, H, D, generator=gen), 1, P) for _ in range(3)]


def test_a_correct_rewrite_passes_forward_and_backward():
    fn = functools.partial(_attention, group=ranks.group(P))
    result = assert_equivalent(fn, _inputs(), world_size=P, chunks=(2, 1), dim_names=BSHD)
    phases = {g.phase for g in result.graphs if any(s.rewritten for s in g.sites)}
    assert phases == {"forward", "backward"}
    assert result.compared == P * 4  # one output and three input gradients per rank


def test_a_module_compares_parameter_gradients_too():
    block = UlyssesBlock(UlyssesConfig(heads=H, head_dim=D, blocks=1), ranks.group(P))
    x = ranks.shard(torch.randn(B, S, H * D), 1, P)
    result = assert_equivalent(block, [x], world_size=P, chunks=2, dim_names=("batch", "token", "hidden"))
    assert result.compared == P * (1 + len(list(block.parameters())) + 1)


def test_a_wrong_chunk_to_head_mapping_is_caught(monkeypatch):
    original = rewrite_module._SiteWriter.send

    def swapped(self, ex, start, size, override):
        # plant a bug: chunk c takes the heads that belong to the mirror chunk
        return original(self, ex, self.site.local_heads - start - size, size, override)

    monkeypatch.setattr(rewrite_module._SiteWriter, "send", swapped)
    fn = functools.partial(_attention, group=ranks.group(P))
    with pytest.raises(AssertionError, match=r"rank \d, output 0: \d+ of \d+ elements differ; first at batch \d, "
                                             r"token \d+, head \d+, dim \d: plain .* vs HCMS"):
        assert_equivalent(fn, _inputs(), world_size=P, chunks=(2, 1), dim_names=BSHD)


def test_nothing_rewritten_is_not_a_pass():
    with pytest.raises(AssertionError, match="rewrote no site"):
        assert_equivalent(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), _inputs(), world_size=P)


def _alibi_attention(q, k, v, group):
    # a per-head additive bias for this rank's heads, through training graphs (forward and backward)
    from hcms_compile.testing.layouts import _funcol_in, _funcol_out

    q, k, v = (_funcol_in(t, group) for t in (q, k, v))
    slopes = torch.arange(1, q.shape[1] + 1, dtype=q.dtype).view(1, -1, 1, 1) / q.shape[1]
    pos = torch.arange(q.shape[2], dtype=q.dtype)
    bias = slopes * (pos.view(1, 1, 1, -1) - pos.view(1, 1, -1, 1)).clamp(max=0)
    return _funcol_out(F.scaled_dot_product_attention(q, k, v, attn_mask=bias), group)


def test_per_head_masks_in_training_graphs():
    fn = functools.partial(_alibi_attention, group=ranks.group(P))
    result = assert_equivalent(fn, _inputs(), world_size=P, chunks=(2, 1), dim_names=BSHD)
    assert {g.phase for g in result.graphs if any(s.rewritten for s in g.sites)} == {"forward", "backward"}


# -- inner="inductor": the real Inductor-compiled step on gloo processes ----------------------------

INDUCTOR_LAYOUTS = ("dist_inplace", "stack_cat", "stack_chunk", "fused_qkv")


def _inductor_case(name: str) -> UlyssesCase:
    # 2 ranks, batch 2 x 2 local heads, S = 32: CPU flash keeps its bits per chunk, forward and backward
    return UlyssesCase(name, 2, 2, 2, 16, 8, torch.float32, True, 2)


def test_inductor_steps_are_bitwise_on_gloo_ranks():
    # one spawn for every layout: the processes' start and imports cost seconds on a shared machine
    checks = [Check(_inductor_case(name).function(), _inductor_case(name).sharded_inputs(), chunks=2, dim_names=BSHD)
              for name in INDUCTOR_LAYOUTS]
    results = assert_equivalent_all(checks, world_size=2, inner="inductor")
    for name, result in zip(INDUCTOR_LAYOUTS, results, strict=True):
        phases = {g.phase: [s.status for s in g.sites] for g in result.graphs}
        assert phases["forward"] == ["rewritten"], (name, phases)
        assert "rewritten" in phases["backward"], (name, phases)  # (beside a recomputed forward, skipped)
        assert result.compared == 2 * 4, name  # one output and three input gradients per rank


def _swap_chunks() -> None:
    """Plant a bug in each gloo process: chunk c takes the heads that belong to the mirror chunk."""
    original = rewrite_module._SiteWriter.send

    def swapped(self, ex, start, size, override):
        return original(self, ex, self.site.local_heads - start - size, size, override)

    rewrite_module._SiteWriter.send = swapped


def test_inductor_mode_catches_a_wrong_chunk_to_head_mapping():
    case = UlyssesCase("funcol", 2, 1, 3, 16, 8, torch.float32, True, (2, 1))
    with pytest.raises(AssertionError, match=r"rank \d, output 0: \d+ of \d+ elements differ; first at batch \d, "
                                             r"token \d+, head \d+, dim \d: plain .* vs HCMS"):
        assert_equivalent(case.function(), case.sharded_inputs(), world_size=2, chunks=(2, 1), dim_names=BSHD,
                          inner="inductor", setup=_swap_chunks)


def test_inductor_mode_needs_a_picklable_function():
    group = ranks.group(2)
    with pytest.raises(ValueError, match="must be picklable"):
        assert_equivalent(lambda q, k, v: _attention(q, k, v, group), [], world_size=2, inner="inductor")


def test_inductor_mode_with_nothing_rewritten_is_not_a_pass():
    # the comparison of the gloo ranks' steps (no processes needed): no rewritten site fails
    from hcms_compile.backend import GraphReport
    from hcms_compile.testing.equivalence import _compare_steps
    from hcms_compile.testing.inductor import RankStep

    x = torch.ones(2)
    step = RankStep(([x], [x]), ([x], [x]), [GraphReport("forward", [])])
    with pytest.raises(AssertionError, match="rewrote no site"):
        _compare_steps(Check(_attention, [x]), [step, step])
    assert _compare_steps(Check(_attention, [x], require_rewrite=False), [step, step]).compared == 2 * 2
