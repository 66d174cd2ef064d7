"""A chunk's exchanges travel as one all-to-all (q, k, v in; dq, dk, dv out), bit for bit.

Every layout of the zoo, trained through the testing kit (forward and backward graphs, outputs and
gradients compared with `torch.equal` on every rank), chunked in two and as the fused plain site
(one chunk); grouped-query attention, where q and k, v have different head counts in one buffer;
and the same sites with fusion off, for the collective counts the report gives.
"""

from __future__ import annotations

import pytest
import torch
from hcms_compile.passes.ops import is_all_to_all, is_wait

import hcms_compile
from hcms_compile.testing import assert_equivalent
from hcms_compile.testing.layouts import LAYOUTS
from hcms_compile.testing.strategies import UlyssesCase
from hcms_compile.testing.tracing import trace
from hcms_compile.testing.variants import Variant

# (layout, chunks): every layout chunked in two, and as the fused plain site where there is something
# to fuse (fused_qkv already sends q, k and v in one exchange; tests/test_untouched.py has its skip)
CASES = [(name, chunks) for name in LAYOUTS for chunks in (2, 1)
         if chunks == 2 or name != "fused_qkv"]


def _sites(result, phase: str):
    return [s for g in result.graphs if g.phase == phase for s in g.sites if s.rewritten]


def _check(case: UlyssesCase, chunks: int, fuse_expected: bool):
    result = assert_equivalent(case.function(), case.sharded_inputs(), world_size=case.world_size, chunks=chunks,
                               dim_names=("batch", "token", "head", "dim"))
    (forward,) = _sites(result, "forward")
    assert forward.fused is fuse_expected and len(forward.chunk_sizes) == chunks
    # one input exchange and one output exchange per chunk
    assert forward.collectives == 2 * len(forward.chunk_sizes), forward
    return result


@pytest.mark.parametrize(("name", "chunks"), CASES)
def test_every_layout_trains_bitwise_with_fused_exchanges(name: str, chunks: int) -> None:
    case = UlyssesCase(name, 2, 1, 4, 8, 8, torch.float32, True, chunks)
    # fused_qkv stacks q, k and v into one exchange itself: 2C already, nothing left to fuse
    result = _check(case, chunks, fuse_expected=name != "fused_qkv")
    # the backward site: the output gradient in, dq, dk and dv back in one exchange per chunk
    (backward,) = [s for s in _sites(result, "backward") if s.attention.endswith("_backward")]
    assert len(backward.chunk_sizes) == chunks and backward.collectives == 2 * chunks, backward
    assert backward.fused is (name != "fused_qkv"), backward


@pytest.mark.parametrize("chunks", [2, 1], ids=["two chunks", "fused plain site"])
def test_grouped_query_attention_fuses_different_head_counts(chunks: int) -> None:
    # 4 query heads and 2 KV heads per rank: q's piece of a chunk's buffer is twice k's and v's
    case = UlyssesCase("funcol", 2, 1, 4, 8, 8, torch.float32, True, chunks, Variant(kv_heads=4))
    result = _check(case, chunks, fuse_expected=True)
    assert result.compared == 2 * 4


def test_unfused_exchanges_stay_one_per_tensor() -> None:
    case = UlyssesCase("funcol", 2, 1, 4, 8, 8, torch.float32, False, 2)
    gm = trace(case.function(), case.example_inputs(), "make_fx")
    fused, plain = (hcms_compile.rewrite(gm, chunks=2, fuse=f).sites[0] for f in (True, False))
    assert (fused.fused, fused.collectives) == (True, 4)
    assert (plain.fused, plain.collectives) == (False, 8)


def test_no_wait_is_left_on_the_reassembled_output() -> None:
    # funcol waits twice (its wrapper's wait, then the user's); after the rewrite the second would wait
    # on the concatenation of the chunks, and Inductor would have to materialise it for that extern call
    # instead of letting a pointwise consumer read the pieces (measured on the H200: the cat kernel goes)
    case = UlyssesCase("funcol", 2, 1, 4, 8, 8, torch.float32, False, 2)
    gm = trace(case.function(), case.example_inputs(), "make_fx")
    assert sum(map(is_wait, gm.graph.nodes)) == 2 * sum(map(is_all_to_all, gm.graph.nodes))  # waited twice
    result = hcms_compile.rewrite(gm, chunks=2, exact="rounding")
    waits = [n for n in result.graph_module.graph.nodes if is_wait(n)]
    assert len(waits) == 4 and all(is_all_to_all(w.args[0]) for w in waits)
