"""GQA, MQA, masks and scales: HCMS keeps every output and gradient bit for bit (the testing kit,
on hypothesis-drawn variants), and says why where it leaves a site alone."""

from __future__ import annotations

from hypothesis import event, given

from hcms_compile.testing import assert_equivalent
from hcms_compile.testing.strategies import UlyssesCase, variant_cases
from tests.helpers import examples


def _units(case: UlyssesCase) -> int:
    """How many chunkable units a rank's heads form: KV heads under GQA, unless there is one KV
    head per rank (then every chunk shares it and query heads are the units)."""
    local_kv = max(case.kv_heads // case.world_size, 1)
    return case.local_heads if local_kv == 1 else local_kv


@examples(25)
@given(variant_cases())
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
    if case.variant.kv_style == "repeat" and not site.rewritten:
        # Known limitation (found when the kit's aot_eager began partitioning as torch's aot_eager and
        # Inductor do, with the min-cut partitioner): it saves the exchanged, not yet repeated, keys and
        # values for the backward, and the match refuses an exchanged tensor that escapes the site.
        # The site is left alone (bits unchanged, checked above); Inductor training sees the same graph.
        assert "is also used by ['output']" in site.reason, site.reason
        event("explicit repeat in training: exchanged KV saved for the backward, skipped")
        return
    assert site.rewritten, site.reason
    event(f"rewritten: kv {case.kv_heads}/{case.heads} {case.variant.kv_style}, mask {case.variant.mask}")
    backward = [s for g in result.graphs if g.phase == "backward" for s in g.sites]
    for s in backward:
        event(f"backward {s.status}: {s.reason[:40]}")
