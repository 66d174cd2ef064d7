"""Assertions shared by the rewrite tests."""

from __future__ import annotations

import os

import torch
from hcms_compile.passes.ops import is_all_to_all
from hypothesis import settings
from torch.fx import GraphModule

from hcms_compile.testing import ranks
from hcms_compile.testing.strategies import UlyssesCase


def examples(ci: int) -> settings:
    """`ci` examples under the CI profile; the loaded profile's count (1000 when thorough) otherwise."""
    if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci":
        return settings(max_examples=ci)
    return settings()


def count_all_to_alls(gm: GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if is_all_to_all(n))


def _outputs(original: GraphModule, rewritten: GraphModule, case: UlyssesCase, seed: int):
    inputs = case.sharded_inputs(seed)
    expected = ranks.run_on_ranks(original, inputs, case.world_size)
    actual = ranks.run_on_ranks(rewritten, inputs, case.world_size)
    return zip(expected, actual, strict=True)


def assert_close_on_ranks(original: GraphModule, rewritten: GraphModule, case: UlyssesCase, seed: int = 0) -> None:
    tol = 1e-5 if case.dtype == torch.float32 else 2e-2
    for want, got in _outputs(original, rewritten, case, seed):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def assert_bitwise_on_ranks(original: GraphModule, rewritten: GraphModule, case: UlyssesCase, seed: int = 0) -> None:
    for rank, (want, got) in enumerate(_outputs(original, rewritten, case, seed)):
        want_leaves = torch.utils._pytree.tree_leaves(want)
        got_leaves = torch.utils._pytree.tree_leaves(got)
        assert len(want_leaves) == len(got_leaves)
        for w, g in zip(want_leaves, got_leaves, strict=True):
            assert w.shape == g.shape and w.dtype == g.dtype, f"rank {rank}: {g.shape}/{g.dtype} vs {w.shape}/{w.dtype}"
            if not torch.equal(w, g):
                diff = (w.float() - g.float()).abs()
                raise AssertionError(f"rank {rank}: rewritten output differs from the original in "
                                     f"{int((diff > 0).sum())} elements (max {diff.max().item():.3g}); {case}")
