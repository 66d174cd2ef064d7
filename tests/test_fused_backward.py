"""The backward of a fused qkv exchange: dq, dk, dv stacked into one all-to-all are chunked, bit for bit.

AOTAutograd turns the fused forward's `stack([q, k, v])` -> all-to-all -> `unbind` into the attention
backward's dq, dk, dv -> `stack` -> all-to-all -> `select`. The rewrite stacks each chunk's slices the
same way and sends them with one all-to-all per chunk. Stacks that are not that pattern are skipped.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, replace

import pytest
import torch
import torch.distributed._functional_collectives as funcol
from hcms_compile.passes import chunk_sizes
from hypothesis import event, given
from hypothesis import strategies as st

import hcms_compile
from hcms_compile.spawn import spawn_gloo
from hcms_compile.testing import assert_equivalent, ranks
from hcms_compile.testing.layouts import attn_fused_qkv
from hcms_compile.testing.strategies import UlyssesCase, chunk_specs, ulysses_cases
from hcms_compile.testing.tracing import trace
from tests.helpers import count_all_to_alls, examples, is_exchange_node
from tests.test_inductor_order import _attention_between_issue_and_wait, _events, compile_and_get_code

_backward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _output_exchanges_per_chunk(gm: torch.fx.GraphModule) -> Counter:
    return Counter(n.meta["hcms"]["chunk"] for n in gm.graph.nodes
                   if is_exchange_node(n) and n.meta.get("hcms", {}).get("role") == "output_all_to_all")


def _cpu_backward_is_bitwise(batch: int, sizes: tuple[int, ...]) -> bool:
    # passes/exactness.py: CPU flash backward keeps its bits when every chunk has >= 2 (batch, head) items
    return batch * min(sizes) >= 2


# -- through the backend: the fused layout of the zoo, trained one step ----------------------------


def _check_training(case: UlyssesCase) -> str:
    """Outputs and every gradient bitwise (the kit); the backward site's report and its all-to-alls."""
    result = assert_equivalent(case.function(), case.sharded_inputs(0), world_size=case.world_size,
                               chunks=case.chunks, require_rewrite=False, dim_names=("batch", "head", "token", "dim"))
    assert result.compared == case.world_size * 4  # one output and three input gradients per rank
    (backward,) = [g for g in result.graphs if g.phase == "backward"]
    site = next(s for s in backward.sites if s.attention.endswith("_backward"))
    sizes = chunk_sizes(case.local_heads, case.chunks)
    if not _cpu_backward_is_bitwise(case.batch, sizes):
        assert not site.rewritten and site.reason.startswith("chunking may change bits"), site
        return "backward: exactness policy"
    assert site.rewritten, site.reason
    assert site.chunk_sizes == sizes and site.exchanges == 1
    gm = backward.graph_module
    # dq, dk, dv of chunk c leave in one all-to-all, not three; with the output gradient's exchange
    # that is two per chunk, where the plain backward has two in all
    assert _output_exchanges_per_chunk(gm) == Counter(range(len(sizes)))
    assert count_all_to_alls(gm) == 2 * len(sizes)
    return "backward: rewritten"


@pytest.mark.parametrize(("world", "batch", "local_heads", "chunks", "dtype"), [
    (4, 2, 3, (2, 1), torch.bfloat16),
    (2, 1, 4, 2, torch.float32),
    (3, 2, 2, 2, torch.float32),
])
def test_fused_qkv_training_is_bitwise_and_its_backward_is_chunked(world, batch, local_heads, chunks, dtype):
    case = UlyssesCase("fused_qkv", world, batch, local_heads, 8, 8, dtype, True, chunks)
    assert _check_training(case) == "backward: rewritten"


@examples(8)
@given(ulysses_cases(layouts=("fused_qkv",), min_local_heads=2, max_local_heads=4), st.sampled_from([1, 2, 2]))
def test_fused_qkv_training_is_bitwise_on_drawn_shapes(case, batch):
    # world sizes 1-8, uneven chunk splits; a few tokens so that the sequence can be scattered back, and
    # mostly two sequences, so that most chunkings keep the CPU backward's bits
    case = replace(case, batch=batch, tokens_per_rank=max(case.tokens_per_rank, 4))
    event(_check_training(case))


# -- hand-built backward graphs: the shape AOTAutograd emits, and near misses --------------------


def _a2a(x, group):
    return funcol.wait_tensor(funcol.all_to_all_single(x.contiguous(), None, None, group))


