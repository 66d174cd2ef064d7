"""Variable sequence lengths: one compiled artifact with a symbolic S, chunked and bitwise at every S.

Dynamo compiles with a symbolic sequence length under `dynamic=True`, after `mark_dynamic`, and on
its own when a second length arrives (automatic dynamic). Heads stay static: the pass chunks them
with S (and the batch) symbolic. The graphs are run here at several lengths, with and without HCMS,
forward and backward, on in-process ranks (the aot_eager graphs) or gloo processes (Inductor).
"""

from __future__ import annotations

import contextlib
import logging
import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed._local_tensor import LocalTensor, LocalTensorMode
from torch.fx import GraphModule

import hcms_compile
from hcms_compile.backend import GraphReport
from hcms_compile.spawn import spawn_gloo
from hcms_compile.testing import ranks
from hcms_compile.testing.compiled import hcms_disabled
from hcms_compile.testing.layouts import LAYOUTS, attn_funcol
from tests.helpers import count_all_to_alls

WORLD = 2
H, D = 4, 8  # static heads: the inputs carry H * D features, viewed as heads with constants
LENGTHS = (16, 24, 40)  # tokens per rank: S = 32, 48, 80, where the CPU kernel keeps its bits per head


def _attention(group, layout: str = "funcol"):
    lay = LAYOUTS[layout]

    def fn(q, k, v):
        b, s, _ = q.shape
        q, k, v = (t.view(b, s, H, D) for t in (q, k, v))
        swap = (0, 1) if lay.seq_dim == 0 else (1, 2) if lay.head_dim == 1 else None  # as models.UlyssesBlock
        if swap:
            q, k, v = (t.transpose(*swap) for t in (q, k, v))
        out = lay.fn(q, k, v, group, is_causal=True)
        if swap:
            out = out.transpose(*swap)
        return out.reshape(b, s, H * D)

    return fn


def _compile(fn, lengths, backend, dynamic, batch=2, min_length=None, train=True) -> tuple[list[GraphReport], int]:
    """Compile `fn` by calling it at each length in turn; the reports of the last compile, and how
    many compiles there were."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=True)
    compiles, start = 0, 0
    for s in lengths:
        inputs = [torch.randn(batch, s, H * D, requires_grad=train) for _ in range(3)]
        if min_length is not None:
            for t in inputs:
                torch._dynamo.mark_dynamic(t, 1, min=min_length, max=1 << 16)
        before = len(backend.reports)
        with torch.set_grad_enabled(train):
            out = compiled(*inputs)
            if train:
                out.sum().backward()
        if len(backend.reports) > before:
            compiles, start = compiles + 1, before
    return backend.reports[start:], compiles


def _arguments(gm: GraphModule, tensors) -> list:
    """A graph's inputs: the tensors, and each SymInt placeholder's value, solved from their shapes."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values, tensors = {}, iter(tensors)
    args: list = []
    for node in placeholders:
        val = node.meta.get("val", node.meta.get("example_value"))
        if isinstance(val, torch.Tensor):
            tensor = next(tensors)
            for sym, n in zip(val.shape, tensor.shape, strict=True):
                if isinstance(sym, torch.SymInt) and sym.node.expr.is_Symbol:
                    values[sym.node.expr] = n
            args.append(tensor)
        else:
            args.append(val)
    return [int(a.node.expr.subs(values)) if isinstance(a, torch.SymInt) else a for a in args]


