"""chunks="auto": the cost model's choice per site, the exactness policy inside it, and ranks that
timed their machines differently still reaching one plan."""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import pytest
import torch
import torch.distributed as dist
from hcms_compile.passes.cost_model import site_cost
from hcms_compile.passes.match import Site, match_sites
from hcms_compile.passes.profiles import BUILTIN_PROFILES, DeviceProfile

import hcms_compile
from hcms_compile.backend import HcmsOptions
from hcms_compile.spawn import spawn_gloo
from hcms_compile.testing.strategies import UlyssesCase
from hcms_compile.testing.tracing import trace

BASE = BUILTIN_PROFILES["cpu-gloo"]
FAST_LINK = dataclasses.replace(BASE, name="fast-link", a2a_bandwidth=1e13, a2a_latency=0.0, contention=0.0)


def _balanced(gm) -> DeviceProfile:
    """A profile on which the graph's site spends as long exchanging as attending, with no fixed
    costs: the case where pipelining pays most."""
    site = next(s for s in match_sites(gm.graph) if isinstance(s, Site))
    cost = site_cost(site)
    crossing = sum(cost.input_bytes + cost.output_bytes) * (site.world_size - 1) / site.world_size
    bandwidth = 1e9
    return dataclasses.replace(BASE, name="balanced", a2a_bandwidth=bandwidth, a2a_latency=0.0,
                               attention_latency=0.0, attention_flops=cost.attention_flops * bandwidth / crossing,
                               copy_bandwidth=1e15, contention=0.0, model_error=0.05)


def _graph(tokens_per_rank: int = 64):
    case = UlyssesCase("funcol", 4, 1, 6, tokens_per_rank, 16, torch.float32, False, 2)
    return trace(case.function(), case.example_inputs(), "make_fx")



def test_auto_chunks_where_communication_can_be_hidden():
    (site,) = hcms_compile.rewrite(_graph(), profile=_balanced(_graph())).sites
    assert site.rewritten and len(site.chunk_sizes) > 1
    assert site.choice.startswith(f"C={len(site.chunk_sizes)} predicted") and "faster" in site.choice
    assert abs(site.rho - 0.5) < 1e-9 and site.predicted_gain >= 0.05


def test_auto_leaves_a_site_alone_when_there_is_nothing_to_hide():
    result = hcms_compile.rewrite(_graph(), profile=FAST_LINK)
    (site,) = result.sites
    assert not site.rewritten and site.reason.startswith("auto: rho ") and "nothing to hide" in site.reason
    assert result.graph_module.code == _graph().code


def test_auto_only_considers_chunkings_the_exactness_policy_accepts():
    # 2 ranks x 5 tokens: the CPU flash scratch is misaligned, every chunking is a rounding change
    case = UlyssesCase("funcol", 2, 1, 4, 5, 8, torch.float32, False, 2)
    gm = trace(case.function(), case.example_inputs(), "make_fx")
    (strict,) = hcms_compile.rewrite(gm, profile=_balanced(gm)).sites
    assert not strict.rewritten and strict.reason.startswith("auto: no chunking the exactness policy accepts")
    (unfused,) = hcms_compile.rewrite(gm, profile=_balanced(gm), fuse=False).sites
    assert not unfused.rewritten and unfused.reason == "auto: no chunking the exactness policy accepts"
    (loose,) = hcms_compile.rewrite(gm, profile=_balanced(gm), exact="rounding").sites
    assert loose.rewritten and loose.grade == "rounding"


def test_explicit_chunks_report_the_prediction_too():
    (site,) = hcms_compile.rewrite(_graph(), chunks=3, profile=FAST_LINK).sites
    assert site.chunk_sizes == (2, 2, 2) and site.predicted_gain < 0 and site.choice == ""
    assert "pred. gain" in hcms_compile.rewrite(_graph(), chunks=3, profile=FAST_LINK).table()


def test_a_saved_profile_is_found_by_path_and_by_environment(tmp_path, monkeypatch):
    from hcms_compile.calibrate import save_profile

    path = save_profile(_balanced(_graph()), tmp_path / "p.json")
    assert hcms_compile.rewrite(_graph(), profile=str(path)).sites[0].rewritten
    monkeypatch.setenv("HCMS_PROFILE", str(path))
    assert hcms_compile.rewrite(_graph()).sites[0].rewritten  # the built-in CPU estimate would not chunk
    missing = tmp_path / "missing.json"
    monkeypatch.setenv("HCMS_PROFILE", str(missing))
    with pytest.raises(FileNotFoundError, match=f"HCMS_PROFILE='{missing}' names no file"):
        hcms_compile.rewrite(_graph())


def test_the_cache_key_holds_the_profile_only_when_the_plan_depends_on_it():
    auto = [HcmsOptions(chunks="auto", profile=p).key() for p in (BASE, FAST_LINK)]
    fixed = [HcmsOptions(chunks=2, exchange="nccl", profile=p).key() for p in (BASE, FAST_LINK)]
    # explicit chunks with exchange="auto" (the default): the profile still chooses the exchange kind
    kind = [HcmsOptions(chunks=2, profile=p).key() for p in (BASE, FAST_LINK)]
    assert auto[0] != auto[1] and fixed[0] == fixed[1] and kind[0] != kind[1]


# -- ranks that measured different profiles ---------------------------------------------------

WORLD = 2


