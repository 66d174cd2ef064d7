"""Whole diffusers transformers under context parallelism, compiled through HCMS on 2 gloo ranks.

`tests/test_libraries.py` checks the libraries' Ulysses attention functions; here the unit is a real model:
a tiny random-weight `WanTransformer3DModel`, `FluxTransformer2DModel` and `QwenImageTransformer2DModel`
made sequence-parallel the way diffusers documents it (`model.enable_parallelism(
config=ContextParallelConfig(ulysses_degree=2))`) or the way cache-dit does (`cache_dit`'s
`enable_parallelism(model, ParallelismConfig(ulysses_size=2))`), compiled whole with `torch.compile`
or per block with diffusers' regional compilation (`model.compile_repeated_blocks`), with
`make_backend(chunks=2, inner=...)` for both inner compilers, and again with the same backend under
`HCMS_DISABLE`. Outputs (and parameter gradients, where training) must be `torch.equal`, and the number
of rewritten sites must be one per self-attention of every block.

One spawn of 2 gloo processes per inner compiler runs every case (starting processes and importing
diffusers costs seconds); the tests read its results from a module-scoped fixture.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
import torch

import hcms_compile
from hcms_compile.backend import GraphReport
from hcms_compile.spawn import spawn_gloo
from hcms_compile.testing.compiled import hcms_disabled

WORLD = 2
HEADS, HEAD_DIM = 4, 8  # 2 local heads per rank: chunks=2 gives 1+1 (x batch 2, so CPU flash stays bitwise)
WAN_LAYERS, FLUX_LAYERS, FLUX_SINGLE_LAYERS, QWEN_LAYERS = 2, 1, 1, 2


def _wan() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                  in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                  num_layers=WAN_LAYERS, rope_max_seq_len=32)
    gen = torch.Generator().manual_seed(1)
    # 2 frames of 4 x 8 latents, patches of 2 x 2: 16 tokens; 6 text tokens for the cross-attention
    inputs = {"hidden_states": torch.randn(2, 4, 2, 4, 8, generator=gen), "timestep": torch.tensor([1, 2]),
              "encoder_hidden_states": torch.randn(2, 6, 16, generator=gen), "return_dict": False}
    return model, inputs


def _flux() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=FLUX_LAYERS,
                                   num_single_layers=FLUX_SINGLE_LAYERS, attention_head_dim=HEAD_DIM,
                                   num_attention_heads=HEADS, joint_attention_dim=16, pooled_projection_dim=16,
                                   axes_dims_rope=(2, 2, 4))
    gen = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(2, 16, 8, generator=gen),
              "encoder_hidden_states": torch.randn(2, 8, 16, generator=gen),
              "pooled_projections": torch.randn(2, 16, generator=gen), "timestep": torch.tensor([1.0, 2.0]),
              "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(8, 3), "return_dict": False}
    return model, inputs


def _qwen() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(patch_size=1, in_channels=8, out_channels=4, num_layers=QWEN_LAYERS,
                                        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                                        joint_attention_dim=16, axes_dims_rope=(2, 2, 4))
    gen = torch.Generator().manual_seed(1)
    # no `encoder_hidden_states_mask` (all text tokens valid): with it, Inductor alone (without HCMS) fails
    # in CPU codegen of the [2, 1, 1, 24] joint mask (CppCSEVariable assertion, int64 vectorised), and
    # cache-dit 1.5.3 does not shard it (its eager attention fails on 24 mask columns for 16 keys)
    inputs = {"hidden_states": torch.randn(2, 16, 8, generator=gen),
              "encoder_hidden_states": torch.randn(2, 8, 16, generator=gen),
              "timestep": torch.tensor([1.0, 2.0]),
              "img_shapes": [(1, 4, 4)] * 2, "return_dict": False}
    return model, inputs


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, dict[str, Any]]]] = {"wan": _wan, "flux": _flux, "qwen": _qwen}


def _parallel(name: str, via: str, warm: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model with seeded weights, made sequence-parallel by diffusers or by cache-dit."""
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    if via == "diffusers":
        from diffusers import ContextParallelConfig

        # diffusers picks the rank's device as `rank % torch.accelerator.device_count()`, which is a
        # division by zero on a CPU-only machine; one "device" makes it cpu:0, as every gloo rank is
        with mock.patch("torch.accelerator.device_count", return_value=1):
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    else:
        from cache_dit.distributed.config import ParallelismConfig
        from cache_dit.distributed.dispatch import enable_parallelism

        with mock.patch("torch.accelerator.device_count", return_value=1):
            model = enable_parallelism(model, ParallelismConfig(ulysses_size=WORLD))
    # one eager call first: diffusers' context-parallel hooks fill their argument-index cache with
    # `inspect.signature` on their first call, which Dynamo cannot trace (`hasattr(f, "__wrapped__")`); a
    # first call under torch.compile breaks the graph inside the hook of the first split module (Wan:
    # blocks.0), which left that block's exchanges and attention in different graphs
    if warm:
        with torch.no_grad():
            model(**inputs)
    return model, inputs