def _training_step(reports: list[GraphReport], inputs, cotangent):
    """Forward then backward graph on every rank, as AOTAutograd runs them (saved SymInts first)."""
    forward = next(r for r in reports if r.phase == "forward").graph_module
    backward = next(r for r in reports if r.phase == "backward").graph_module
    n_saved = sum(1 for n in backward.graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents"))

    def step(*xs):
        results = list(forward(*_arguments(forward, xs)))
        outs, saved = results[: len(results) - n_saved], results[len(results) - n_saved:]
        saved = sorted(saved, key=lambda x: isinstance(x, torch.Tensor))  # SymInts first, as AOTAutograd passes them
        tangents = [torch.empty_like(outs[0]).copy_(cotangent)]
        grads = [g for g in backward(*saved, *tangents) if isinstance(g, torch.Tensor)]
        return outs + grads

    with LocalTensorMode(WORLD):
        values = step(*inputs)
    return ranks.per_rank(values, WORLD)


def _assert_bitwise_at(hcms: list[GraphReport], plain: list[GraphReport], lengths, batch=2) -> None:
    gen = torch.Generator().manual_seed(0)
    for s in lengths:
        inputs = [ranks.shard(torch.randn(batch, s * WORLD, H * D, generator=gen), 1, WORLD) for _ in range(3)]
        cotangent = LocalTensor({r: torch.randn(batch, s, H * D, generator=gen) for r in range(WORLD)})
        want, got = _training_step(plain, inputs, cotangent), _training_step(hcms, inputs, cotangent)
        for rank in range(WORLD):
            assert len(got[rank]) == len(want[rank]) == 4  # the output and three input gradients
            for i, (w, g) in enumerate(zip(want[rank], got[rank], strict=True)):
                assert w.shape == (batch, s, H * D)
                assert torch.equal(w, g), f"S/P={s}, rank {rank}, value {i}: HCMS differs from plain"


def _statuses(reports: list[GraphReport]) -> dict[str, list[str]]:
    return {r.phase: [s.status for s in r.sites if s.attention.startswith("_scaled_dot_product")] for r in reports}


def _symbolic_graph(report: GraphReport) -> bool:
    return any(isinstance(n.meta.get("val"), torch.SymInt) for n in report.graph_module.graph.nodes
               if n.op == "placeholder")


@pytest.mark.parametrize("dynamic, lengths, min_length, layout", [
    (True, (16,), None, "funcol"),  # symbolic from the start (batch too)
    (True, (16,), None, "diffusers"),  # flattened exchange buffers: a symbolic dim 0
    (True, (16,), None, "deepspeed_sf"),  # sequence-first
    (None, (16, 24), None, "funcol"),  # automatic dynamic: the second length recompiles with a symbolic S
    (None, (16,), 16, "funcol"),  # mark_dynamic with a minimum length
])
def test_one_symbolic_artifact_is_bitwise_over_lengths(fake_group, dynamic, lengths, min_length, layout):
    fn = _attention(fake_group(WORLD), layout)
    hcms, compiles = _compile(fn, lengths, hcms_compile.make_backend(chunks=2, inner="aot_eager", exact="rounding"),
                              dynamic, min_length=min_length)
    with hcms_disabled():
        plain, _ = _compile(fn, lengths, hcms_compile.make_backend(chunks=2, inner="aot_eager"), dynamic,
                            min_length=min_length)
    assert compiles == len(lengths) and all(_symbolic_graph(r) for r in hcms)
    statuses = _statuses(hcms)
    assert statuses["forward"] == ["rewritten"] and "rewritten" in statuses["backward"], hcms
    _assert_bitwise_at(hcms, plain, LENGTHS)


def test_the_artifact_is_not_specialised_by_the_pass(fake_group):
    """A guard added while rewriting would pin S and recompile at the next length."""
    fn = _attention(fake_group(WORLD))
    backend = hcms_compile.make_backend(chunks=2, inner="aot_eager", exact="rounding")
    reports, compiles = _compile(fn, (16, 24, *LENGTHS), backend, None)
    assert compiles == 2  # the static first length, then one symbolic artifact for all the others
    assert _statuses(reports)["forward"] == ["rewritten"]


def test_exactness_covers_every_length_the_artifact_accepts(fake_group):
    fn = _attention(fake_group(WORLD))
    # S/P >= 2: S = 4 is allowed, where CPU flash's scratch alignment depends on the thread
    short, _ = _compile(fn, (16, 24), hcms_compile.make_backend(chunks=2, inner="aot_eager"), None)
    (site,) = [s for s in short[0].sites]
    assert site.status == "skipped" and site.reason.startswith("symbolic shapes: chunking may change bits")
    assert "S_q=4" in site.reason and "mark_dynamic" in site.reason
    # S/P >= 16: S >= 32 for every call, so the artifact keeps every head's bits
    long, _ = _compile(fn, (16,), hcms_compile.make_backend(chunks=2, inner="aot_eager"), None, min_length=16)
    (site,) = long[0].sites
    assert site.rewritten and site.grade == "bitwise", site.reason
    assert "for every" in site.exactness


def test_auto_plans_at_the_compiling_length(fake_group):
    fn = _attention(fake_group(WORLD))
    backend = hcms_compile.make_backend(chunks="auto", inner="aot_eager", exact="rounding")
    reports, _ = _compile(fn, (16, 24), backend, None, train=False)
    (site,) = reports[0].sites
    text = site.choice if site.rewritten else site.reason
    assert "predicted at the compiling example's S_q=48, S_kv=48" in text, text


def test_explicit_chunks_do_not_depend_on_the_length(fake_group):
    fn = _attention(fake_group(WORLD))
    sizes = []
    for first in (16, 40):
        backend = hcms_compile.make_backend(chunks=(1, 1), inner="aot_eager", exact="rounding")
        reports, _ = _compile(fn, (first, first + 8), backend, None, train=False)
        sizes.append(reports[0].sites[0].chunk_sizes)
    assert sizes == [(1, 1), (1, 1)]


def test_auto_keys_compiled_code_on_the_compiling_length(fake_group, monkeypatch):
    # Inductor's caches key symbolic sizes by name: under "auto" the pass's own key must carry the
    # length the plan was made at, or a rank with a warm cache would run another plan than a cold one
    from hcms_compile.backend import HcmsBackend

    keys: dict[str, list[str]] = {"auto": [], "explicit": []}
    original = HcmsBackend._aot_eager

    def spy(self, gm, example_inputs, options):
        if options.hints:  # the second, symbolic compile (the first one has static shapes)
            keys["auto" if options.chunks == "auto" else "explicit"].append(options.key())
        return original(self, gm, example_inputs, options)

    monkeypatch.setattr(HcmsBackend, "_aot_eager", spy)
    fn = _attention(fake_group(WORLD))
    for chunks in ("auto", (1, 1)):
        for first in (16, 40):
            # explicit chunks and an explicit exchange: nothing is predicted, so the length is not in the key
            # (with exchange="auto" the predictions choose the kind, and the key carries the length)
            exchange = "auto" if chunks == "auto" else "nccl"
            backend = hcms_compile.make_backend(chunks=chunks, inner="aot_eager", exact="rounding", exchange=exchange)
            _compile(fn, (first, first + 8), backend, None, train=False)
    assert len(keys["auto"]) == 2 and len(set(keys["auto"])) == 2, keys["auto"]
    assert len(keys["explicit"]) == 2 and len(set(keys["explicit"])) == 1, keys["explicit"]


def test_a_symbolic_head_count_is_skipped_with_one_warning_per_compile(fake_group, caplog):
    group = fake_group(WORLD)

    def fn(q, k, v):  # [B, S/P, H, D] inputs: under dynamic=True the head count itself is symbolic
        return attn_funcol(q, k, v, group, is_causal=True)

    backend = hcms_compile.make_backend(chunks=2, inner="aot_eager")
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="hcms_compile"), torch.no_grad():
        compiled = torch.compile(fn, backend=backend, dynamic=True)
        for s in (32, 48):
            compiled(*[torch.randn(2, s, 4, 8) for _ in range(3)])
    (report,) = backend.reports  # one compile serves both lengths
    (site,) = report.sites
    assert site.status == "skipped" and "symbolic head count" in site.reason
    warnings = [r for r in caplog.records if r.name == "hcms_compile" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "1 site(s) left unchunked because of symbolic shapes" in warnings[0].getMessage()
    assert site.attention in warnings[0].getMessage()


@pytest.mark.parametrize("layout", ["funcol", "xdit", "diffusers", "deepspeed_sf", "fused_qkv"])
def test_make_fx_symbolic_graph_is_rewritten_and_bitwise(fake_group, layout):
    from torch.fx.experimental.proxy_tensor import make_fx

    fn = _attention(fake_group(WORLD), layout)
    gm = make_fx(fn, tracing_mode="symbolic")(*[torch.randn(2, 16, H * D) for _ in range(3)])
    result = hcms_compile.rewrite(gm, chunks=2, exact="rounding")
    assert [s.status for s in result.sites] == ["rewritten"], result
    # make_fx reads sizes with sym_size from the exchanged tensors: none may keep the original exchange alive;
    # each chunk sends q, k and v in one exchange and gets its output back in another
    assert count_all_to_alls(result.graph_module) == result.sites[0].collectives == 2 * 2
    for s in LENGTHS:
        inputs = [ranks.shard(torch.randn(2, s * WORLD, H * D), 1, WORLD) for _ in range(3)]
        want = ranks.run_on_ranks(gm, inputs, WORLD)
        got = ranks.run_on_ranks(result.graph_module, inputs, WORLD)
        assert all(torch.equal(w, g) for w, g in zip(want, got, strict=True)), f"S/P={s}"


def test_dynamo_symbolic_graph_is_rewritten_and_bitwise(fake_group):
    fn = _attention(fake_group(WORLD))
    graphs = []

    def keep(gm, _example):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=keep, dynamic=True, fullgraph=True)(*[torch.randn(2, 16, H * D) for _ in range(3)])
    (gm,) = graphs
    result = hcms_compile.rewrite(gm, chunks=2, exact="rounding")
    assert [s.status for s in result.sites] == ["rewritten"], result
    for s in LENGTHS:
        inputs = [ranks.shard(torch.randn(2, s * WORLD, H * D), 1, WORLD) for _ in range(3)]
        want = ranks.run_on_ranks(lambda *xs: gm(*_arguments(gm, xs)), inputs, WORLD)
        got = ranks.run_on_ranks(lambda *xs: result.graph_module(*_arguments(gm, xs)), inputs, WORLD)
        for w, g in zip(want, got, strict=True):  # per rank: the graph's output tuple
            assert torch.equal(w[0], g[0]) and w[0].shape == (2, s, H * D), f"S/P={s}"


