"""GQA, MQA, masks and scales: HCMS keeps every output and gradient bit for bit (the testing kit,
on hypothesis-drawn variants), and says why where it leaves a site alone."""

from __future__ import annotations

import torch
from hypothesis import event, example, given

from hcms_compile.testing import assert_equivalent
from hcms_compile.testing.strategies import UlyssesCase, variant_cases
from hcms_compile.testing.variants import Variant
from tests.helpers import examples


def _units(case: UlyssesCase) -> int:
    """How many chunkable units a rank's heads form: KV heads under GQA, unless there is one KV
    head per rank (then every chunk shares it and query heads are the units)."""
    local_kv = max(case.kv_heads // case.world_size, 1)
    return case.local_heads if local_kv == 1 else local_kv


@examples(25)
@given(variant_cases())
@example(UlyssesCase("funcol", 2, 2, 4, 16, 8, torch.float32, False, 2, Variant(kv_heads=2, kv_style="repeat")))
@example(UlyssesCase("funcol", 1, 1, 2, 32, 4, torch.float32, False, 3, Variant(kv_heads=1, kv_style="repeat")))
def test_variants_are_bitwise_in_training(case: UlyssesCase):
    result = assert_equivalent(case.function(), case.sharded_inputs(), world_size=case.world_size,
                               chunks=case.chunks, require_rewrite=False,
                               dim_names=("batch", "token", "head", "dim"))
    forward = [s for g in result.graphs if g.phase == "forward" for s in g.sites]
    assert len(forward) == 1
    (site,) = forward
    if case.chunks > _units(case):
        assert not site.rewritten and "chunks requested" in site.reason, site
        event("more chunks than KV heads: skipped")
        return
    # keys and values repeated after the exchange included: the partitioner may save them before their
    # repeat (a receive-tree node), which a shared KV exchange keeps whole and a chunked one reassembles
    assert site.rewritten, site.reason
    event(f"rewritten: kv {case.kv_heads}/{case.heads} {case.variant.kv_style}, mask {case.variant.mask}")
    backward = [s for g in result.graphs if g.phase == "backward" for s in g.sites]
    for s in backward:
        event(f"backward {s.status}: {s.reason[:40]}")
    if case.variant.kv_style == "repeat":
        # the saved KV is a local input of the backward site, sliced per chunk like the query heads
        (bw,) = [s for s in backward if s.attention.endswith("_backward")]
        assert bw.rewritten or bw.reason.startswith("chunking may change bits"), bw.reason
