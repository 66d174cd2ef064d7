"""The cost model: site costs read from traced graphs, the pipeline simulation, and the chunk choice."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.distributed._functional_collectives as funcol
from functorch.compile import make_boxed_func
from hcms_compile.passes.cost_model import LOOKAHEAD, SiteCost, predict, site_cost
from hcms_compile.passes.match import Site, match_sites, value_of
from hcms_compile.passes.plan import Choice, choose_chunks, even_split
from hcms_compile.passes.profiles import (
    BUILTIN_PROFILES,
    DeviceProfile,
    default_profile,
    with_dispatch_from_environment,
)
from torch._dynamo.backends.common import aot_autograd

from hcms_compile.testing import ranks
from hcms_compile.testing.layouts import LAYOUTS
from hcms_compile.testing.tracing import trace

P, B, S, H, D = 2, 2, 64, 4, 8  # S global tokens; H global heads: 2 local heads per rank


def _inputs(layout: str, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    shape = LAYOUTS[layout].local_shape(B, S, H, D, P)
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


def _site(layout: str = "funcol", causal: bool = False, dtype: torch.dtype = torch.float32) -> Site:
    group = ranks.group(P)
    fn = LAYOUTS[layout].fn
    gm = trace(lambda q, k, v: fn(q, k, v, group, is_causal=causal), _inputs(layout, dtype))
    (site,) = match_sites(gm.graph)
    assert isinstance(site, Site), site
    return site


@pytest.fixture(scope="module")
def training_forward() -> Site:
    """The site of AOTAutograd's training forward graph, which saves q, k, v, out and log-sum-exp."""
    group = ranks.group(P)
    graphs = []

    def keep(gm, _example):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    inputs = [t.requires_grad_() for t in _inputs("funcol")]
    compiled = torch.compile(lambda q, k, v: LAYOUTS["funcol"].fn(q, k, v, group), fullgraph=True,
                             backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    compiled(*inputs)  # the backward graph is compiled only when a backward runs
    (site,) = [s for s in match_sites(graphs[0].graph) if isinstance(s, Site)]
    return site


def _scatter_heads(x: torch.Tensor, group) -> torch.Tensor:
    b, s, h, d = x.shape
    send = x.reshape(b, s, P, h // P, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = funcol.wait_tensor(funcol.all_to_all_single(send, None, None, group))
    return recv.permute(1, 3, 0, 2, 4).reshape(b, h // P, P * s, d)


def _gather_heads(o: torch.Tensor, group) -> torch.Tensor:
    b, h, s, d = o.shape
    send = o.reshape(b, h, P, s // P, d).permute(2, 0, 3, 1, 4).contiguous()
    recv = funcol.wait_tensor(funcol.all_to_all_single(send, None, None, group))
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s // P, P * h, d)


def _backward_site(causal: bool) -> Site:
    """A backward site as a training graph has it: the output gradient exchanged in, q, k, v, out and
    log-sum-exp local, dq, dk, dv exchanged out."""
    group = ranks.group(P)

    def fn(grad, q, k, v, out, lse):
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _scatter_heads(grad, group), q, k, v, out, lse, 0.0, causal)
        return tuple(_gather_heads(g, group) for g in grads)

    local = [torch.randn(B, H // P, S, D) for _ in range(4)]
    gm = trace(fn, [torch.randn(B, S // P, H, D), *local, torch.randn(B, H // P, S)])
    (site,) = match_sites(gm.graph)
    assert isinstance(site, Site), site
    return site


def _nbytes(node) -> int:
    val = value_of(node)
    return val.numel() * val.element_size()


# -- site_cost on traced graphs ------------------------------------------------------------------


def test_forward_flops_count_both_matmuls_and_halve_when_causal():
    plain, causal = site_cost(_site(causal=False)), site_cost(_site(causal=True))
    assert plain.attention_flops == 4 * B * (H // P) * S * S * D
    assert not plain.causal and causal.causal
    assert causal.attention_flops == plain.attention_flops / 2


@pytest.mark.parametrize("causal", [False, True])
def test_backward_flops_are_two_and_a_half_forwards(causal):
    backward, forward = site_cost(_backward_site(causal)), site_cost(_site(causal=causal))
    assert backward.backward and not forward.backward and backward.causal == causal
    assert backward.attention_flops == 2.5 * forward.attention_flops
    # backward: the output gradient comes in, dq, dk and dv go out
    assert (len(backward.input_bytes), len(backward.output_bytes)) == (1, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["funcol", "fused_qkv"])
def test_exchange_bytes_are_the_send_buffers(layout, dtype):
    site = _site(layout, dtype=dtype)
    cost = site_cost(site)
    assert cost.input_bytes == tuple(_nbytes(ex.send_path[-1]) for ex in site.inputs)
    assert cost.output_bytes == tuple(_nbytes(ex.send_path[-1]) for ex in site.outputs)
    per_tensor = B * (S // P) * H * D * dtype.itemsize  # each rank sends its S/P tokens of all heads
    assert sum(cost.input_bytes) == 3 * per_tensor and cost.output_bytes == (per_tensor,)
    assert cost.collectives == len(site.inputs) + 1
    assert (cost.world_size, cost.local_heads) == (P, H // P)


def test_copy_bytes_follow_the_paths_that_copy():
    # funcol copies on every path (contiguous before the exchange, reshape of a permuted receive buffer);
    # diffusers hands attention a strided view of the receive buffer: no receive copy
    funcol, diffusers = site_cost(_site("funcol")), site_cost(_site("diffusers"))
    assert funcol.send_copy_bytes == funcol.receive_copy_bytes == sum(funcol.input_bytes)
    assert funcol.output_copy_bytes == sum(funcol.output_bytes)
    assert diffusers.send_copy_bytes == sum(diffusers.input_bytes)
    assert diffusers.receive_copy_bytes == 0


def test_reassembly_counts_outputs_and_escapes(training_forward):
    # a make_fx graph saves nothing: only the output is concatenated
    plain = site_cost(_site())
    assert plain.reassembly_bytes == sum(plain.output_bytes)
    # AOTAutograd's forward saves q, k, v, out (each B x H/P x S x D) and log-sum-exp (B x H/P x S)
    saved = 4 * B * (H // P) * S * D * 4 + B * (H // P) * S * 4
    forward = site_cost(training_forward)
    assert training_forward.escapes and forward.reassembly_bytes == sum(forward.output_bytes) + saved
    backward = site_cost(_backward_site(False))
    assert backward.reassembly_bytes == sum(backward.output_bytes)


# -- predict on hand-made costs ------------------------------------------------------------------


def _profile(**overrides) -> DeviceProfile:
    """1 byte/s crossing, 1 FLOP/s, 1 byte/s copies, no latency: costs read directly as seconds."""
    base = dict(name="unit", a2a_bandwidth=1.0, a2a_latency=0.0, attention_flops=1.0, attention_latency=0.0,
                copy_bandwidth=1.0, contention=0.0, model_error=0.05, estimate=True, source="test")
    return DeviceProfile(**{**base, **overrides})


def _cost(heads: int, inputs: tuple[float, ...], attention: float, outputs: tuple[float, ...],
          copies: tuple[int, int, int, int] = (0, 0, 0, 0)) -> SiteCost:
    """A site whose exchanges take `inputs` / `outputs` seconds at P=2 under `_profile()`."""
    send, receive, output, reassembly = copies
    return SiteCost(attention_flops=attention, input_bytes=tuple(2 * s for s in inputs),
                    output_bytes=tuple(2 * s for s in outputs), send_copy_bytes=send, receive_copy_bytes=receive,
                    output_copy_bytes=output, reassembly_bytes=reassembly, world_size=2, local_heads=heads,
                    backward=False, causal=False)


def test_plain_site_is_the_serial_sum():
    cost = _cost(4, inputs=(1, 2, 3), attention=5, outputs=(7,), copies=(8, 16, 32, 64))
    profile = _profile(a2a_latency=0.5, attention_latency=0.25, contention=1.0)
    plain = predict(cost, profile, (4,))
    copies = 2 * (8 + 16 + 32) / 1.0  # read and write; no reassembly without chunks
    comm = (1 + 2 + 3 + 7) + 4 * 0.5
    assert plain.time_s == pytest.approx(copies + comm + 5.25)
    assert (plain.comm_s, plain.compute_s, plain.copy_s) == pytest.approx((comm, 5.25, copies))
    assert plain.exposed_comm_s == pytest.approx(comm) and plain.contention_s == pytest.approx(0)
    assert plain.rho == pytest.approx(comm / (comm + 5.25))
    assert (plain.gain_s, plain.gain, plain.chunks) == (0, 0, (4,))


def test_two_chunks_by_hand():
    cost = _cost(2, inputs=(4,), attention=6, outputs=(2,))
    # in0 [0,2]; in1 [2,4] beside attention0 [2,5]; out0 [5,6] beside attention1 [5,8]; out1 [8,9]
    two = predict(cost, _profile(), (1, 1))
    assert two.time_s == pytest.approx(9) and two.gain_s == pytest.approx(12 - 9)
    assert two.gain == pytest.approx(3 / 12) and two.exposed_comm_s == pytest.approx(2 + 1)
    assert two.rho == pytest.approx(6 / 12)
    # contention 0.5: attention0 does 1 s of work while in1 runs [2,4], ends at 6; out0 [6,7];
    # attention1 does 0.5 s while out0 runs, ends at 9.5; out1 [9.5,10.5]
    slowed = predict(cost, _profile(contention=0.5), (1, 1))
    assert slowed.time_s == pytest.approx(10.5)
    assert slowed.contention_s == pytest.approx(0.5 * (2 + 1))


def test_three_chunks_in_the_lookahead_order_issue_each_output_before_the_next_input():
    # the order the recorded benches ran (chunk c+2's send after chunk c's output)
    cost = _cost(3, inputs=(6,), attention=6, outputs=(3,))
    # in0 [0,2]; in1 [2,4] beside attention0 [2,4]; out0 [4,5] goes before in2 [5,7]; attention1 [4,6];
    # out1 [7,8]; attention2 waits for in2: [7,9]; out2 [9,10]. (in2 before out0 would end at 9.)
    three = predict(cost, _profile(), (1, 1, 1), order=LOOKAHEAD)
    assert three.time_s == pytest.approx(10)
    assert three.exposed_comm_s == pytest.approx(2 + 1 + 1)


def test_three_chunks_in_the_inputs_first_order():
    cost = _cost(3, inputs=(6,), attention=6, outputs=(3,))
    # every input first: in0 [0,2], in1 [2,4], in2 [4,6]; attention0 [2,4], attention1 [4,6], attention2 [6,8];
    # the outputs queue behind the inputs: out0 [6,7], out1 [7,8], out2 [8,9]
    three = predict(cost, _profile(), (1, 1, 1))
    assert three.time_s == pytest.approx(9) and three.order == "inputs_first"


def test_full_contention_stops_compute_while_an_exchange_runs():
    cost = _cost(2, inputs=(4,), attention=6, outputs=(2,))
    # attention0 starts at 2 but waits out in1 [2,4]: [4,7]; out0 [7,8]; attention1 waits it out: [8,11]
    assert predict(cost, _profile(contention=1.0), (1, 1)).time_s == pytest.approx(12)


def test_first_input_and_last_output_are_never_hidden():
    # attention-bound: every exchange but chunk 0's inputs and the last chunk's output hides
    cost = _cost(4, inputs=(1, 1, 2), attention=64, outputs=(2,))
    for chunks in [(1, 1, 1, 1), (2, 1, 1), (1, 3)]:
        got = predict(cost, _profile(), chunks)
        first, last = chunks[0] / 4 * 4, chunks[-1] / 4 * 2
        assert got.time_s == pytest.approx(first + 64 + last), chunks
        assert got.exposed_comm_s == pytest.approx(first + last), chunks


def test_uneven_chunks_follow_the_emitted_order():
    cost = _cost(3, inputs=(6,), attention=3, outputs=(3,))
    # (2, 1): in0 [0,4]; in1 [4,6] beside attention0 [4,6]; out0 [6,8] beside attention1 [6,7]; out1 [8,9]
    assert predict(cost, _profile(), (2, 1)).time_s == pytest.approx(9)
    # (1, 2): in0 [0,2]; in1 [2,6] beside attention0 [2,3]; out0 waits for in1: [6,7] beside
    # attention1 [6,8]; out1 [8,10]
    assert predict(cost, _profile(), (1, 2)).time_s == pytest.approx(10)
    assert predict(cost, _profile(), (3,)).time_s == pytest.approx(12)


def test_chunking_pays_for_latency_and_reassembly():
    cost = _cost(2, inputs=(4,), attention=6, outputs=(2,), copies=(0, 0, 0, 1))
    got = predict(cost, _profile(a2a_latency=0.25), (1, 1))
    # four calls instead of two (one more latency each way, both hidden except out1's), then a 2 s copy
    assert got.time_s == pytest.approx(0.25 + 2 + 6 + 0.25 + 1 + 2)
    assert got.copy_s == pytest.approx(2)


def test_predict_rejects_sizes_that_do_not_cover_the_heads():
    cost = _cost(4, inputs=(1,), attention=1, outputs=(1,))
    for bad in [(), (2, 1), (4, 0), (2.0, 2)]:
        with pytest.raises(ValueError, match="chunk sizes"):
            predict(cost, _profile(), bad)


# -- choose_chunks -------------------------------------------------------------------------------


def test_nothing_to_hide_leaves_the_site_alone():
    cost = _cost(4, inputs=(0.001,), attention=100, outputs=(0.001,))
    choice = choose_chunks(cost, _profile(a2a_latency=0.001), units=4)
    assert choice.chunk_sizes == (4,)
    assert choice.reason.startswith("rho 0.0") and choice.reason.endswith("nothing to hide"), choice.reason


def test_gain_below_the_model_error_leaves_the_site_alone():
    cost = _cost(4, inputs=(4,), attention=8, outputs=(4,))
    choice = choose_chunks(cost, _profile(model_error=0.5), units=4)
    assert choice.chunk_sizes == (4,)
    assert 0 < choice.best.gain < 0.5
    assert choice.reason == f"best C={len(choice.best.chunks)} gains {choice.best.gain * 100:.0f}% < model error " \
                            "50%: left alone"


def test_latency_that_outweighs_the_overlap_leaves_the_site_alone():
    cost = _cost(4, inputs=(1,), attention=1, outputs=(1,))
    choice = choose_chunks(cost, _profile(a2a_latency=10.0), units=4)
    assert choice.chunk_sizes == (4,) and choice.best.gain < 0
    assert choice.reason.startswith("best C=2 predicted") and "slower" in choice.reason, choice.reason


def test_comm_near_compute_is_chunked():
    cost = _cost(4, inputs=(4,), attention=8, outputs=(4,))
    choice = choose_chunks(cost, _profile(a2a_latency=0.01, attention_latency=0.01), units=4)
    assert len(choice.chunk_sizes) > 1 and sum(choice.chunk_sizes) == 4
    assert choice.best.chunks == choice.chunk_sizes
    assert choice.best.time_s == min(c.time_s for c in choice.candidates)
    assert choice.best.gain >= 0.05
    assert choice.reason == (f"C={len(choice.chunk_sizes)} predicted {choice.best.gain * 100:.0f}% faster "
                             f"(rho {choice.plain.rho * 100:.0f}%)")
    assert [len(c.chunks) for c in choice.candidates] == [2, 3, 4]


def test_ties_go_to_the_smaller_chunk_count():
    # comm-bound with dyadic numbers: every C >= 2 keeps the comm stream busy to exactly 2 s
    cost = _cost(4, inputs=(1,), attention=0.25, outputs=(1,))
    choice = choose_chunks(cost, _profile(), units=4)
    assert {c.time_s for c in choice.candidates} == {2.0}
    assert choice.chunk_sizes == (2, 2)


def test_grouped_query_attention_chunks_whole_groups():
    cost = _cost(10, inputs=(10,), attention=20, outputs=(10,))
    choice = choose_chunks(cost, _profile(), units=5, group=2)
    assert [c.chunks for c in choice.candidates] == [(6, 4), (4, 4, 2), (4, 2, 2, 2), (2, 2, 2, 2, 2)]
    one = choose_chunks(_cost(2, inputs=(1,), attention=1, outputs=(1,)), _profile(), units=1, group=2)
    assert one.chunk_sizes == (2,) and one.candidates == () and "nothing to chunk" in one.reason
    with pytest.raises(ValueError, match="units"):
        choose_chunks(cost, _profile(), units=4, group=2)


def test_max_chunks_caps_the_candidates():
    cost = _cost(8, inputs=(8,), attention=8, outputs=(8,))
    assert [len(c.chunks) for c in choose_chunks(cost, _profile(), units=8, max_chunks=3).candidates] == [2, 3]


def test_even_splits_match_the_planner():
    cost = _cost(1, inputs=(1,), attention=1, outputs=(1,))
    for units in range(2, 12):
        cost = dataclasses.replace(cost, local_heads=units)
        got = [c.chunks for c in choose_chunks(cost, _profile(), units=units, max_chunks=units).candidates]
        assert got == [even_split(units, c) for c in range(2, units + 1)]


def test_the_choice_is_a_pure_function_of_its_inputs():
    cost = _cost(6, inputs=(3, 3, 3), attention=11, outputs=(3,), copies=(5, 5, 5, 5))
    profile = BUILTIN_PROFILES["h200-pcie"]
    first = choose_chunks(cost, profile, units=6)
    # a profile that went through JSON (as a saved one does) plans the same
    again = choose_chunks(dataclasses.replace(cost), DeviceProfile.from_json(profile.to_json()), units=6)
    assert isinstance(first, Choice) and first == again


# -- built-in profiles ---------------------------------------------------------------------------


def test_builtin_profiles_are_labelled_estimates():
    assert set(BUILTIN_PROFILES) == {"cpu-gloo", "h100-nvlink", "h200-nvlink", "h100-pcie", "h200-pcie",
                                     "h100-ib", "h200-ib"}
    for name, profile in BUILTIN_PROFILES.items():
        assert profile.name == name and profile.estimate and len(profile.source) > 40
        assert DeviceProfile.from_json(profile.to_json()) == profile
    # NCCL's SM-driven NVLink kernels contend more than the network paths
    assert BUILTIN_PROFILES["h200-nvlink"].contention > BUILTIN_PROFILES["h200-ib"].contention


def test_default_profile_picks_by_device_and_interconnect():
    assert default_profile("cpu") is BUILTIN_PROFILES["cpu-gloo"]
    assert default_profile("cuda", "NVIDIA H200", "pcie") is BUILTIN_PROFILES["h200-pcie"]
    assert default_profile("cuda", "NVIDIA H100 80GB HBM3") is BUILTIN_PROFILES["h100-nvlink"]
    other = default_profile("cuda", "NVIDIA A100-SXM4-80GB", "ib")
    assert other.name == "cuda-ib" and "A100" in other.source and other.a2a_bandwidth == 45e9
    with pytest.raises(ValueError, match="interconnect"):
        default_profile("cuda", "NVIDIA H200", "ethernet")
    with pytest.raises(ValueError, match="device type"):
        default_profile("mps")


def test_profile_validation_names_the_field():
    good = _profile().to_json()
    for field, bad in [("a2a_bandwidth", 0.0), ("attention_flops", -1.0), ("a2a_latency", math.nan),
                       ("contention", 1.5), ("model_error", -0.1), ("world_size", 0), ("name", "")]:
        with pytest.raises(ValueError, match=field):
            DeviceProfile(**{**good, field: bad})
    with pytest.raises(ValueError, match="unknown"):
        DeviceProfile.from_json({**good, "bandwidth": 1.0})
    with pytest.raises(ValueError, match="missing"):
        DeviceProfile.from_json({k: v for k, v in good.items() if k != "source"})


def test_background_figures_chunk_on_pcie_but_not_on_nvlink():
    # BACKGROUND.md's Wan2.2-like case: H=40, D=128, 56,000 tokens on 4 ranks, bf16: 28.4 ms of attention
    # against 430 MB crossing per rank in the four all-to-alls
    heads, dim, tokens, world = 40, 128, 56_000, 4
    tensor = tokens // world * heads * dim * 2
    cost = SiteCost(attention_flops=4.0 * (heads // world) * tokens * tokens * dim, input_bytes=(tensor,) * 3,
                    output_bytes=(tensor,), send_copy_bytes=3 * tensor, receive_copy_bytes=3 * tensor,
                    output_copy_bytes=tensor, reassembly_bytes=tensor, world_size=world, local_heads=heads // world,
                    backward=False, causal=False)
    nvlink = choose_chunks(cost, BUILTIN_PROFILES["h200-nvlink"], units=heads // world)
    pcie = choose_chunks(cost, BUILTIN_PROFILES["h200-pcie"], units=heads // world)
    assert 25e-3 < nvlink.plain.compute_s < 30e-3
    assert nvlink.chunk_sizes == (10,) and "nothing to hide" in nvlink.reason
    assert len(pcie.chunk_sizes) > 1 and pcie.plain.rho > 0.2


# -- the Hopper scheduling rules (shared/PERFORMANCE.md, section 2) ------------------------------------------


def _two_tensor_site() -> SiteCost:
    """2 chunks; per chunk: two input exchanges of 1 s, a 0.5 s receive copy (at copy_bandwidth 4),
    3 s of attention, one 1 s output exchange."""
    return dataclasses.replace(_cost(2, inputs=(2, 2), attention=6, outputs=(2,)), receive_copy_bytes=2)


def test_rule_b_an_exchange_already_running_shares_with_a_starting_attention():
    # not persistent, contention 0: in0 [0,2]; copy0 [2,2.5]; in1a [2,3] and in1b [3,4] beside attention0
    # [2.5,5.5]; copy1 [5.5,6]; out0 [5.5,6.5] beside attention1 [6,9]; out1 [9,10]
    assert predict(_two_tensor_site(), _profile(copy_bandwidth=4.0), (1, 1)).time_s == pytest.approx(10)


def test_rule_a_an_exchange_ready_under_a_persistent_attention_waits_for_its_end():
    # in1a [2,3] was running when attention0 started at 2.5 (rule b: shares); in1b becomes ready at 3 under
    # the persistent kernel and waits for its end: [5.5,6.5]; copy1 [6.5,7]; out0 [6.5,7.5]; attention1 [7,10]
    # starts while out0 runs (shares); out1 [10,11]
    profile = _profile(copy_bandwidth=4.0, persistent_attention=True)
    assert predict(_two_tensor_site(), profile, (1, 1)).time_s == pytest.approx(11)
    # contention 0.5: copy0 beside in1a takes [2,3]; attention0 and in1b are ready together at 3, and the
    # queued attention wins (rule c): [3,6]; in1b [6,7]; copy1 beside out0 [7,8]; attention1 [8,11]; out1 [11,12]
    slowed = predict(_two_tensor_site(), dataclasses.replace(profile, contention=0.5), (1, 1))
    assert slowed.time_s == pytest.approx(12)


def test_rule_c_the_race_at_an_attention_boundary():
    cost = _cost(2, inputs=(4,), attention=6, outputs=(2,))
    persistent = _profile(persistent_attention=True)
    # several hardware queues: at 2, attention0 (queued) beats in1: in1 [5,7]; attention1 [7,10]; out0 ready at
    # 7 with attention1 and loses again: [10,11]; out1 [11,12]: no overlap at all, the plain site's 12 s
    assert predict(cost, persistent, (1, 1)).time_s == pytest.approx(12)
    # launch order (CUDA_DEVICE_MAX_CONNECTIONS=1): in1 and out0 were launched before the attention they race,
    # so they go first and share: in1 [2,4], attention0 [2,5]; out0 [5,6], attention1 [5,8]; out1 [8,9]
    ordered = dataclasses.replace(persistent, launch_order_dispatch=True)
    assert predict(cost, ordered, (1, 1)).time_s == pytest.approx(9)
    # sharing costs contention: the old model's 10.5 s (see test_two_chunks_by_hand)
    assert predict(cost, dataclasses.replace(ordered, contention=0.5), (1, 1)).time_s == pytest.approx(10.5)


def test_rule_d_copy_engine_exchanges_overlap_fully():
    # persistent attention does not block them and contention does not apply: the non-persistent, contention-0 10 s
    profile = _profile(copy_bandwidth=4.0, persistent_attention=True, copy_engine_exchange=True, contention=0.9)
    assert predict(_two_tensor_site(), profile, (1, 1)).time_s == pytest.approx(10)
    cost = _cost(2, inputs=(4,), attention=6, outputs=(2,))
    assert predict(cost, dataclasses.replace(profile, copy_bandwidth=1.0), (1, 1)).time_s == pytest.approx(9)


def test_fused_exchanges_pay_one_latency_per_chunk_and_direction():
    cost = _cost(2, inputs=(1, 1, 1), attention=0.5, outputs=(1,))
    profile = _profile(a2a_latency=0.25)
    plain, fused_plain = predict(cost, profile, (2,)), predict(cost, profile, (2,), fused=True)
    assert plain.time_s == pytest.approx(3 + 0.5 + 1 + 4 * 0.25)
    assert fused_plain.fused and fused_plain.time_s == pytest.approx(plain.time_s - 2 * 0.25)
    assert fused_plain.gain_s == pytest.approx(0.5)  # against the plain site as traced
    two, two_fused = predict(cost, profile, (1, 1)), predict(cost, profile, (1, 1), fused=True)
    assert two.comm_s - two_fused.comm_s == pytest.approx(2 * 2 * 0.25)


def test_choose_chunks_compares_fused_and_unfused_forms():
    cost = _cost(4, inputs=(1, 1, 1), attention=1, outputs=(1,))
    choice = choose_chunks(cost, _profile(a2a_latency=0.5), units=4)
    forms = [(len(c.chunks), c.fused) for c in choice.candidates]
    assert forms == [(1, True), (2, False), (2, True), (3, False), (3, True), (4, False), (4, True)]
    assert choice.fused and choice.best.fused and choice.reason.split(" predicted")[0].endswith("fused")
    unfused = choose_chunks(cost, _profile(a2a_latency=0.5), units=4, fused=(False,))
    assert not unfused.fused and all(not c.fused for c in unfused.candidates)


def test_new_profile_fields_default_so_old_profiles_load():
    old = {k: v for k, v in _profile().to_json().items()
           if k not in ("persistent_attention", "copy_engine_exchange", "launch_order_dispatch", "copy_latency",
                        "a2a_local_bandwidth")}
    loaded = DeviceProfile.from_json(old)
    assert not (loaded.persistent_attention or loaded.copy_engine_exchange or loaded.launch_order_dispatch)
    assert BUILTIN_PROFILES["h200-nvlink"].persistent_attention and BUILTIN_PROFILES["h100-ib"].persistent_attention
    assert not BUILTIN_PROFILES["cpu-gloo"].persistent_attention
    with pytest.raises(ValueError, match="persistent_attention"):
        DeviceProfile(**{**_profile().to_json(), "persistent_attention": 1})


def test_dispatch_order_is_read_from_the_environment():
    profile = BUILTIN_PROFILES["h200-nvlink"]
    assert with_dispatch_from_environment(profile, {}) is profile
    assert with_dispatch_from_environment(profile, {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}).launch_order_dispatch
    ordered = dataclasses.replace(profile, launch_order_dispatch=True)
    assert not with_dispatch_from_environment(ordered, {"CUDA_DEVICE_MAX_CONNECTIONS": "32"}).launch_order_dispatch


# -- against the recorded H200 benches -----------------------------------------------------------------

_DOCS = __import__("pathlib").Path(__file__).resolve().parent.parent / "docs"
# (world size, S) rows the model does not meet: at 8K on 2 GPUs a chunk's attention is 0.2-0.6 ms, and costs
# the model does not have (host launch gaps, cross-rank skew at 2C barriers, hcms-3's uneven 7/7/6 split
# measuring slower than hcms-4) dominate; the model predicts the loss but not its size (ratio 0.91 / 0.84 /
# 0.79 for C=2/3/4 against 0.86 / 0.58 / 0.65 measured)
_NOT_MET = {(2, 8192)}


def _bench_rows():
    import json

    check = json.loads((_DOCS / "model_check_h200.json").read_text())
    for world, entry in sorted(check["profiles"].items()):
        bench = json.loads((_DOCS.parent / entry["bench"]).read_text())
        rows = {(r["seq"], r["mode"]): r for r in bench["rows"]}
        for (seq, mode), row in sorted(rows.items()):
            if mode.startswith("hcms-") and row["chunks"]:
                yield int(world), seq, mode, row, entry


def _bench_cost(world: int, seq: int) -> SiteCost:
    """The bench layer's site as `site_cost` reads the funcol layout (test_copy_bytes_follow_the_paths_that_copy):
    40 heads x 128, bf16, B=1, forward, not causal; copies on every path; the output concatenated."""
    heads, dim = 40, 128
    tensor = seq // world * heads * dim * 2
    return SiteCost(attention_flops=4.0 * (heads // world) * seq * seq * dim, input_bytes=(tensor,) * 3,
                    output_bytes=(tensor,), send_copy_bytes=3 * tensor, receive_copy_bytes=3 * tensor,
                    output_copy_bytes=tensor, reassembly_bytes=tensor, world_size=world, local_heads=heads // world,
                    backward=False, causal=False)


def test_predictions_match_the_recorded_h200_benches():
    """Predicted speed-up ratios (plain / hcms-C) against `docs/bench_h200_w1_layer.json` and
    `docs/bench_h200_x2_layer.json`, with the profiles of `docs/model_check_h200.json` (derived from the
    comm-only and attention-only rows of the same files and the x2 calibration; nothing estimated).

    Tolerance: the ratio within 5%. Run-to-run spread of the medians is 1-2% (compiled vs hcms-auto, which
    ran the same graph, differ by up to 3% at 16K on one GPU), and chunking the attention kernel alone moves
    its time by about 1% (BENCHMARKS.md, chunk_cost); 5% is what is left for the model, the planner's margin
    (model_error of a calibrated profile). The benches ran the lookahead order, so that is what is predicted.
    Rows in `_NOT_MET` (2 GPUs, 8K) are outside it and are checked only for the direction (every chunking
    predicted slower than the plain site, as measured).
    """
    checked = 0
    for world, seq, mode, row, entry in _bench_rows():
        cost = _bench_cost(world, seq)
        seconds = entry["attention_s"][str(seq)]
        profile = DeviceProfile.from_json(entry["profile"])
        profile = dataclasses.replace(profile, attention_flops=cost.attention_flops
                                      / (seconds - profile.attention_latency))
        got = predict(cost, profile, tuple(row["chunks"]["forward"]), order=LOOKAHEAD)
        predicted = (got.time_s + got.gain_s) / got.time_s  # the plain time over this one, as `speedup` is
        measured = row["speedup"]
        if (world, seq) in _NOT_MET:
            assert predicted < 1 and measured < 1, (world, seq, mode)
        else:
            assert predicted == pytest.approx(measured, rel=0.05), (world, seq, mode, predicted, measured)
        checked += 1
    assert checked == 6 + 9


_BREAKDOWNS = ("breakdown_h200_w1_fwd_8k.json", "breakdown_h200_w1_fwd.json")


def _breakdown_rows() -> dict[tuple[int, str], dict]:
    import json

    rows = {}
    for name in _BREAKDOWNS:
        for row in json.loads((_DOCS / name).read_text())["rows"]:
            if row["status"] == "ok":
                rows[row["seq"], row["mode"]] = row
    return rows


def _spread(row: dict) -> float:
    return (row["step_max_ms"] - row["step_min_ms"]) / row["step_ms"]


def test_predictions_match_the_recorded_h200_breakdown():
    """Predicted speed-ups (Inductor alone / mode) against `benchmarks/breakdown.py` on one H200 at world
    size 1, forward, S = 8K, 16K, 32K, for the forms the rewrite emits now: C=2 unfused, C=2 and C=4
    fused, and the fused plain site, in the inputs-first order.

    At world size 1 every layout op of the site is a view (the breakdown counts no copy kernel for
    Inductor alone), so the site's cost is its exchanges (local copies) and the attention, and the
    rewrite adds copies: a chunk's slice or fused buffer copies q, k and v, and chunks are concatenated.
    The profile is the world-size-1 one of `docs/model_check_h200.json`, with the attention time of each
    length from the `compiled` row's attention kernels and the copy bandwidth from the copy kernels of
    the C=2 fused row at 16K (4 tensors read and written): per-call costs from the breakdown.

    Tolerance: a measured ratio is not known better than the steps' own spread, so the prediction must
    be within half the larger relative spread (max - min over median) of the two rows, and never looser
    or tighter than 3% to 10%: 3% at 32K (steps spread 2-3%), 5-6% at 16K, 8-10% at 8K (2.6 ms steps).
    """
    rows = _breakdown_rows()
    heads, dim = 40, 128
    fitted = rows[16384, "hcms-2"]
    copy_bandwidth = 2 * 4 * (16384 * heads * dim * 2) / (fitted["classes"]["copy"]["ms"] / 1e3)
    import json

    check = json.loads((_DOCS / "model_check_h200.json").read_text())
    base = DeviceProfile.from_json(check["profiles"]["1"]["profile"])
    checked = 0
    for (seq, mode), row in sorted(rows.items()):
        if mode == "compiled":
            continue
        tensor = seq * heads * dim * 2
        cost = SiteCost(attention_flops=4.0 * heads * seq * seq * dim, input_bytes=(tensor,) * 3,
                        output_bytes=(tensor,), send_copy_bytes=0, receive_copy_bytes=0, output_copy_bytes=0,
                        reassembly_bytes=tensor, world_size=1, local_heads=heads, backward=False, causal=False,
                        uncopied_input_bytes=3 * tensor, uncopied_output_bytes=tensor)
        plain = rows[seq, "compiled"]
        attention_s = plain["classes"]["attention"]["ms"] / 1e3
        profile = dataclasses.replace(base, copy_bandwidth=copy_bandwidth,
                                      attention_flops=cost.attention_flops / (attention_s - base.attention_latency))
        chunks = row["kwargs"]["chunks"]
        sizes = (heads,) if chunks == 1 else (heads // chunks,) * chunks
        got = predict(cost, profile, sizes, fused=row["kwargs"].get("fuse", True))
        predicted = (got.time_s + got.gain_s) / got.time_s
        measured = 1 / row["vs_compiled"]
        tolerance = min(0.10, max(0.03, max(_spread(row), _spread(plain)) / 2))
        assert predicted == pytest.approx(measured, rel=tolerance), (seq, mode, predicted, measured, tolerance)
        checked += 1
    assert checked == 3 * 4


def test_predictions_match_the_recorded_h200_copy_engine_bench():
    """Predicted speed-ups of hcms-2 and the fused plain site over the copy-engine exchange against
    `docs/bench_h200_w1_layer_copy_engine.json` (one H200, world size 1, forward, 16K and 32K).

    At world size 1 every byte of the exchange stays on the GPU: its staging and its pull are copies on
    the SMs, which the model charges at the calibrated local bandwidth and latency
    (`docs/profile_h200_w1_copy_engine.json`); the attention time is each length's attention-only row. Tolerance 5%,
    as for the other benches; and the copy-engine rows are predicted slower than hcms-2 over NCCL, as measured.
    """
    import json

    check = json.loads((_DOCS / "model_check_h200.json").read_text())
    measured_profile = json.loads((_DOCS / "profile_h200_w1_copy_engine.json").read_text())["profile"]
    bench = json.loads((_DOCS / "bench_h200_w1_layer_copy_engine.json").read_text())
    rows = {(r["seq"], r["mode"]): r for r in bench["rows"]}
    heads, dim = 40, 128
    base = DeviceProfile.from_json(check["profiles"]["1"]["profile"])
    checked = 0
    for seq in (16384, 32768):
        tensor = seq * heads * dim * 2
        cost = SiteCost(attention_flops=4.0 * heads * seq * seq * dim, input_bytes=(tensor,) * 3,
                        output_bytes=(tensor,), send_copy_bytes=0, receive_copy_bytes=0, output_copy_bytes=0,
                        reassembly_bytes=tensor, world_size=1, local_heads=heads, backward=False, causal=False,
                        uncopied_input_bytes=3 * tensor, uncopied_output_bytes=tensor)
        attention_s = rows[seq, "attention-only"]["median_ms"] / 1e3
        profile = dataclasses.replace(
            base, attention_flops=cost.attention_flops / (attention_s - base.attention_latency),
            copy_bandwidth=measured_profile["copy_bandwidth"], copy_engine_bandwidth=370e9,
            copy_engine_latency=measured_profile["copy_engine_latency"],
            copy_engine_local_bandwidth=measured_profile["copy_engine_local_bandwidth"])
        ratios = {}
        for mode, sizes, exchange in (("hcms-2-nccl", (20, 20), "nccl"), ("hcms-2-ce", (20, 20), "copy-engine"),
                                      ("hcms-1-ce", (40,), "copy-engine")):
            got = predict(cost, profile, sizes, fused=True, exchange=exchange)
            ratios[mode] = (got.time_s + got.gain_s) / got.time_s
        for mode in ("hcms-2-ce", "hcms-1-ce"):
            measured = rows[seq, mode]["speedup"]
            assert ratios[mode] == pytest.approx(measured, rel=0.05), (seq, mode, ratios[mode], measured)
            assert ratios[mode] < ratios["hcms-2-nccl"] and measured < rows[seq, "hcms-2-nccl"]["speedup"]
            checked += 1
    assert checked == 4