def _inductor_worker(rank: int, out_dir: str) -> None:
    torch.manual_seed(0)
    fn = _attention(dist.group.WORLD)
    results = {}
    for label, mode in (("hcms", contextlib.nullcontext), ("plain", hcms_disabled)):
        backend = hcms_compile.make_backend(chunks=2, inner="inductor", exact="rounding")
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend=backend, dynamic=True, fullgraph=True)
        values = []
        with mode():
            for s in LENGTHS:
                gen = torch.Generator().manual_seed(s)
                full = [torch.randn(2, s * WORLD, H * D, generator=gen) for _ in range(3)]
                inputs = [t.chunk(WORLD, dim=1)[rank].clone().requires_grad_() for t in full]
                out = compiled(*inputs)
                out.backward(torch.randn(out.shape, generator=gen))
                values.append([out.detach(), *(t.grad for t in inputs)])
        results[label] = (values, [(r.phase, [s.status for s in r.sites]) for r in backend.reports])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_inductor_dynamic_artifact_is_bitwise_over_gloo(tmp_path):
    spawn_gloo(_inductor_worker, WORLD, str(tmp_path))
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        hcms_values, hcms_reports = results["hcms"]
        plain_values, _ = results["plain"]
        assert [phase for phase, _ in hcms_reports] == ["forward", "backward"]  # one artifact for every length
        assert all("rewritten" in statuses for _, statuses in hcms_reports), hcms_reports
        for s, want, got in zip(LENGTHS, plain_values, hcms_values, strict=True):
            for i, (w, g) in enumerate(zip(want, got, strict=True)):
                assert torch.equal(w, g), f"S/P={s}, rank {rank}, value {i}"


