"""Graphs the pass cannot prove are left exactly as they were, with a reason per site."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.fx
import torch.nn.functional as F

import hcms_compile
from hcms_compile.testing import ranks
from hcms_compile.testing.layouts import _funcol_in as funcol_in
from hcms_compile.testing.layouts import _funcol_out as funcol_out
from hcms_compile.testing.layouts import attn_dist_inplace, attn_funcol
from hcms_compile.testing.tracing import trace
from tests.helpers import assert_untouched

P, B, S_LOCAL, H, D = 2, 2, 16, 4, 8


def _head_blocks(x, group, *, strided: bool = False):
    """[B, S/P, H, D] sent so that rank r receives head block r: the received [P, B, S/P, H/P, D]."""
    b, s, h, d = x.shape
    p = group.size()
    split = x.reshape(b, s, h // p, p, d).transpose(2, 3) if strided else x.reshape(b, s, p, h // p, d)
    send = split.permute(2, 0, 1, 3, 4).contiguous()
    return funcol.wait_tensor(funcol.all_to_all_single(send, None, None, group))


def _scatter_heads(x, group, *, strided: bool = False):
    b, s, h, d = x.shape
    p = group.size()
    return _head_blocks(x, group, strided=strided).permute(1, 3, 0, 2, 4).reshape(b, h // p, p * s, d)


def _gather_heads(o, group):
    b, h, s, d = o.shape
    p = group.size()
    send = o.reshape(b, h, p, s // p, d).permute(2, 0, 3, 1, 4).contiguous()
    recv = funcol.wait_tensor(funcol.all_to_all_single(send, None, None, group))
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s // p, p * h, d)


def _inputs(heads: int = H):
    return [torch.randn(B, S_LOCAL, heads, D) for _ in range(3)]


def _skipped(fn, reason: str, n_sites: int = 1, tracer: str = "make_fx"):
    gm = trace(fn, _inputs(), tracer)
    result = hcms_compile.rewrite(gm, chunks=2)
    assert len(result.sites) == n_sites
    assert all(s.status == "skipped" for s in result.sites), result
    assert any(reason in s.reason for s in result.sites), result
    assert_untouched(gm, result)
    return result


def _rewritten(fn, *, exact: bool | str = True, tracer: str = "make_fx", heads: int = H) -> list:
    """Rewrite `fn`'s graph, check every site was rewritten, and return the reports after
    checking the outputs on every rank (bitwise, or close where `exact="rounding"` allowed a chunking
    the kernel may round differently). Dynamo graphs suit masks built from constants."""
    gm = trace(fn, _inputs(heads), tracer)
    result = hcms_compile.rewrite(gm, chunks=2, exact=exact)
    assert result.sites and all(s.rewritten for s in result.sites), result
    inputs = [ranks.shard(torch.randn(B, P * S_LOCAL, heads, D), 1, P) for _ in range(3)]
    want, got = ranks.run_on_ranks(gm, inputs, P), ranks.run_on_ranks(result.graph_module, inputs, P)
    for w, o in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got), strict=True):
        assert torch.equal(w, o) if exact is True else torch.allclose(w, o, atol=1e-5)
    return result.sites


NO_ALL_TO_ALL = "no all-to-all in this graph: attention without sequence parallelism is left alone"


@pytest.mark.parametrize("tracer", ["make_fx", "dynamo"])
def test_plain_attention_without_collectives_is_a_skip(tracer):
    _skipped(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), NO_ALL_TO_ALL, tracer=tracer)


def test_local_keys_and_values_are_sliced_per_chunk():
    # q arrives by all-to-all; k and v are already per-rank heads (say, replicated context):
    # each chunk takes its heads' slice of them
    g = ranks.group(P)

    def fn(q, k, v):
        q = _scatter_heads(q, g)
        k, v = (t.transpose(1, 2)[:, : H // P].repeat(1, 1, P, 1) for t in (k, v))
        return _gather_heads(F.scaled_dot_product_attention(q, k, v), g)

    assert _rewritten(fn)[0].exchanges == 1


def test_cross_attention_without_any_all_to_all_is_left_alone():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    _skipped(fn, NO_ALL_TO_ALL)


def _masked(mask_of):
    g = ranks.group(P)

    def fn(q, k, v):
        q, k, v = (_scatter_heads(t, g) for t in (q, k, v))
        return _gather_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask_of(q)), g)

    return fn


def _causal(q):
    return torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()


def _distance(q):
    pos = torch.arange(q.shape[2], dtype=q.dtype)
    return -(pos.view(1, 1, -1, 1) - pos.view(1, 1, 1, -1)).abs() / q.shape[2]


def test_broadcast_masks_go_to_every_chunk():
    for mask_of in (_causal, _distance):  # boolean [S, S] and additive [1, 1, S, S]
        sites = _rewritten(_masked(mask_of), tracer="dynamo")
        assert sites[0].local_heads == H // P


def test_per_head_bias_is_sliced_per_chunk():
    # a bias per local head (ALiBi-like), computed on each rank for its own heads
    def bias(q):
        slopes = torch.arange(1, q.shape[1] + 1, dtype=q.dtype).view(1, -1, 1, 1)
        pos = torch.arange(q.shape[2], dtype=q.dtype)
        return slopes * (pos.view(1, 1, -1, 1) - pos.view(1, 1, 1, -1))

    _rewritten(_masked(bias), tracer="dynamo")


def test_mask_computed_from_the_exchanged_queries_is_a_skip():
    _skipped(_masked(lambda q: q.sum(-1, keepdim=True) > 0), "attn_mask is computed from the exchanged inputs",
             tracer="dynamo")


def test_dropout_would_change_random_streams():
    g = ranks.group(P)

    def fn(q, k, v):
        q, k, v = (_scatter_heads(t, g) for t in (q, k, v))
        return _gather_heads(F.scaled_dot_product_attention(q, k, v, dropout_p=0.1), g)

    gm = trace(fn, _inputs(), "dynamo")  # make_fx would bake one random draw in
    result = hcms_compile.rewrite(gm, chunks=2)
    assert result.sites[0].status == "skipped" and "dropout_p=0.1" in result.sites[0].reason
    assert_untouched(gm, result)


def test_strided_head_ownership_is_not_proven():
    g = ranks.group(P)

    def fn(q, k, v):
        q, k, v = (_scatter_heads(t, g, strided=True) for t in (q, k, v))
        return _gather_heads(F.scaled_dot_product_attention(q, k, v), g)

    _skipped(fn, "does not scatter heads")


def test_exchange_that_does_not_gather_sequence():
    g = ranks.group(P)

    def fn(q, k, v):
        # the source-rank factor lands in the batch axis: attention over S/P tokens only
        def scatter(x):
            b, s, h, d = x.shape
            return _head_blocks(x, g).permute(0, 1, 3, 2, 4).reshape(P * b, h // P, s, d)

        o = F.scaled_dot_product_attention(scatter(q), scatter(k), scatter(v))
        send = o.reshape(P, B, H // P, S_LOCAL, D).contiguous()
        return funcol.wait_tensor(funcol.all_to_all_single(send, None, None, g))

    _skipped(fn, "does not gather the sequence")


def test_intermediate_receive_value_used_elsewhere():
    g = ranks.group(P)

    def fn(q, k, v):
        b, s, h, d = q.shape
        recv = _head_blocks(q, g)
        total = recv.sum()  # read before the attention: the chunks have not reassembled it yet there
        q = recv.permute(1, 3, 0, 2, 4).reshape(b, h // P, P * s, d)
        k, v = (_scatter_heads(t, g) for t in (k, v))
        return _gather_heads(F.scaled_dot_product_attention(q, k, v), g), total

    _skipped(fn, "come before the attention")  # read after it, it is reassembled: tests/test_escapes.py


def test_attention_inputs_and_outputs_used_elsewhere_are_reassembled():
    g = ranks.group(P)

    def fn(q, k, v):
        q, k, v = (_scatter_heads(t, g) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v)
        return _gather_heads(o, g), q * 2, o.sum(dim=1)

    _rewritten(fn)


def test_uneven_split_sizes():
    g = ranks.group(P)

    def fn(q, k, v):
        def scatter(x):
            b, s, h, d = x.shape
            send = x.reshape(b, s, P, h // P, d).permute(2, 0, 1, 3, 4).contiguous().flatten(0, 1)
            rows = send.shape[0]
            splits = [rows // P + 1, rows // P - 1]
            recv = funcol.wait_tensor(funcol.all_to_all_single(send, splits, splits, g))
            return recv.reshape(P, b, s, h // P, d).permute(1, 3, 0, 2, 4).reshape(b, h // P, P * s, d)

        q, k, v = (scatter(t) for t in (q, k, v))
        return _gather_heads(F.scaled_dot_product_attention(q, k, v), g)

    _skipped(fn, "uneven all-to-all split sizes")


def _gqa(kv_heads: int):
    g = ranks.group(P)

    def fn(q, k, v):
        q = _scatter_heads(q, g)
        k, v = (_scatter_heads(t[:, :, :kv_heads], g) for t in (k, v))
        return _gather_heads(F.scaled_dot_product_attention(q, k, v, enable_gqa=True), g)

    return fn


def test_grouped_query_attention_keeps_each_group_with_its_kv_head():
    gm = trace(_gqa(4), _inputs(8), "dynamo")  # 8 query heads, 4 KV heads: 4 and 2 per rank
    assert "split a group of 2" in hcms_compile.rewrite(gm, chunks=(1, 3)).sites[0].reason
    assert "in KV heads" in hcms_compile.rewrite(gm, chunks=3).sites[0].reason


def test_one_kv_head_per_rank_is_exchanged_whole_and_shared_by_every_chunk():
    # 4 query heads, 2 KV heads over 2 ranks: each rank's 2 query heads read its one KV head
    (site,) = _rewritten(_gqa(2), tracer="dynamo")
    assert site.chunk_sizes == (1, 1) and site.exchanges == 1  # only q's exchange is chunked


def test_grouped_query_attention_is_chunked_by_kv_heads():
    sites = _rewritten(_gqa(4), tracer="dynamo", heads=8)  # 8 query and 4 KV heads over 2 ranks: 4 and 2 each
    assert sites[0].chunk_sizes == (2, 2) and sites[0].local_heads == 4


def test_decomposed_attention_is_reported_as_no_site():
    def fn(q, k, v):
        w = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return w @ v

    gm = trace(fn, _inputs())
    result = hcms_compile.rewrite(gm, chunks=2)
    assert result.sites == []
    assert "no all-to-all -> attention -> all-to-all site found" in str(result)
    assert_untouched(gm, result)


def test_more_chunks_than_local_heads_skips_that_site_only():
    g = ranks.group(P)

    def fn(q, k, v):
        return attn_funcol(q, k, v, g)

    gm = trace(fn, _inputs())
    result = hcms_compile.rewrite(gm, chunks=3)  # 2 local heads
    assert "3 chunks requested but the site has 2 local head(s)" in result.sites[0].reason
    result = hcms_compile.rewrite(gm, chunks=(1, 2))
    assert "sum to 3, but the site has 2 local heads" in result.sites[0].reason
    assert_untouched(gm, result)


def test_one_rewritten_site_and_one_skipped_site_in_one_graph():
    g = ranks.group(P)

    def fn(q, k, v):
        x = attn_funcol(q, k, v, g)
        q2, k2, v2 = (_scatter_heads(t, g, strided=True) for t in (x, k, v))
        return _gather_heads(F.scaled_dot_product_attention(q2, k2, v2), g)

    gm = trace(fn, _inputs())
    result = hcms_compile.rewrite(gm, chunks=2)
    assert [s.status for s in result.sites] == ["rewritten", "skipped"]
    assert_untouched(gm, result)  # the second site's nodes are as they were
    inputs = [ranks.shard(torch.randn(B, P * S_LOCAL, H, D), 1, P) for _ in range(3)]
    want = ranks.run_on_ranks(gm, inputs, P)
    got = ranks.run_on_ranks(result.graph_module, inputs, P)
    for w, o in zip(want, got, strict=True):
        assert torch.equal(w, o)


def test_in_place_write_to_sent_storage_blocks_the_rewrite():
    g = ranks.group(P)

    def fn(q, k, v):
        b, s, h, d = q.shape
        recv = _head_blocks(q, g)
        q.mul_(0)  # after the send: the chunks, sent later, would see zeros
        q2 = recv.permute(1, 3, 0, 2, 4).reshape(b, h // P, P * s, d)
        k, v = (_scatter_heads(t, g) for t in (k, v))
        return _gather_heads(F.scaled_dot_product_attention(q2, k, v), g)

    for tracer in ("make_fx", "dynamo"):
        _skipped(fn, "writes in place to storage an input all-to-all sends", tracer=tracer)


def test_bit_reinterpreting_view_is_not_a_layout_op():
    g = ranks.group(P)

    def fn(q, k, v):
        q, k, v = (_scatter_heads(t, g) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v)
        b, h, s, d = o.shape
        send = o.reshape(b, h, P, s // P, d).permute(2, 0, 3, 1, 4).contiguous().view(torch.int32)
        return funcol.wait_tensor(funcol.all_to_all_single(send, None, None, g))

    _skipped(fn, "no attention output reaches an all-to-all")


def test_output_path_that_drops_the_head_axis():
    g = ranks.group(P)

    def fn(q, k, v):
        q, k, v = (_scatter_heads(t, g) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v).select(1, 0)  # [B, S, D]: one head kept
        b, s, d = o.shape
        send = o.reshape(b, P, s // P, d).transpose(0, 1).contiguous()
        return funcol.wait_tensor(funcol.all_to_all_single(send, None, None, g))

    _skipped(fn, "drops the head axis")


def test_one_send_buffer_for_q_k_and_v():
    g = ranks.group(P)

    def fn(q, k, v):
        b, s, h, d = q.shape
        send = q.reshape(b, s, P, h // P, d).permute(2, 0, 1, 3, 4).contiguous()
        q, k, v = (funcol.wait_tensor(funcol.all_to_all_single(send, None, None, g))
                   .permute(1, 3, 0, 2, 4).reshape(b, h // P, P * s, d) for _ in range(3))
        return _gather_heads(F.scaled_dot_product_attention(q, k, v), g)

    assert _rewritten(fn)[0].exchanges == 3


def test_local_input_computed_from_an_exchanged_input():
    g = ranks.group(P)

    def fn(q, k, v):
        q = _scatter_heads(q, g)
        return _gather_heads(F.scaled_dot_product_attention(q, q * 2, q * 3), g)

    _skipped(fn, "is computed from the exchanged inputs")


def test_back_to_back_blocks_where_the_second_starts_at_the_first_reassembly():
    g = ranks.group(P)

    def block(x):  # xDiT-style [B, H, S/P, D] in and out, no wait of its own after the exchange
        b, h, s, d = x.shape
        send = x.reshape(b, P, h // P, s, d).permute(1, 0, 2, 3, 4).contiguous()
        recv = funcol.all_to_all_single(send, None, None, g)
        qkv = recv.permute(1, 2, 0, 3, 4).reshape(b, h // P, P * s, d)
        o = F.scaled_dot_product_attention(qkv, qkv, qkv)
        back = o.reshape(b, h // P, P, s, d).permute(2, 0, 1, 3, 4).contiguous()
        return funcol.all_to_all_single(back, None, None, g).permute(1, 0, 2, 3, 4).reshape(b, h, s, d)

    def fn(q, k, v):
        return block(block(q.transpose(1, 2)))

    assert len(_rewritten(fn, exact="rounding")) == 2


def test_heads_padded_to_a_multiple_of_the_world_size():
    # "Ulysses anything": 6 heads on 4 ranks, padded to 8 with zero heads and trimmed after
    g = ranks.group(4)

    def fn(q, k, v):
        pad = [torch.zeros(*t.shape[:2], 2, t.shape[3]) for t in (q, k, v)]
        q, k, v = (torch.cat([t, z], dim=2) for t, z in zip((q, k, v), pad, strict=True))
        return attn_funcol(q, k, v, g)[:, :, :6]

    gm = trace(fn, [torch.randn(1, 16, 6, 8) for _ in range(3)], "dynamo")
    result = hcms_compile.rewrite(gm, chunks=2, exact="rounding")
    assert result.sites[0].rewritten and result.sites[0].local_heads == 2
    inputs = [ranks.shard(torch.randn(1, 64, 6, 8), 1, 4) for _ in range(3)]
    want, got = ranks.run_on_ranks(gm, inputs, 4), ranks.run_on_ranks(result.graph_module, inputs, 4)
    for w, o in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got), strict=True):
        assert torch.equal(w, o)


def test_keys_gathered_by_a_second_collective_usp_style():
    # USP shape: after the Ulysses exchange, k and v go through another collective (an all-gather
    # standing in for the ring) before attention. q and the output still pipeline by chunks; k and v
    # are computed whole and each chunk takes its heads' slice of them (the same group stands in
    # for the ring group so that LocalTensorMode can run it).
    g = ranks.group(P)

    def fn(q, k, v):
        q, k, v = (_scatter_heads(t, g) for t in (q, k, v))
        k, v = (funcol.all_gather_tensor(t.contiguous(), 2, g) for t in (k, v))
        return _gather_heads(F.scaled_dot_product_attention(q, k, v), g)

    (site,) = _rewritten(fn)
    assert site.exchanges == 1  # q's; k and v are local inputs


def _ring_attention(q, k, v, group):
    """Ring attention over `group`: the keys and values travel rank to rank by p2p (permute), each
    step attends to the block at hand, and the partial results merge by their log-sum-exp."""
    world = group.size()
    out = lse = None
    for step in range(world):
        o, step_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
        if out is None:
            out, lse = o, step_lse
        else:
            total = torch.logaddexp(lse, step_lse)
            out = out * torch.exp(lse - total).unsqueeze(-1) + o * torch.exp(step_lse - total).unsqueeze(-1)
            lse = total
        if step + 1 < world:
            ring = [(r + 1) % world for r in range(world)]
            # p2p send to the next rank (funcol's permute is an all-to-all of flat, uneven splits)
            k, v = (funcol.permute_tensor(t.contiguous().flatten(), ring, group).view(t.shape) for t in (k, v))
    return out


def test_ulysses_with_ring_attention_is_left_alone_with_a_reason():
    # USP: the Ulysses exchange feeds a ring attention (several attention calls on one q, merged by
    # log-sum-exp, keys and values passed on by p2p). Chunking it would mean chunking the whole ring
    # region, merges included; the pass proves sites of one attention op only, so it says so.
    # (The Ulysses group stands in for the ring group so that LocalTensorMode can run it.)
    g = ranks.group(P)

    def fn(q, k, v):
        q, k, v = (_scatter_heads(t, g) for t in (q, k, v))
        return _gather_heads(_ring_attention(q, k, v, g), g)

    gm = trace(fn, _inputs(), "dynamo")
    result = hcms_compile.rewrite(gm, chunks=2)
    assert len(result.sites) == P and not result.rewritten
    assert_untouched(gm, result)
    assert all("the query also feeds 1 other attention op(s)" in s.reason for s in result.sites), result


def _repeated_kv(kv_heads: int, style: str):
    g = ranks.group(P)

    def repeat(x, n):
        if style == "repeat_interleave":
            return torch.repeat_interleave(x, n, dim=1)
        b, h, s, d = x.shape  # Llama's repeat_kv
        return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)

    def fn(q, k, v):
        q = _scatter_heads(q, g)
        k, v = (_scatter_heads(t[:, :, :kv_heads], g) for t in (k, v))
        n = q.shape[1] // k.shape[1]
        return _gather_heads(F.scaled_dot_product_attention(q, repeat(k, n), repeat(v, n)), g)

    return fn


@pytest.mark.parametrize("style", ["repeat_interleave", "repeat_kv"])
def test_keys_repeated_after_the_exchange_chunk_by_kv_head(style):
    # 8 query and 4 KV heads over 2 ranks: 2 KV heads per rank, each repeated for 2 query heads
    (site,) = _rewritten(_repeated_kv(4, style), tracer="dynamo", heads=8)
    assert site.chunk_sizes == (2, 2) and site.exchanges == 3
    gm = trace(_repeated_kv(4, style), _inputs(8), "dynamo")
    assert "split a group of 2" in hcms_compile.rewrite(gm, chunks=(1, 3)).sites[0].reason


@pytest.mark.parametrize("style", ["repeat_interleave", "repeat_kv"])
def test_one_repeated_kv_head_per_rank_is_sliced_per_chunk(style):
    (site,) = _rewritten(_repeated_kv(2, style), tracer="dynamo")  # 4 query heads, 2 KV heads, 2 ranks
    assert site.chunk_sizes == (1, 1) and site.exchanges == 1


def test_keys_repeated_but_values_not_are_left_alone():
    # found by review: the repeat set the group for every KV input, and the unrepeated values were
    # cut to half their heads per chunk
    g = ranks.group(P)

    def fn(q, k, v):
        q, v = _scatter_heads(q, g), _scatter_heads(v, g)
        k = torch.repeat_interleave(_scatter_heads(k[:, :, : H // 2], g), 2, dim=1)
        return _gather_heads(F.scaled_dot_product_attention(q, k, v), g)

    _skipped(fn, "keys and values are not repeated alike after the exchange", tracer="dynamo")


def test_a_shared_kv_head_computed_from_the_exchanged_query_is_left_alone():
    # found by review: one KV head per rank is passed whole to every chunk, so it must exist before them
    g = ranks.group(P)

    def fn(q, k, v):
        q = _scatter_heads(q, g)
        return _gather_heads(F.scaled_dot_product_attention(q, q.mean(1, keepdim=True), q.amax(1, keepdim=True),
                                                            enable_gqa=True), g)

    _skipped(fn, "key is computed from the exchanged inputs", tracer="dynamo")


def test_grouped_query_attention_over_repeated_keys_is_left_alone():
    g = ranks.group(P)

    def fn(q, k, v):  # 2 KV heads per rank, repeated twice, read by 4 query heads each through enable_gqa
        q = _scatter_heads(q, g)
        k, v = (torch.repeat_interleave(_scatter_heads(t[:, :, :4], g), 2, dim=1) for t in (k, v))
        return _gather_heads(F.scaled_dot_product_attention(q, k, v, enable_gqa=True), g)

    gm = trace(fn, _inputs(16), "dynamo")
    (site,) = hcms_compile.rewrite(gm, chunks=2).sites
    assert not site.rewritten and "also grouped by" in site.reason, site


# -- why no per-head input arrives from an all-to-all ------------------------------------------


def test_attention_beside_a_ulysses_site_is_not_a_site():
    # cross attention on local tokens in a graph whose other attention is a Ulysses site
    g = ranks.group(P)

    def fn(q, k, v):
        plain = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return attn_funcol(q, k, v, g), plain

    gm = trace(fn, _inputs())
    result = hcms_compile.rewrite(gm, chunks=2)
    skipped = next(s for s in result.sites if s.status == "skipped")
    assert "query does not come from an all-to-all" in skipped.reason
    assert "this graph's all-to-alls feed other ops" in skipped.reason
    assert [s.status for s in result.sites].count("rewritten") == 1


def _graphs_of(fn, inputs) -> list[torch.fx.GraphModule]:
    """Every graph Dynamo hands its backend for `fn` (graph breaks allowed)."""
    graphs = []

    def keep(gm, _example):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=keep)(*inputs)
    return graphs


def _broken_site(g):
    """A Ulysses site with a graph break between its input exchanges and its attention."""

    def fn(q, k, v):
        q, k, v = (_scatter_heads(t, g) for t in (q, k, v))
        torch._dynamo.graph_break()
        return _gather_heads(F.scaled_dot_product_attention(q, k, v), g)

    return fn


def test_graph_break_between_exchange_and_attention_names_the_break():
    fn = _broken_site(ranks.group(P))
    graphs = _graphs_of(fn, _inputs())
    attention = [gm for gm in graphs if any(n.target is F.scaled_dot_product_attention for n in gm.graph.nodes)]
    (gm,) = attention
    result = hcms_compile.rewrite(gm, chunks=2)
    (site,) = result.sites
    assert site.status == "skipped"
    assert site.reason.startswith("query is a graph input: the all-to-all is in another graph (graph break?); "
                                  "compile with fullgraph=True or remove the break"), site.reason
    assert result.graph_module.code == gm.code


def test_backend_reports_a_site_split_by_a_graph_break_in_both_graphs():
    # the backend sees each graph alone; its report must say that the exchange graph sends exchanged
    # tensors out (not "no site found") and which graph held the exchange of the attention graph's site
    from hcms_compile.backend import SPLIT_EXCHANGE

    fn = _broken_site(ranks.group(P))
    backend = hcms_compile.make_backend(chunks=2, inner="aot_eager")
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend)(*_inputs())
    exchange, attention = backend.reports
    assert not exchange.sites
    assert exchange.split.startswith(f"{SPLIT_EXCHANGE}: graph 0 holds the all-to-all(s) ["), exchange.split
    assert "no all-to-all -> attention -> all-to-all site found" not in str(exchange)
    assert SPLIT_EXCHANGE in str(exchange)
    (site,) = attention.sites
    assert not site.rewritten and "is a graph input" in site.reason
    assert attention.split.startswith(f"{SPLIT_EXCHANGE}: graph 1 holds the attention, and graph 0 held the "
                                      "all-to-all"), attention.split
    assert attention.split in str(attention)


def test_backend_reports_no_split_for_whole_sites():
    g = ranks.group(P)
    backend = hcms_compile.make_backend(chunks=2, inner="aot_eager")
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(lambda q, k, v: attn_funcol(q, k, v, g), backend=backend, fullgraph=True)(*_inputs())
    (report,) = backend.reports
    assert report.sites[0].rewritten and report.split == ""


@pytest.mark.parametrize("tracer", ["make_fx", "make_fx_real"])
def test_make_fx_of_the_in_place_collective_is_rewritten(tracer):
    # make_fx records dist.all_to_all_single(out, x) as the non-functional c10d.alltoall_base_, which
    # writes `out` and returns a Work handle nothing waits on; its chunks become functional all-to-alls
    g = ranks.group(P)

    def fn(q, k, v):
        return attn_dist_inplace(q, k, v, g)

    _rewritten(fn, tracer=tracer)


def _in_place_exchange(exchange):
    """The funcol layout with each all-to-all done by `exchange(send, group)` (a dist.all_to_all_single)."""
    g = ranks.group(P)

    def fn(q, k, v):
        return funcol_out(F.scaled_dot_product_attention(*(funcol_in(t, g, exchange) for t in (q, k, v))), g)

    return fn


def _async(send, group):
    out = torch.empty_like(send)
    dist.all_to_all_single(out, send, group=group, async_op=True).wait()
    return out


def _zeroed_first(send, group):
    out = torch.empty_like(send)
    out.zero_()  # the buffer the exchange writes is zero_'s result, not a fresh buffer
    dist.all_to_all_single(out, send, group=group)
    return out


READS: list[torch.Tensor] = []


def _read_before(send, group):
    out = torch.empty_like(send)
    READS.append(out.sum())  # read before the exchange fills it (the function returns it)
    dist.all_to_all_single(out, send, group=group)
    return out


def _uneven(send, group):
    out = torch.empty_like(send)
    rows = send.shape[0]
    dist.all_to_all_single(out, send, [rows // P] * P, [rows // P] * P, group=group)
    return out


def _uneven_split_sizes(send, group):
    # rows are P blocks, so uneven sizes of the same total give the buffer a shape HCMS cannot prove
    flat = send.flatten()
    out = torch.empty_like(flat)
    n = flat.numel()
    dist.all_to_all_single(out, flat, [n // 4, n - n // 4], [n // 4, n - n // 4], group=group)
    return out.view(send.shape)


MAKE_FX_HINT = ("HCMS rewrites make_fx's record of dist.all_to_all_single(out, x) only when it runs synchronously "
                "into a fresh buffer of x's shape and dtype that nothing touches before it")


@pytest.mark.parametrize(("exchange", "reason"), [
    (_async, "writes in place with async_op=True: make_fx records no wait on its Work"),
    (_zeroed_first, "writes in place but zero_ is not a fresh buffer"),
    (_read_before, "writes in place but the buffer is read or written before the exchange fills it"),
])
def test_make_fx_of_an_unproven_in_place_collective_says_why(exchange, reason):
    fn = _in_place_exchange(exchange)

    def with_reads(q, k, v):
        READS.clear()
        return fn(q, k, v), *READS

    result = _skipped(with_reads, reason)
    site_reason = result.sites[0].reason
    assert MAKE_FX_HINT in site_reason and "trace with torch.compile or torch.export" in site_reason, site_reason


def test_make_fx_of_the_in_place_collective_with_explicit_even_splits_is_rewritten():
    _rewritten(_in_place_exchange(_uneven))


def test_make_fx_of_the_in_place_collective_with_uneven_splits_is_a_skip():
    _skipped(_in_place_exchange(_uneven_split_sizes), "uneven all-to-all split sizes")


def _into_buffer(make_buffer):
    """An in-place all-to-all into the buffer `make_buffer(send)` makes, in the funcol layout."""
    g = ranks.group(P)

    def exchange(send, group):
        out = make_buffer(send)
        dist.all_to_all_single(out, send, group=group)
        return out

    def fn(q, k, v):
        return funcol_out(F.scaled_dot_product_attention(*(funcol_in(t, g, exchange) for t in (q, k, v))), g)

    return fn


@pytest.mark.parametrize("tracer", ["dynamo", "export", "aot"])
def test_in_place_exchange_into_a_zeroed_or_new_buffer_is_rewritten(tracer):
    for make_buffer in (torch.zeros_like, lambda s: s.new_empty(s.shape)):
        _rewritten(_into_buffer(make_buffer), tracer=tracer)


@pytest.mark.parametrize("tracer", ["dynamo", "aot"])
def test_in_place_exchange_into_a_converting_buffer_is_named(tracer):
    # copy_ into a float64 buffer converts: the buffer is no alias of the exchanged tensor
    fn = _into_buffer(lambda s: torch.empty_like(s, dtype=torch.float64))
    _skipped(fn, "a buffer an all-to-all result is copied into, but not as a fresh buffer filled once with the "
                 "same shape and dtype", tracer=tracer)


@pytest.mark.parametrize("tracer", ["make_fx", "dynamo"])
def test_an_op_between_exchange_and_attention_that_is_not_a_layout_op_is_named(tracer):
    g = ranks.group(P)

    def fn(q, k, v):
        b, s, h, d = q.shape
        # the received sequence blocks concatenated in reverse order: a reordering cat, not a regroup
        recv = [_head_blocks(t, g) for t in (q, k, v)]
        q, k, v = (torch.cat(list(reversed(r.unbind(0))), dim=2).permute(0, 2, 1, 3).reshape(b, h // P, P * s, d)
                   for r in recv)
        return _gather_heads(F.scaled_dot_product_attention(q, k, v), g)

    result = _skipped(fn, "which is not a layout op HCMS follows", tracer=tracer)
    reason = result.sites[0].reason
    assert reason.startswith("query reaches cat") and "cat)" in reason, reason


def _backward_graph_of_default_partition(fn, inputs) -> torch.fx.GraphModule:
    """The backward graph AOTAutograd's default partitioner makes (the backend uses the min-cut one,
    which saves the attention's outputs; the default one recomputes the forward attention)."""
    from functorch.compile import default_partition, make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, _example):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep, partition_fn=default_partition)
    leaves = [x.detach().requires_grad_() for x in inputs]
    torch.compile(fn, backend=backend, fullgraph=True)(*leaves).sum().backward()
    return graphs[-1]