def _attend(group, q, k, v):
    from hcms_compile.testing.layouts import attn_funcol

    return attn_funcol(q, k, v, group)


def _worker(rank: int, out_dir: str) -> None:
    from hcms_compile.calibrate import save_profile

    group = dist.group.WORLD
    local = [torch.randn(1, 64, 8, 16, generator=torch.Generator().manual_seed(rank)) for _ in range(3)]
    gm = trace(functools.partial(_attend, group), local)
    # each rank calibrated on its own and saved a different profile: rank 0 saw a slower link
    balanced = _balanced(gm)
    mine = balanced if rank == 0 else dataclasses.replace(balanced, name="fast-link", a2a_bandwidth=1e15)
    os.environ["HCMS_PROFILE"] = str(save_profile(mine, os.path.join(out_dir, f"profile{rank}.json")))
    alone = hcms_compile.rewrite(gm).sites[0]
    backend = hcms_compile.make_backend(inner="aot_eager")  # chunks="auto" is the default
    out = torch.compile(functools.partial(_attend, group), backend=backend)(*local)
    (site,) = backend.reports[0].sites
    torch.save({"alone": alone.chunk_sizes, "backend": site.chunk_sizes, "choice": site.choice,
                "out": out, "want": _attend(group, *local)}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ranks_with_different_saved_profiles_reach_one_plan(tmp_path):
    spawn_gloo(_worker, WORLD, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    # on its own, each rank's profile plans differently: that is what would hang the collectives
    assert ranks[0]["alone"] != ranks[1]["alone"]
    # the backend makes them agree (the most pessimistic link) before planning
    assert ranks[0]["backend"] == ranks[1]["backend"] and len(ranks[0]["backend"]) > 1
    assert ranks[0]["choice"] == ranks[1]["choice"]
    for r in ranks:
        assert torch.equal(r["out"], r["want"])



# -- agreement involves only the ranks that run the site's collectives ---------------------------

TIMEOUT_S = 60  # the process groups' timeout: a rank waiting on one that never comes fails after this


def _pipeline_rank(rank: int, world: int, port: int, sp_groups: list[list[int]], attention: list[int],
                   out_dir: str) -> None:
    from datetime import timedelta

    from hcms_compile.calibrate import save_profile
    from hcms_compile.spawn import leave_gloo

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = timedelta(seconds=TIMEOUT_S)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    torch.set_num_threads(1)
    groups = [dist.new_group(members, timeout=timeout) for members in sp_groups]  # every rank creates every group
    mine = next((g for g, members in zip(groups, sp_groups, strict=True) if rank in members), None)
    start = time.perf_counter()
    result: dict[str, object] = {}
    if rank in attention:  # a stage with Ulysses attention over its own SP group, chunks="auto"
        local = [torch.randn(1, 64, 8, 16, generator=torch.Generator().manual_seed(rank)) for _ in range(3)]
        gm = trace(functools.partial(_attend, mine), local)
        balanced = _balanced(gm)
        profile = balanced if rank == attention[0] else dataclasses.replace(balanced, a2a_bandwidth=1e15)
        os.environ["HCMS_PROFILE"] = str(save_profile(profile, os.path.join(out_dir, f"profile{rank}.json")))
        backend = hcms_compile.make_backend(inner="aot_eager")
        out = torch.compile(functools.partial(_attend, mine), backend=backend)(*local)
        result = {"chunks": backend.reports[0].sites[0].chunk_sizes, "equal": torch.equal(out, _attend(mine, *local))}
    elif mine is not None:  # a stage without attention: compiles its own graph and runs its own collectives
        backend = hcms_compile.make_backend(inner="aot_eager")
        x = torch.compile(lambda t: torch.relu(t) * 2, backend=backend)(torch.randn(4, 4))
        dist.all_reduce(x, group=mine)
        result = {"reports": [r.sites for r in backend.reports]}
    result["seconds"] = time.perf_counter() - start
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    leave_gloo()


def _run_pipeline(tmp_path, world: int, sp_groups: list[list[int]], attention: list[int]) -> list[dict]:
    import torch.multiprocessing as mp

    from hcms_compile.spawn import free_port

    mp.spawn(_pipeline_rank, args=(world, free_port(), sp_groups, attention, str(tmp_path)), nprocs=world)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _assert_agreed_and_prompt(results: list[dict], attention: list[int]) -> None:
    chunks = {results[r]["chunks"] for r in attention}
    assert len(chunks) == 1 and len(chunks.pop()) > 1  # one plan, agreed on the slower link's profile
    assert all(results[r]["equal"] for r in attention)
    # no rank waited for a peer that never came (that would take the whole TIMEOUT_S, then fail)
    assert max(r["seconds"] for r in results) < TIMEOUT_S / 2, [r["seconds"] for r in results]


def test_a_pipeline_stage_without_attention_is_not_waited_for(tmp_path):
    # SP groups {0,1} and {2,3}: only ranks 0 and 1 have attention; 2 and 3 compile a graph without it
    results = _run_pipeline(tmp_path, 4, [[0, 1], [2, 3]], attention=[0, 1])
    _assert_agreed_and_prompt(results, [0, 1])
    assert results[2]["reports"] == results[3]["reports"] == [[]]


def test_a_rank_that_never_compiles_is_not_waited_for(tmp_path):
    results = _run_pipeline(tmp_path, 3, [[0, 1]], attention=[0, 1])
    _assert_agreed_and_prompt(results, [0, 1])