@pytest.mark.parametrize("layout", ["funcol", "diffusers", "xdit"])
def test_export_with_dynamic_shapes_is_rewritten_and_bitwise(fake_group, layout):
    from hcms_compile.testing.tracing import _Wrap

    fn = _attention(fake_group(WORLD), layout)
    batch, tokens = torch.export.Dim("batch", min=2, max=64), torch.export.Dim("tokens", min=2, max=4096)
    exported = torch.export.export(_Wrap(fn), tuple(torch.randn(2, 16, H * D) for _ in range(3)),
                                   dynamic_shapes=(tuple({0: batch, 1: tokens} for _ in range(3)),), strict=False)
    gm = exported.module()
    result = hcms_compile.rewrite(gm, chunks=2, exact="rounding")
    assert [s.status for s in result.sites] == ["rewritten"], result
    for b, s in ((2, 16), (3, 24), (2, 40)):
        inputs = [ranks.shard(torch.randn(b, s * WORLD, H * D), 1, WORLD) for _ in range(3)]
        want = ranks.run_on_ranks(gm, inputs, WORLD)
        got = ranks.run_on_ranks(result.graph_module, inputs, WORLD)
        assert all(torch.equal(w, g) for w, g in zip(want, got, strict=True)), f"B={b}, S/P={s}"