def test_a_recomputed_forward_attention_in_the_backward_graph_is_named():
    g = ranks.group(P)
    gm = _backward_graph_of_default_partition(lambda q, k, v: attn_funcol(q, k, v, g, is_causal=True), _inputs())
    result = hcms_compile.rewrite(gm, chunks=2)
    recomputed = [s for s in result.sites if not s.attention.endswith("_backward")]
    assert recomputed, "AOTAutograd's default partitioner no longer recomputes the forward attention"
    for site in recomputed:
        assert site.status == "skipped"
        assert site.reason.startswith("a forward attention op recomputed from saved tensors in the backward graph")
    # the backward op beside it is rewritten, and the recomputed op is still there, untouched
    assert any(s.rewritten for s in result.sites)
    code = result.graph_module.code
    assert gm.code.count("_scaled_dot_product_flash_attention_for_cpu.default(") == \
        code.count("_scaled_dot_product_flash_attention_for_cpu.default(")


def test_pieces_shared_by_two_joins_are_followed_as_selects():
    # q and k are two cats of the same unbound pieces: each cat is a layout op of the received tensor,
    # and the pieces, read by both, are replayed like any select
    g = ranks.group(P)

    def fn(q, k_in, v):
        pieces = _head_blocks(q, g).unbind(0)
        q = torch.cat(pieces, dim=1).transpose(1, 2)
        k = torch.cat([pieces[0], pieces[1]], dim=1).transpose(1, 2)
        return _gather_heads(F.scaled_dot_product_attention(q, k, _scatter_heads(v + k_in, g)), g)

    for tracer in ("make_fx", "dynamo"):
        (site,) = _rewritten(fn, tracer=tracer)
        assert site.exchanges == 2  # q and k share one exchange, v has its own


