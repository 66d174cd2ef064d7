"""Calibration: ranks that time differently end with one profile, and profiles survive a round trip."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hcms_compile.passes.cost_model import SiteCost
from hcms_compile.passes.plan import choose_chunks
from hcms_compile.passes.profiles import BUILTIN_PROFILES, DeviceProfile

from hcms_compile.calibrate import CalibrateArgs, agree, load_profile, main_calibrate, profile_path, save_profile
from hcms_compile.spawn import spawn_gloo

WORLD = 2
# comm close to compute, so a faster or slower link changes the chunk choice
COST = SiteCost(attention_flops=8e9, input_bytes=(2 ** 24,) * 3, output_bytes=(2 ** 24,), send_copy_bytes=0,
                receive_copy_bytes=0, output_copy_bytes=0, reassembly_bytes=0, world_size=3, local_heads=6,
                backward=False, causal=False)


def _local_profile(rank: int) -> DeviceProfile:
    """What rank `rank` might have timed: rank 0 has the slower kernels, rank 1 the slower link."""
    return DeviceProfile(name=f"timed-on-{rank}", a2a_bandwidth=(4e9, 0.5e9)[rank], a2a_latency=(1e-4, 3e-4)[rank],
                         attention_flops=(30e9, 50e9)[rank], attention_latency=(3e-5, 0.0)[rank],
                         copy_bandwidth=(2e9, 3e9)[rank], contention=(0.6, 0.5)[rank],
                         model_error=(0.05, 0.07)[rank], estimate=False, source=f"rank {rank}", world_size=WORLD)


def _worker(rank: int, out_dir: str) -> None:
    agreed = agree(_local_profile(rank))
    choice = choose_chunks(COST, agreed, units=6)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"profile": agreed.to_json(), "chunks": choice.chunk_sizes, "reason": choice.reason}, f)


@pytest.fixture(scope="module")
def agreed(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("agree")
    spawn_gloo(_worker, WORLD, str(out))
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def test_ranks_that_timed_differently_would_plan_differently():
    # the premise of agree(): without it these ranks would chunk the same site differently
    choices = {choose_chunks(COST, _local_profile(rank), units=6).chunk_sizes for rank in range(WORLD)}
    assert len(choices) > 1


def test_agree_gives_every_rank_the_same_profile_and_plan(agreed):
    first = agreed[0]
    for other in agreed[1:]:
        assert other == first  # JSON floats round-trip exactly, so this is bitwise
    local = [_local_profile(rank) for rank in range(WORLD)]
    profile = DeviceProfile.from_json(first["profile"])
    assert profile.a2a_latency == max(p.a2a_latency for p in local)
    assert profile.attention_latency == max(p.attention_latency for p in local)
    assert profile.a2a_bandwidth == min(p.a2a_bandwidth for p in local)
    assert profile.attention_flops == min(p.attention_flops for p in local)
    assert profile.copy_bandwidth == min(p.copy_bandwidth for p in local)
    assert (profile.contention, profile.model_error) == (0.6, 0.07)
    assert (profile.name, profile.source, profile.world_size) == ("timed-on-0", "rank 0", WORLD)
    assert tuple(first["chunks"]) == choose_chunks(COST, profile, units=6).chunk_sizes


def test_calibrate_runs_end_to_end_on_two_gloo_ranks(tmp_path):
    path = tmp_path / "profile.json"
    profile = main_calibrate(CalibrateArgs(ranks=2, sizes=(1 << 10, 1 << 14), repeats=2, attention_tokens=64,
                                           out=str(path)))
    assert profile == load_profile(path)
    assert profile.name == "cpu" and profile.world_size == 2 and not profile.estimate
    # contention is measured now (the exchange on a thread beside attention); CPUs have no persistent kernels
    assert 0 <= profile.contention <= 1 and not profile.persistent_attention
    assert "exchange on a thread" in profile.source and "2 rank(s) over gloo" in profile.source
    # all positive, and within reason for any CPU: between 1 MB/s and 1 TB/s, under a second per call
    assert 1e6 < profile.a2a_bandwidth < 1e12 and 0 <= profile.a2a_latency < 1
    assert 1e6 < profile.attention_flops < 1e13 and 1e6 < profile.copy_bandwidth < 1e12


def test_save_and_load_round_trip(tmp_path, monkeypatch):
    monkeypatch.delenv("HCMS_PROFILE", raising=False)
    profile = BUILTIN_PROFILES["h200-ib"]
    path = save_profile(profile, tmp_path / "nested" / "p.json")
    assert load_profile(path) == profile
    record = json.loads(path.read_text())
    assert record["torch"] == torch.__version__ and record["world_size"] is None and record["date"]
    assert not list(path.parent.glob("*.tmp"))


def test_default_paths_and_the_environment_override(tmp_path, monkeypatch):
    monkeypatch.delenv("HCMS_PROFILE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert profile_path("cpu", 4) == tmp_path / ".cache" / "hcms_compile" / "profile-cpu-w4.json"
    assert load_profile(device="cpu", world_size=4) is None
    measured = DeviceProfile.from_json({**BUILTIN_PROFILES["cpu-gloo"].to_json(), "name": "cpu", "world_size": 4,
                                        "estimate": False})
    assert save_profile(measured) == profile_path("cpu", 4)
    assert load_profile(device="cpu", world_size=4) == measured
    assert load_profile(device="cpu", world_size=2) is None
    override = tmp_path / "chosen.json"
    monkeypatch.setenv("HCMS_PROFILE", str(override))
    assert save_profile(BUILTIN_PROFILES["h100-pcie"]) == override
    assert load_profile() == BUILTIN_PROFILES["h100-pcie"]


def test_a_damaged_profile_is_an_error_not_a_silent_default(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": 1, "profile": {"name": "x"}}))
    with pytest.raises(ValueError, match="not a saved hcms profile.*missing"):
        load_profile(path)
    path.write_text(json.dumps({"format": 2, "profile": BUILTIN_PROFILES["cpu-gloo"].to_json()}))
    with pytest.raises(ValueError, match="format 2"):
        load_profile(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not a saved hcms profile"):
        load_profile(path)


def _cpu_graph(world: int):
    from hcms_compile.testing.strategies import UlyssesCase
    from hcms_compile.testing.tracing import trace

    case = UlyssesCase("funcol", world, 1, 4, 32, 8, torch.float32, False, 2)
    return trace(case.function(), case.example_inputs(), "make_fx")


def _measured(name: str, world: int) -> DeviceProfile:
    return DeviceProfile.from_json({**BUILTIN_PROFILES["cpu-gloo"].to_json(), "name": name, "world_size": world,
                                    "estimate": False, "source": "measured"})


def test_a_profile_for_another_world_size_or_device_is_not_applied_silently(tmp_path, monkeypatch):
    import hcms_compile

    monkeypatch.delenv("HCMS_PROFILE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    gm = _cpu_graph(2)  # an all-to-all over 2 ranks, on the CPU
    assert hcms_compile.rewrite(gm, chunks=2, profile=_measured("cpu", 2)).sites[0].rewritten  # fits
    # chosen by the user (an object, a path, HCMS_PROFILE): an error naming both sides
    with pytest.raises(ValueError, match="profile='cpu'.*calibrated at world size 4.*over 2 ranks"):
        hcms_compile.rewrite(gm, profile=_measured("cpu", 4))
    gpu = save_profile(_measured("nvidia-h200", 2), tmp_path / "gpu.json")
    with pytest.raises(ValueError, match=f"profile='{gpu}'.*nvidia-h200 was calibrated on another device.*cpu"):
        hcms_compile.rewrite(gm, profile=str(gpu))
    monkeypatch.setenv("HCMS_PROFILE", str(gpu))
    with pytest.raises(ValueError, match=f"HCMS_PROFILE='{gpu}' does not fit"):
        hcms_compile.rewrite(gm)
    monkeypatch.delenv("HCMS_PROFILE")
    # found where calibrate saves, but not what its name says (copied from elsewhere): a warning, the estimate
    save_profile(_measured("cpu", 8), profile_path("cpu", 2))
    with pytest.warns(UserWarning, match="does not fit this graph.*world size 8.*built-in estimate cpu-gloo"):
        hcms_compile.rewrite(gm)