# -- the exactness verdict over the lengths a symbolic S may take --------------------------------------


def _symbolic_tokens(hint: int, minimum: int | None = None) -> torch.SymInt:
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()
    symbol = env.create_symbol(hint, ConstantSource("tokens"), dynamic_dim=DimDynamic.DYNAMIC)
    s = env.create_symintnode(symbol, hint=hint)
    if minimum is not None:
        torch._check(s >= minimum)  # what mark_dynamic(min=...) tells the shape environment
    return s


def _stand_in(*shape, device="cpu", dtype=torch.float32):
    # judge reads only shape, dtype and device
    from types import SimpleNamespace

    return SimpleNamespace(shape=shape, dtype=dtype, device=torch.device(device))


def test_cpu_verdict_names_the_shortest_length_that_breaks_bits():
    from hcms_compile.passes.exactness import judge

    s = _symbolic_tokens(64)
    q = _stand_in(1, 4, 2 * s, 8)  # the attention sees P x the local tokens: S >= 4
    verdict = judge("flash_cpu", q, q, (2, 2))
    assert verdict.grade == "rounding" and verdict.symbolic
    assert "S_q=4" in verdict.why
    long = _stand_in(1, 4, 2 * _symbolic_tokens(64, minimum=16), 8)
    verdict = judge("flash_cpu", long, long, (2, 2))
    assert verdict.grade == "bitwise" and "for every S_q >= 32" in verdict.why


def test_cpu_backward_verdict_reads_the_smallest_batch():
    from hcms_compile.passes.exactness import judge

    batch = _symbolic_tokens(4)  # Dynamo's dynamic dims start at 2: 2 x 1 head is still parallel
    q = _stand_in(batch, 2, 64, 8)
    assert judge("flash_cpu", q, q, (1, 1), backward=True).grade == "bitwise"