@pytest.mark.parametrize("tracer", ["make_fx", "dynamo"])
def test_a_same_dtype_cast_on_the_output_path_is_an_identity(tracer):
    # yunchang's one-step ring merge casts its fp32 output to fp32 (`out.to(torch.float32)`) twice
    g = ranks.group(P)

    def fn(q, k, v):
        out = F.scaled_dot_product_attention(*(_scatter_heads(t, g) for t in (q, k, v)))
        return _gather_heads(out.to(torch.float32).to(q.dtype), g)

    (site,) = _rewritten(fn, tracer=tracer)
    assert site.chunk_sizes == (1, 1)


@pytest.mark.parametrize("tracer", ["make_fx", "dynamo"])
def test_a_converting_cast_on_the_output_path_is_not_an_identity(tracer):
    # fp64 values are not the fp32 ones: the cast computes, so the output path is not layout only
    g = ranks.group(P)

    def fn(q, k, v):
        out = F.scaled_dot_product_attention(*(_scatter_heads(t, g) for t in (q, k, v)))
        return _gather_heads(out.to(torch.float64), g)

    _skipped(fn, "no attention output reaches an all-to-all", tracer=tracer)


def test_exchanges_around_decomposed_attention_say_there_is_no_attention_op():
    # SDPA under sdpa_kernel(SDPBackend.MATH) reaches AOTAutograd's graphs as bmm and softmax
    g = ranks.group(P)

    def fn(q, k, v):
        q, k, v = (_scatter_heads(t, g) for t in (q, k, v))
        return _gather_heads(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v, g)

    result = hcms_compile.rewrite(trace(fn, _inputs()), chunks=2)
    assert result.sites == []
    assert "the graph has 4 all-to-all(s) but no attention op: attention is computed by matrix products and " \
           "softmax" in str(result)
    assert "sdpa_kernel(SDPBackend.MATH)" in result.note