def _scatter_heads(x, group):
    """The output gradient [B, H, S/P, D] of the fused layout to [B, H/P, S, D], as its backward does."""
    b, h, s, d = x.shape
    p = group.size()
    recv = _a2a(x.permute(1, 0, 2, 3).reshape(p, h // p, b, s, d), group)  # [P (sequence block), H/P, B, S/P, D]
    return recv.permute(2, 1, 0, 3, 4).reshape(b, h // p, p * s, d)


def _send_stacked(grads, group, kind: str = "stack"):
    """[B, H/P, S, D] tensors joined into one exchange that scatters their sequence: stacked (the fused
    layout's backward; back to [B, H, S/P, D] each), concatenated after an unsqueeze (the same), or
    concatenated on the head axis (a forward that joined q, k, v by heads)."""
    p = group.size()
    if kind == "heads":
        joined = torch.cat(grads, dim=1)
        b, h, s, d = joined.shape
        return _a2a(joined.reshape(b, h, p, s // p, d).permute(2, 0, 1, 3, 4), group)  # [P (head block), ...]
    stacked = torch.stack(grads) if kind == "stack" else torch.cat([g.unsqueeze(0) for g in grads])
    n, b, h, s, d = stacked.shape
    recv = _a2a(stacked.view(n, b, h, p, s // p, d).permute(3, 0, 1, 2, 4, 5), group)  # [P (head block), n, ...]
    return recv.permute(1, 2, 0, 3, 4, 5).reshape(n, b, p * h, s // p, d).unbind(0)


def _inputs(world: int, batch: int, local_heads: int, tokens: int, dim: int, dtype=torch.float32,
            kv_heads: int | None = None):
    """Example inputs (output gradient, q, k, v, out, log-sum-exp), and the same per rank."""
    seq = world * tokens
    q, kv = (batch, local_heads, seq, dim), (batch, kv_heads or local_heads, seq, dim)
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(batch, world * local_heads, seq, dim, generator=gen).to(dtype)
    local = [torch.randn(shape, generator=gen).to(dtype) for shape in (q, kv, kv, q)]
    local.append(torch.randn(batch, local_heads, seq, generator=gen))  # log-sum-exp
    per_rank = [ranks.shard(grad, 2, world)] + [ranks.replicate(t, world) for t in local]
    return [grad.chunk(world, 2)[0].contiguous(), *local], per_rank


def _backward_fn(group, send, causal: bool = False):
    def fn(grad_out, q, k, v, out, lse):
        dq, dk, dv = _backward_op(_scatter_heads(grad_out, group), q, k, v, out, lse, 0.0, causal)[:3]
        return send(dq, dk, dv, out)

    return fn


def _rewrite(fn, example_inputs, per_rank, world, chunks, fuse=True):
    gm = trace(fn, example_inputs, "make_fx")
    result = hcms_compile.rewrite(gm, chunks=chunks, fuse=fuse)
    (site,) = [s for s in result.sites if s.attention.endswith("_backward")]
    if site.rewritten:
        want = ranks.run_on_ranks(gm, per_rank, world)
        got = ranks.run_on_ranks(result.graph_module, per_rank, world)
        for rank, (w, g) in enumerate(zip(want, got, strict=True)):
            for a, b in zip(torch.utils._pytree.tree_leaves(w), torch.utils._pytree.tree_leaves(g), strict=True):
                assert torch.equal(a, b), f"rank {rank}: the rewritten backward differs"
    return gm, result, site


@dataclass(frozen=True)
class _BackwardCase:
    world: int
    batch: int
    local_heads: int
    tokens: int  # per rank
    dim: int
    dtype: torch.dtype
    causal: bool
    kind: str  # how `_send_stacked` joins the gradients
    chunks: int | tuple[int, ...]


@st.composite
def _backward_cases(draw: st.DrawFn) -> _BackwardCase:
    local_heads = draw(st.integers(2, 5))
    return _BackwardCase(
        world=draw(st.integers(1, ranks.MAX_RANKS)), batch=draw(st.sampled_from([1, 2, 2])), local_heads=local_heads,
        tokens=draw(st.sampled_from([1, 2, 4, 8])), dim=draw(st.sampled_from([2, 4, 8])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])), causal=draw(st.booleans()),
        kind=draw(st.sampled_from(["stack", "cat", "heads"])), chunks=draw(chunk_specs(local_heads)))


@examples(30)
@given(_backward_cases())
def test_stacked_gradients_are_sent_in_one_all_to_all_per_chunk(case: _BackwardCase):
    group = ranks.group(case.world)
    example_inputs, per_rank = _inputs(case.world, case.batch, case.local_heads, case.tokens, case.dim, case.dtype)
    fn = _backward_fn(group, lambda dq, dk, dv, out: _send_stacked([dq, dk, dv], group, case.kind), case.causal)
    gm, result, site = _rewrite(fn, example_inputs, per_rank, case.world, case.chunks)
    sizes = chunk_sizes(case.local_heads, case.chunks)
    if not _cpu_backward_is_bitwise(case.batch, sizes):
        assert site.reason.startswith("chunking may change bits"), site
        event("exactness policy")
        return
    assert site.rewritten, site.reason
    event(f"rewritten ({case.kind})")
    assert _output_exchanges_per_chunk(result.graph_module) == Counter(range(len(sizes)))
    assert count_all_to_alls(result.graph_module) == count_all_to_alls(gm) * len(sizes)


def test_a_stacked_gradient_also_used_elsewhere_escapes_whole():
    world = 2
    group = ranks.group(world)
    example_inputs, per_rank = _inputs(world, 2, 3, 4, 4)

    def send(dq, dk, dv, out):
        return (*_send_stacked([dq, dk, dv], group), dq * 2, dv.sum())

    _, result, site = _rewrite(_backward_fn(group, send), example_inputs, per_rank, world, (2, 1))
    assert site.rewritten, site.reason
    assert _output_exchanges_per_chunk(result.graph_module) == Counter([0, 1])


def test_grouped_key_and_value_gradients_stacked_without_the_query_gradient_are_chunked():
    # grouped-query attention (CPU flash takes fewer KV heads natively): dq goes back alone, dk and dv
    # share one exchange, so the stacked tensors have one shape and chunks cut them by KV heads
    world = 2
    group = ranks.group(world)
    example_inputs, per_rank = _inputs(world, 2, 4, 4, 4, kv_heads=2)

    def send(dq, dk, dv, out):
        b, h, s, d = dq.shape
        recv = _a2a(dq.view(b, h, world, s // world, d).permute(2, 0, 1, 3, 4), group)
        return recv.permute(1, 0, 2, 3, 4).reshape(b, world * h, s // world, d), *_send_stacked([dk, dv], group)

    _, result, site = _rewrite(_backward_fn(group, send), example_inputs, per_rank, world, 2, fuse=False)
    assert site.rewritten and site.chunk_sizes == (2, 2), site.reason
    assert _output_exchanges_per_chunk(result.graph_module) == Counter([0, 0, 1, 1])
    # fused: dq (query heads) and the stacked dk, dv (KV heads), of different sizes, in one all-to-all
    _, result, site = _rewrite(_backward_fn(group, send), example_inputs, per_rank, world, 2)
    assert site.rewritten and site.fused and site.collectives == 2 * 2
    assert _output_exchanges_per_chunk(result.graph_module) == Counter([0, 1])


@pytest.mark.parametrize(("send", "reason", "kv_heads"), [
    (lambda g: lambda dq, dk, dv, out: _send_stacked([dv, dk, dq], g),
     "not in the order the attention op returns them", None),
    (lambda g: lambda dq, dk, dv, out: _send_stacked([dq, dk, dv, out], g),
     "which is not an output of", None),
    (lambda g: lambda dq, dk, dv, out: _send_stacked([dq, dk, dq], g),
     "stacks one attention output more than once", None),
    (lambda g: lambda dq, dk, dv, out: _send_stacked([dq, dk.transpose(0, 1), dv], g),
     "laid out differently", None),
    (lambda g: lambda dq, dk, dv, out: _send_stacked([dq, dk, dv], g, "heads"),
     "joins attention outputs of different shapes", 2),
], ids=["reordered", "mixed-with-another-tensor", "repeated", "transposed", "gqa-cat"])
def test_a_stack_that_is_not_a_per_head_gradient_exchange_is_left_alone(send, reason, kv_heads):
    world = 2
    group = ranks.group(world)
    # batch == local heads, so that a transposed gradient has the shape of the others
    example_inputs, per_rank = _inputs(world, 4, 4, 4, 4, kv_heads=kv_heads)
    gm, result, site = _rewrite(_backward_fn(group, send(group)), example_inputs, per_rank, world, 2)
    assert not site.rewritten and reason in site.reason, site
    assert result.graph_module.code == gm.code


def test_inductor_keeps_the_fused_backward_pipelined():
    (forward, backward), backend = compile_and_get_code(attn_fused_qkv, (2, 4, 16, 8))
    assert [s.status for r in backend.reports for s in r.sites if s.attention.endswith("_backward")] == ["rewritten"]
    events = _events(backward)
    # one output-gradient exchange and one stacked dq, dk, dv exchange per chunk; only chunk 0's input
    # and the last chunk's output have no attention kernel to hide behind
    gaps = _attention_between_issue_and_wait(events)
    assert len(gaps) == 4 and sum(g == 0 for g in gaps) == 2, (gaps, events)


# -- real processes ------------------------------------------------------------------------------


def _gloo_worker(rank: int, out_dir: str) -> None:
    import torch.distributed as dist

    group = dist.group.WORLD
    world = group.size()
    example_inputs, per_rank = _inputs(world, 2, 3, 8, 8)
    local = [x._local_tensors[rank] for x in per_rank]
    gm = trace(_backward_fn(group, lambda dq, dk, dv, out: _send_stacked([dq, dk, dv], group)), example_inputs)
    result = hcms_compile.rewrite(gm, chunks=(2, 1))
    want, got = gm(*local), result.graph_module(*local)
    torch.save((result.sites[-1].status, all(torch.equal(w, g) for w, g in zip(want, got, strict=True))),
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_fused_backward_is_bitwise_over_gloo(tmp_path):
    world = 3
    spawn_gloo(_gloo_worker, world, str(tmp_path))
    for rank in range(world):
        status, equal = torch.load(tmp_path / f"rank{rank}.pt")
        assert status == "rewritten" and equal, f"rank {rank}: {status}, equal {equal}"
