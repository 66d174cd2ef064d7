"""The exactness policy: grades per kernel, the CUDA flash split rule, and what each policy accepts."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hcms_compile.passes.exactness import (
    BITWISE,
    ROUNDING,
    RUN_TO_RUN,
    Exactness,
    _flash_splits,
    accepts,
    exactness_policy,
    judge,
)

import hcms_compile
from hcms_compile.testing.strategies import UlyssesCase
from hcms_compile.testing.tracing import trace

H200_SMS = 132
TABLE = Path(__file__).parent.parent / "docs" / "gpu_exactness_h200_torch2.11.json"
# the shape classes of benchmarks/gpu_exactness.py: batch, heads, tokens, head dim, chunk sizes
SHAPES = {"small 5h x 4096, 3+2": (1, 5, 4096, 128, (3, 2)), "small 10h x 1000, 5+5": (1, 10, 1000, 64, (5, 5)),
          "medium 2x8h x 2048, 4+4": (2, 8, 2048, 64, (4, 4)), "uneven 10h x 8192, 7+3": (1, 10, 8192, 128, (7, 3)),
          "large 40h x 8192, 20+20": (1, 40, 8192, 128, (20, 20))}


def _cuda(*shape, dtype=torch.bfloat16):
    # judge reads only shape, dtype and device: a stand-in avoids needing a GPU here
    return SimpleNamespace(shape=torch.Size(shape), dtype=dtype, device=torch.device("cuda"))


@pytest.fixture
def h200(monkeypatch):
    props = SimpleNamespace(multi_processor_count=H200_SMS)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)


def test_policies_accept_nested_grades():
    assert [exactness_policy(v) for v in (True, False, "bitwise", "run-to-run", "rounding")] == [
        BITWISE, RUN_TO_RUN, BITWISE, RUN_TO_RUN, ROUNDING]
    grades = {g: Exactness(g, "") for g in (BITWISE, RUN_TO_RUN, ROUNDING)}
    assert {g for g, v in grades.items() if accepts(BITWISE, v)} == {BITWISE}
    assert {g for g, v in grades.items() if accepts(RUN_TO_RUN, v)} == {BITWISE, RUN_TO_RUN}
    assert {g for g, v in grades.items() if accepts(ROUNDING, v)} == {BITWISE, RUN_TO_RUN, ROUNDING}
    with pytest.raises(TypeError, match="exact must be"):
        exactness_policy(1)


def test_flash_split_heuristic_by_hand():
    # 10 heads x 16 query blocks = 160 items < 0.8 x 264 slots; 4 key blocks: 3 parts would leave
    # 2 blocks per part like 2 parts do (ineligible), so 4 parts (efficiency 0.81) win
    assert _flash_splits(160, 264, 4) == 4
    assert _flash_splits(80, 264, 4) == 2  # 5 heads: two parts already reach the best efficiency
    assert _flash_splits(5120, 264, 64) == 1  # enough items to fill the GPU: no split
    assert _flash_splits(212, 264, 64) == 1 and _flash_splits(211, 264, 64) > 1  # 0.8 x 264 = 211.2


@pytest.mark.usefixtures("h200")
def test_flash_rule_agrees_with_every_measured_h200_case():
    rows = [r for r in json.loads(TABLE.read_text())["rows"] if r["kernel"] == "flash" and "error" not in r]
    assert len(rows) == 20
    for row in rows:
        b, h, s, d, sizes = SHAPES[row["shape"]]
        q = _cuda(b, h, s, d)
        verdict = judge("flash", q, q, sizes)
        assert verdict.bitwise == row["fwd_chunked_bitwise"], (row, verdict)
        assert verdict.grade in (BITWISE, ROUNDING)


@pytest.mark.usefixtures("h200")
def test_cuda_grades():
    q = _cuda(1, 8, 4096, 128)
    assert judge("cudnn", q, q, (4, 4)).grade == BITWISE
    assert judge("efficient", q, q, (4, 4)).grade == BITWISE
    for kernel in ("flash", "efficient", "cudnn"):
        assert judge(kernel, q, q, (4, 4), backward=True).grade == RUN_TO_RUN
    assert judge("efficient", _cuda(1, 8, 4096, 128, dtype=torch.float32), q, (4, 4), backward=True).grade == ROUNDING
    small = _cuda(1, 5, 4096, 128)  # flash forward changes its split-KV schedule: so does the backward's input
    assert judge("flash", small, small, (3, 2), backward=True).grade == ROUNDING
    torch.use_deterministic_algorithms(True)
    try:
        assert judge("efficient", q, q, (4, 4), backward=True).grade == ROUNDING
    finally:
        torch.use_deterministic_algorithms(False)
    assert judge("sdpa", q, q, (4, 4)).grade == ROUNDING


def test_a_deterministic_kernel_that_rounds_differently_needs_the_rounding_policy():
    # 2 ranks x 12 tokens, D=8: the CPU flash scratch is 24*24 + 2*24 + 24*8 = 816 floats, a
    # multiple of 16; 2 x 3 tokens gives 6*6 + 12 + 48 = 96, also aligned; 2 x 5 gives 10*10 + 20
    # + 80 = 200, which is not
    case = UlyssesCase("funcol", world_size=2, batch=1, local_heads=2, tokens_per_rank=5, head_dim=8,
                       dtype=torch.float32, causal=False, chunks=2)
    gm = trace(case.function(), case.example_inputs(), "make_fx")
    strict, loose = (hcms_compile.rewrite(gm, chunks=2, exact=e).sites[0] for e in (True, False))
    rounding = hcms_compile.rewrite(gm, chunks=2, exact="rounding").sites[0]
    assert not strict.rewritten and "pass exact='rounding'" in strict.reason
    assert not loose.rewritten  # the kernel is deterministic: there is no run-to-run variation to hide in
    assert rounding.rewritten and rounding.grade == ROUNDING and rounding.bitwise is False


@pytest.mark.usefixtures("h200")
def test_run_to_run_grades_rest_on_the_measured_table():
    """A backward grade of run-to-run claims: the chunked gradients differ from the unchunked ones
    by no more than two unchunked runs of that kernel and dtype differed (largest over shape classes)."""
    rows = [r for r in json.loads(TABLE.read_text())["rows"] if "error" not in r and r["kernel"] != "math"]
    variation: dict[tuple[str, str], float] = {}
    for row in rows:
        key = (row["kernel"], row["dtype"])
        variation[key] = max(variation.get(key, 0.0), row["bwd_run_to_run_max_diff"])
    graded = 0
    for row in rows:
        b, h, s, d, sizes = SHAPES[row["shape"]]
        q = _cuda(b, h, s, d, dtype=getattr(torch, row["dtype"]))
        if judge(row["kernel"], q, q, sizes, backward=True).grade == RUN_TO_RUN:
            graded += 1
            assert row["bwd_max_diff"] <= variation[(row["kernel"], row["dtype"])], row
    assert graded == 52  # cuDNN 20, efficient 20 (bf16, fp16), flash 12 (schedule kept)