# name: (model, parallelised by, compiled as "whole" or "regional", train). cache-dit last: enabling it
# routes diffusers' "native" attention backend through cache-dit's bridge for the rest of the process, and
# the bridge rejects diffusers' own ContextParallelConfig (rotate_method="allgather")
CASES: dict[str, tuple[str, str, str, bool]] = {
    "wan": ("wan", "diffusers", "whole", False),
    "wan_cold": ("wan", "diffusers", "cold", False),  # compiled before the hooks ever ran: a graph break
    "flux": ("flux", "diffusers", "whole", False),
    "qwen": ("qwen", "diffusers", "whole", False),
    "flux_regional": ("flux", "diffusers", "regional", False),
    "wan_regional": ("wan", "diffusers", "regional", False),
    "flux_train": ("flux", "diffusers", "whole", True),
    "flux_cache_dit": ("flux", "cache_dit", "whole", False),
    "qwen_cache_dit": ("qwen", "cache_dit", "whole", False),
}


def _run(case: str, inner: str, hcms: bool) -> tuple[torch.Tensor, list[torch.Tensor | None], list[GraphReport]]:
    model_name, via, how, train = CASES[case]
    model, inputs = _parallel(model_name, via, warm=how != "cold")
    backend = hcms_compile.make_backend(chunks=2, inner=inner)
    torch._dynamo.reset()
    with (contextlib.nullcontext() if hcms else hcms_disabled()), torch.set_grad_enabled(train):
        if how == "regional":
            model.compile_repeated_blocks(backend=backend, fullgraph=True)  # as diffusers documents it
            compiled = model
        else:
            # training cannot be one graph: Dynamo breaks inside diffusers' TemplatedUlyssesAttention
            # (its backward calls query.requires_grad_(True), an unsafe side effect in a higher-order op)
            compiled = torch.compile(model, backend=backend, fullgraph=not train and how != "cold")
        out = compiled(**inputs)[0]
        if train:
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)))
    grads = [p.grad for p in model.parameters()] if train else []
    return out.detach(), grads, [GraphReport(r.phase, r.sites, split=r.split) for r in backend.reports]


def _worker(rank: int, inner: str, cases: list[str], out_dir: str) -> None:
    import logging

    import transformers.utils.logging  # noqa: F401  (it installs Logger.warning_once, which diffusers calls)

    # Wan's context-parallel plan splits a 2-D timestep (Wan 2.2); a 1-D one makes the hook call
    # `logger.warning_once` on every call, which Dynamo cannot trace: ignore it as Dynamo's hint says
    torch._dynamo.config.ignore_logging_functions.add(logging.Logger.warning_once)
    results = {}
    with torch._inductor.config.patch(fx_graph_cache=False, compile_threads=1), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        for case in cases:
            results[case] = (_run(case, inner, hcms=False), _run(case, inner, hcms=True))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module", params=["aot_eager", "inductor"])