def test_cuda_flash_verdict_walks_until_the_chunks_fill_the_gpu(monkeypatch):
    from types import SimpleNamespace

    from hcms_compile.passes.exactness import judge

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    # 20 heads in 10+10: from 1345 query tokens (22 blocks of 64) on, a chunk's 10 x 22 items fill 80% of
    # 2 x 132 slots, so the whole call and every chunk run one split; at 1344 a chunk has 210 < 211.2
    for minimum, grade in ((None, "rounding"), (1344, "rounding"), (1345, "bitwise")):
        q = _stand_in(1, 20, _symbolic_tokens(8192, minimum), 128, device="cuda", dtype=torch.bfloat16)
        verdict = judge("flash", q, q, (10, 10))
        assert verdict.grade == grade and verdict.symbolic, (minimum, verdict.why)
        assert minimum != 1344 or "S_q=1344" in verdict.why
        # the backward keeps the forward's split schedule only where every length keeps it
        backward = judge("flash", q, q, (10, 10), backward=True).grade
        assert backward == ("run-to-run" if grade == "bitwise" else "rounding")


def _explicit_splits(group):
    """A flattened exchange with its split sizes written out: symbolic once S is."""
    import torch.distributed._functional_collectives as funcol
    import torch.nn.functional as F

    def a2a(x):
        n = x.numel() // WORLD
        return funcol.wait_tensor(funcol.all_to_all_single_autograd(x.flatten(), [n] * WORLD, [n] * WORLD,
                                                                    group)).reshape(x.shape)

    def fn(q, k, v):
        b, s, _ = q.shape
        p = WORLD

        def scatter_heads(x):
            send = x.view(b, s, p, H // p, D).permute(2, 0, 1, 3, 4).contiguous()
            return a2a(send).permute(1, 3, 0, 2, 4).reshape(b, H // p, p * s, D)

        o = F.scaled_dot_product_attention(*map(scatter_heads, (q, k, v)), is_causal=True)
        send = o.reshape(b, H // p, p, s, D).permute(2, 0, 3, 1, 4).contiguous()
        return a2a(send).permute(1, 2, 0, 3, 4).reshape(b, s, H * D)

    return fn


def test_symbolic_split_sizes_are_rebuilt_per_chunk(fake_group):
    from torch.fx.experimental.proxy_tensor import make_fx

    fn = _explicit_splits(fake_group(WORLD))
    gm = make_fx(fn, tracing_mode="symbolic")(*[torch.randn(2, 16, H * D) for _ in range(3)])
    result = hcms_compile.rewrite(gm, chunks=2, exact="rounding", fuse=False)
    assert [s.status for s in result.sites] == ["rewritten"], result
    splits = [n.args[1] for n in result.graph_module.graph.nodes if "all_to_all" in n.name]
    assert len(splits) == 8 and all(isinstance(x, torch.fx.Node) for s in splits for x in s)
    # fused, a chunk's buffer is [P, n]: one row per rank, whatever the length
    fused = hcms_compile.rewrite(gm, chunks=2, exact="rounding")
    splits = [n.args[1] for n in fused.graph_module.graph.nodes if "all_to_all" in n.name]
    assert len(splits) == 4 and [1] * WORLD in splits
    hcms, _ = _compile(fn, (16,), hcms_compile.make_backend(chunks=2, inner="aot_eager", exact="rounding"), True)
    with hcms_disabled():
        plain, _ = _compile(fn, (16,), hcms_compile.make_backend(chunks=2, inner="aot_eager"), True)
    assert _statuses(hcms)["forward"] == ["rewritten"]
    _assert_bitwise_at(hcms, plain, LENGTHS)


def test_a_transformer_under_dynamic_true_is_chunked_once_for_every_length(fake_group):
    from hcms_compile.models import UlyssesConfig, UlyssesTransformer

    model = UlyssesTransformer(UlyssesConfig(heads=H, head_dim=D, blocks=2), fake_group(WORLD))
    backend = hcms_compile.make_backend(chunks=2, inner="aot_eager", exact="rounding")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for s in (16, 24, 40):
        compiled(torch.randn(2, s, H * D)).sum().backward()
    assert [r.phase for r in backend.reports] == ["forward", "backward"]  # one artifact for every length
    forward, backward = backend.reports
    assert [s.status for s in forward.sites] == ["rewritten"] * 2
    assert [s.status for s in backward.sites if "_backward" in s.attention] == ["rewritten"] * 2