def compiled_models(request, tmp_path_factory) -> tuple[str, list[dict[str, Any]]]:
    pytest.importorskip("diffusers")
    pytest.importorskip("cache_dit")
    inner = request.param
    out_dir = tmp_path_factory.mktemp(f"models-{inner}")
    spawn_gloo(_worker, WORLD, inner, list(CASES), str(out_dir))
    return inner, [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _check(results: list[dict[str, Any]], case: str) -> list[GraphReport]:
    """Outputs and gradients bitwise on every rank; the HCMS compile's reports (rank 0)."""
    for rank, per_rank in enumerate(results):
        (plain, plain_grads, _), (hcms, hcms_grads, _) = per_rank[case]
        assert torch.equal(plain, hcms), f"{case}: rank {rank}: output differs with HCMS"
        for i, (want, got) in enumerate(zip(plain_grads, hcms_grads, strict=True)):
            assert (want is None) == (got is None) and (want is None or torch.equal(want, got)), \
                f"{case}: rank {rank}: gradient of parameter {i} differs with HCMS"
    return results[0][case][1][2]


def _rewritten(reports: list[GraphReport]) -> int:
    return sum(site.rewritten for report in reports for site in report.sites)


def _tables(reports: list[GraphReport]) -> str:
    return "\n".join(str(r) for r in reports)


def test_wan_every_self_attention_is_rewritten_cross_attention_left_alone(compiled_models):
    inner, results = compiled_models
    reports = _check(results, "wan")
    assert [r.phase for r in reports] == ["inference"], f"{inner}: one graph expected\n{_tables(reports)}"
    sites = reports[0].sites
    # each block: self-attention (exchanged), then cross-attention to the text (no all-to-all)
    assert len(sites) == 2 * WAN_LAYERS, _tables(reports)
    assert [s.rewritten for s in sites] == [True, False] * WAN_LAYERS, _tables(reports)
    for site in sites[1::2]:
        assert "does not come from an all-to-all" in site.reason, site.reason


def test_wan_compiled_before_its_hooks_ran_splits_no_site(compiled_models):
    # the first call's graph break (diffusers' split hook, see `_parallel`) is in the hook of blocks.0,
    # before any exchange: Dynamo skips the model's frame and compiles the blocks' forwards as frames of
    # their own, blocks.0's (called through the hook) and blocks.1's apart. No site is split, each block
    # graph has its self-attention rewritten. (With more blocks, blocks.2 on reuses blocks.1's compiled
    # graph, Dynamo guarding on the code and not the module: fewer graphs than blocks, every one run.)
    inner, results = compiled_models
    reports = _check(results, "wan_cold")
    assert not any(r.split for r in reports), f"{inner}\n{_tables(reports)}"
    blocks = [r for r in reports if r.sites]
    assert len(blocks) == WAN_LAYERS, f"{inner}\n{_tables(reports)}"
    for report in blocks:
        assert [s.rewritten for s in report.sites] == [True, False], f"{inner}\n{_tables(reports)}"


@pytest.mark.parametrize("case, sites", [("flux", FLUX_LAYERS + FLUX_SINGLE_LAYERS), ("qwen", QWEN_LAYERS)])
def test_joint_attention_models_every_site_rewritten(compiled_models, case, sites):
    inner, results = compiled_models
    reports = _check(results, case)
    assert [r.phase for r in reports] == ["inference"], f"{inner}: one graph expected\n{_tables(reports)}"
    assert len(reports[0].sites) == sites and _rewritten(reports) == sites, _tables(reports)


@pytest.mark.parametrize("case, blocks", [("flux_regional", FLUX_LAYERS + FLUX_SINGLE_LAYERS),
                                          ("wan_regional", WAN_LAYERS)])
def test_regional_compilation_every_block_rewritten(compiled_models, case, blocks):
    # compile_repeated_blocks compiles each block (Dynamo guards on the module, so every block instance is
    # a graph of its own): one self-attention site per graph, rewritten; Wan's cross-attention left alone
    inner, results = compiled_models
    reports = _check(results, case)
    assert len(reports) == blocks, f"{inner}\n{_tables(reports)}"
    for report in reports:
        assert sum(site.rewritten for site in report.sites) == 1, f"{inner}\n{_tables(reports)}"
        for site in report.sites:
            assert site.rewritten or "does not come from an all-to-all" in site.reason, _tables(reports)


@pytest.mark.parametrize("case, sites", [("flux_cache_dit", FLUX_LAYERS + FLUX_SINGLE_LAYERS),
                                         ("qwen_cache_dit", QWEN_LAYERS)])
def test_cache_dit_ulysses_models_every_site_rewritten(compiled_models, case, sites):
    inner, results = compiled_models
    reports = _check(results, case)
    assert [r.phase for r in reports] == ["inference"], f"{inner}: one graph expected\n{_tables(reports)}"
    assert len(reports[0].sites) == sites and _rewritten(reports) == sites, f"{inner}\n{_tables(reports)}"


def test_flux_training_step_is_bitwise_forward_attention_rewritten(compiled_models):
    # Dynamo cannot trace the backward of diffusers' TemplatedUlyssesAttention (autograd.Function): its
    # native backward calls query.requires_grad_(True), "HOP: Unsafe side effect". Dynamo then runs the
    # Function itself and compiles its forward as a frame of its own, under no_grad (an "inference"
    # graph): that graph holds the whole Ulysses site (exchange, attention, exchange) and is rewritten;
    # both blocks call it with one shape, so its one compiled graph serves both. The backward attention
    # and its exchanges run eagerly inside diffusers' backward, in no graph: nothing for any backend.
    inner, results = compiled_models
    reports = _check(results, "flux_train")
    rewritten = [r for r in reports if any(site.rewritten for site in r.sites)]
    assert [r.phase for r in rewritten] == ["inference"], f"{inner}\n{_tables(reports)}"
    assert _rewritten(reports) == 1, f"{inner}\n{_tables(reports)}"
    assert all(not r.sites for r in reports if r.phase == "backward"), f"{inner}\n{_tables(reports)}"
    assert all(site.rewritten for r in reports for site in r.sites), f"{inner}\n{_tables(reports)}"
