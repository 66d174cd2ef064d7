"""`hcms bench`: the figures' arithmetic, a real run on two gloo CPU ranks, and the pictures."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from hcms_compile import bench, bench_plot
from hcms_compile.bench import PhaseCost, Row, derive_figures, ideal_ms, overlap_efficiency

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hcms bench")
    bench.add_bench_arguments(parser)
    return parser.parse_args(list(argv))


# ---------------------------------------------------------------------------------------------
# arithmetic on hand-made numbers
# ---------------------------------------------------------------------------------------------


def test_ideal_time_and_overlap_efficiency():
    phase = PhaseCost(first_ms=3.0, last_ms=1.0, compute_ms=10.0, chunks=2)
    assert phase.comm_ms == 4.0
    assert phase.unhideable_ms == 2.0  # (3 + 1) / 2
    assert ideal_ms([phase]) == 12.0  # max(4, 10) + 2
    assert overlap_efficiency(14.5, 13.0, 12.0) == pytest.approx(0.6)  # 1.5 of 2.5 hideable ms hidden
    assert overlap_efficiency(14.5, 15.0, 12.0) == pytest.approx(-0.2)  # slower than plain: negative
    assert overlap_efficiency(12.0, 11.0, 12.0) is None  # nothing to hide
    assert overlap_efficiency(11.0, 11.0, 12.0) is None
    # comm-bound: the exchanges set the pace; two passes add up; the rest of a block is kept
    backward = PhaseCost(first_ms=4.0, last_ms=8.0, compute_ms=6.0, chunks=4)
    assert backward.ideal_ms == 12.0 + 3.0
    assert ideal_ms([phase, backward], rest_ms=5.0) == 5.0 + 12.0 + 15.0
    assert PhaseCost(3.0, 1.0, 10.0, chunks=1).ideal_ms == 14.0  # one chunk hides nothing


def _row(target: str, mode: str, median: float, **kw) -> Row:
    return Row(target, 1024, mode, median_ms=median, min_ms=median, max_ms=median, **kw)


def test_derive_figures_layer_and_block():
    parts = {"comm": {"forward_first": 3.0, "forward_last": 1.0}, "attention": {"forward": 10.0}}
    rows = []
    for target in ("layer", "block"):
        rows += [
            _row(target, "comm-only", 4.0, parts_ms=parts["comm"]),
            _row(target, "attention-only", 10.0, parts_ms=parts["attention"]),
            _row(target, "compiled", 14.5 if target == "layer" else 20.0),
            _row(target, "hcms-2", 13.0 if target == "layer" else 19.0, chunks={"forward": [1, 1]},
                 sites_rewritten=1, sites_total=1),
            _row(target, "eager", 29.0),
            _row(target, "hcms-auto", 14.0, sites_rewritten=0, sites_total=1),
            Row(target, 1024, "hcms-4", status="skipped", note="4 chunks > 2 local heads"),
        ]
    derive_figures(rows)
    layer = {r.mode: r for r in rows if r.target == "layer"}
    block = {r.mode: r for r in rows if r.target == "block"}
    assert layer["compiled"].speedup == 1.0
    assert layer["eager"].speedup == pytest.approx(0.5)
    assert layer["hcms-2"].ideal_ms == 12.0
    assert layer["hcms-2"].overlap_efficiency == pytest.approx(0.6)
    # the block keeps its other 6 ms (20 - 4 - 10): ideal 6 + 12, so 1 of 2 hideable ms was hidden
    assert block["hcms-2"].ideal_ms == pytest.approx(18.0)
    assert block["hcms-2"].overlap_efficiency == pytest.approx(0.5)
    for mode in ("comm-only", "attention-only", "hcms-4"):
        assert layer[mode].speedup is None and layer[mode].overlap_efficiency is None
    # HCMS left the site alone: a speed-up (noise), but no overlap efficiency
    assert layer["hcms-auto"].speedup is not None and layer["hcms-auto"].overlap_efficiency is None


def test_derive_figures_counts_an_untouched_pass_as_one_chunk():
    rows = [
        _row("layer", "comm-only", 8.0, parts_ms={"forward_first": 3.0, "forward_last": 1.0,
                                                   "backward_first": 1.0, "backward_last": 3.0}),
        _row("layer", "attention-only", 30.0, parts_ms={"forward": 10.0, "backward": 20.0}),
        _row("layer", "compiled", 40.0),
        _row("layer", "hcms-2", 39.0, chunks={"forward": [1, 1]}),  # backward left alone
    ]
    derive_figures(rows)
    # forward: 10 + 4/2; backward: 20 + 4/1 (nothing hidden there)
    assert rows[-1].ideal_ms == pytest.approx(12.0 + 24.0)
    assert rows[-1].overlap_efficiency == pytest.approx(1.0 / 4.0)


def _noisy(mode: str, median: float, spread: float, **kw) -> Row:
    return Row("layer", 1024, mode, median_ms=median, min_ms=median - spread / 2, max_ms=median + spread / 2, **kw)


def test_results_inside_the_noise_and_efficiencies_outside_0_1_are_not_figures():
    parts = {"forward_first": 3.0, "forward_last": 1.0}
    hcms = {"chunks": {"forward": [1, 1]}, "sites_rewritten": 1, "sites_total": 1}
    rows = [_noisy("comm-only", 4.0, 0.0, parts_ms=parts),
            _noisy("attention-only", 10.0, 0.0, parts_ms={"forward": 10.0}),
            _noisy("compiled", 14.5, 0.4),
            _noisy("hcms-2", 14.3, 0.4, **hcms),  # 0.2 ms apart, repeats spread 0.4 ms: noise
            _noisy("hcms-3", 16.0, 0.1, **hcms),  # clearly slower: efficiency -60%
            _noisy("hcms-4", 11.0, 0.1, **hcms),  # faster than the ideal 12 ms: efficiency 140%
            _noisy("hcms-auto", 13.0, 0.1, **hcms)]  # 60%: a figure
    derive_figures(rows)
    by_mode = {r.mode: r for r in rows}
    assert by_mode["hcms-2"].within_noise and by_mode["hcms-2"].efficiency_note == "within noise"
    assert by_mode["hcms-3"].efficiency_note == "slower than plain"
    assert by_mode["hcms-4"].efficiency_note.startswith("faster than the ideal")
    assert by_mode["hcms-auto"].overlap_efficiency == pytest.approx(0.6) and not by_mode["hcms-auto"].within_noise
    assert all(r.overlap_efficiency is None for r in rows if r.mode != "hcms-auto")
    table = bench.format_table(rows)
    assert "1.01x (within noise)" in table and "n/a: slower than plain" in table and "60%" in table
    assert "-60%" not in table and "140%" not in table


def test_format_table_shows_skips_and_errors():
    rows = [_row("layer", "compiled", 2.0), Row("layer", 1024, "hcms-auto", status="error", note="TypeError: no")]
    derive_figures(rows)
    table = bench.format_table(rows)
    assert "1.00x" in table and "error: TypeError: no" in table


# ---------------------------------------------------------------------------------------------
# the command line, without running anything
# ---------------------------------------------------------------------------------------------


def test_defaults_follow_the_device():
    gpu = bench.config_from_args(_parse(), on_gpu=True)
    cpu = bench.config_from_args(_parse(), on_gpu=False)
    assert gpu.seqs == (8192, 16384, 32768, 56000, 75600, 131072) and gpu.dtype == "bf16" and gpu.repeats == 10
    assert cpu.seqs == (256, 512, 1024) and cpu.dtype == "fp32" and cpu.repeats == 5
    assert gpu.modes == bench.MODES and gpu.heads == 40 and gpu.head_dim == 128


def test_bad_arguments_are_refused_before_spawning(capsys):
    assert bench.run_bench_command(_parse("--ranks", "3", "--heads", "4")) == 2
    assert "not divisible" in capsys.readouterr().err
    assert bench.run_bench_command(_parse("--trace-png", "x.png", "--heads", "4")) == 2
    with pytest.raises(SystemExit):
        _parse("--modes", "hcms-many")
    with pytest.raises(SystemExit):
        _parse("--modes", "hcms-0")


def test_missing_matplotlib_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(bench_plot.MatplotlibMissing, match="pip install matplotlib"):
        bench_plot.require_matplotlib()
    assert bench.run_bench_command(_parse("--png", "out.png")) == 2
    assert "--plot results.json" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# a real run: 2 gloo CPU ranks, tiny shapes
# ---------------------------------------------------------------------------------------------

MODES = ("comm-only", "attention-only", "eager", "compiled", "hcms-2", "hcms-4", "hcms-auto", "ring")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = _parse("--ranks", "2", "--heads", "4", "--head-dim", "16", "--seq", "64", "128", "--repeats", "2",
                  "--warmup", "0", "--inner", "aot_eager", "--modes", *MODES, "--json", str(out / "r.json"),
                  "--trace", str(out / "trace"), "--trace-seq", "128")
    assert bench.run_bench_command(args) == 0
    return out, json.loads((out / "r.json").read_text())


def test_run_writes_every_row(run):
    _, results = run
    rows = {(r["target"], r["seq"], r["mode"]): r for r in results["rows"]}
    assert list(rows) == [(t, s, m) for t in ("layer", "block") for s in (64, 128) for m in MODES]
    meta = results["meta"]
    assert meta["world_size"] == 2 and meta["backend"] == "gloo" and meta["nccl"] is None
    assert {"torch", "device", "date", "argv"} <= set(meta)
    for (_, _, mode), row in rows.items():
        if mode in ("hcms-4", "hcms-auto", "ring"):
            continue
        assert row["status"] == "ok", row
        assert row["median_ms"] > 0 and row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert len(row["times_ms"]) == 2
    for target in ("layer", "block"):
        for seq in (64, 128):
            hcms = rows[(target, seq, "hcms-2")]
            assert hcms["sites_rewritten"] > 0 and hcms["chunks"] == {"forward": [1, 1]}
            assert hcms["speedup"] > 0 and hcms["ideal_ms"] is not None
            assert rows[(target, seq, "compiled")]["speedup"] == 1.0
            assert rows[(target, seq, "eager")]["sites_total"] is None
            assert set(rows[(target, seq, "comm-only")]["parts_ms"]) == {"forward_first", "forward_last"}
            assert set(rows[(target, seq, "attention-only")]["parts_ms"]) == {"forward"}
            assert rows[(target, seq, "hcms-4")]["status"] == "skipped"
            assert "2 local heads" in rows[(target, seq, "hcms-4")]["note"]
            assert rows[(target, seq, "ring")]["status"] == "n/a"
            # chunks="auto" is either accepted (a timed row) or recorded as an error, never a crash
            assert rows[(target, seq, "hcms-auto")]["status"] in ("ok", "error")


def test_run_traces_one_step_per_rank(run):
    out, results = run
    assert results["trace"]["mode"] == "hcms-2" and results["trace"]["seq"] == 128
    for rank in (0, 1):
        trace = json.loads((out / "trace" / f"rank{rank}.json").read_text())
        assert trace["hcmsBench"] == {"mode": "hcms-2", "target": "layer", "seq": 128, "world_size": 2,
                                      "rank": rank, "device": "cpu"}
    lanes = bench_plot.trace_lanes(json.loads((out / "trace" / "rank0.json").read_text()))
    kinds = {box.kind for lane in lanes for box in lane.boxes}
    assert {"comm", "attention"} <= kinds
    assert len(lanes) > 1  # gloo moves the data on its own threads: more than one lane


def test_plot_redraws_from_json(run, capsys):
    out, _ = run
    args = _parse("--plot", str(out / "r.json"), "--png", str(out / "s.png"), "--trace-png", str(out / "l.png"))
    assert bench.run_bench_command(args) == 0
    assert "hcms-2" in capsys.readouterr().out  # the table is printed again
    for name in ("s.png", "l.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_backward_times_both_passes(tmp_path):
    args = _parse("--ranks", "2", "--heads", "4", "--head-dim", "16", "--seq", "64", "--repeats", "1",
                  "--warmup", "0", "--inner", "aot_eager", "--targets", "layer", "--backward",
                  "--modes", "comm-only", "attention-only", "compiled", "hcms-2", "hcms-4", "--json",
                  str(tmp_path / "r.json"), "--trace", str(tmp_path / "trace"), "--trace-mode", "hcms-4")
    assert bench.run_bench_command(args) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["trace"] is None and not (tmp_path / "trace").exists()  # the traced row was skipped
    rows = {r["mode"]: r for r in results["rows"]}
    assert set(rows["comm-only"]["parts_ms"]) == {"forward_first", "forward_last", "backward_first", "backward_last"}
    assert set(rows["attention-only"]["parts_ms"]) == {"forward", "backward"}
    hcms = rows["hcms-2"]
    # the forward site is chunked; the backward graph's sites are reported (chunked or left alone with a reason)
    assert hcms["status"] == "ok" and hcms["chunks"]["forward"] == [1, 1]
    assert hcms["sites_total"] >= 2 and hcms["sites_rewritten"] >= 1
    assert hcms["ideal_ms"] is not None


# ---------------------------------------------------------------------------------------------
# the trace picture's parsing, on a hand-made GPU trace
# ---------------------------------------------------------------------------------------------


def test_classify_kernel_names():
    assert bench_plot.classify("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)") == "comm"
    assert bench_plot.classify("gloo:all_to_all") == "comm"
    assert bench_plot.classify("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3") == "attention"
    assert bench_plot.classify("fmha_cutlassF_bf16_aligned_64x128_rf_sm80") == "attention"
    assert bench_plot.classify("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert bench_plot.classify("triton_poi_fused_clone_0") == "other"


def test_gpu_trace_lanes_and_overlap():
    def kernel(name: str, stream: int, ts: float, dur: float) -> dict:
        return {"ph": "X", "cat": "kernel", "name": name, "pid": 0, "tid": stream, "ts": ts, "dur": dur,
                "args": {"device": 0, "stream": stream}}

    trace = {"traceEvents": [
        kernel("ncclDevKernel_SendRecv", 16, 0.0, 100.0),
        kernel("cudnn_sdpa_fprop", 7, 50.0, 200.0),
        kernel("ncclDevKernel_SendRecv", 16, 220.0, 100.0),
        kernel("triton_poi_fused_clone_0", 7, 250.0, 10.0),
        {"ph": "X", "cat": "cpu_op", "name": "aten::empty", "pid": 1, "tid": 1, "ts": 0.0, "dur": 1.0},
    ]}
    lanes = bench_plot.trace_lanes(trace)
    assert [lane.label for lane in lanes] == ["GPU 0 stream 7", "GPU 0 stream 16"]  # CPU ops left out on GPU
    assert [b.kind for b in lanes[0].boxes] == ["attention", "other"]
    assert bench_plot.overlap_us(lanes) == pytest.approx(50.0 + 30.0)


def test_trace_lanes_of_several_ranks_share_the_host_clock(tmp_path):
    pytest.importorskip("matplotlib")

    def trace(rank: int, base_ns: int, ts: float) -> dict:
        kernel = {"ph": "X", "cat": "kernel", "name": "cudnn_sdpa_fprop", "pid": 0, "tid": 7, "ts": ts,
                  "dur": 10.0, "args": {"device": rank, "stream": 7}}
        return {"traceEvents": [kernel], "baseTimeNanoseconds": base_ns, "hcmsBench": {"rank": rank}}

    # rank 1's kernel starts 5 us after rank 0's on the host clock, though its relative timestamp is earlier
    traces = [trace(0, 1_000_000, 20.0), trace(1, 1_020_000, 5.0)]
    lanes = [bench_plot._ranked_lanes(t, several=True) for t in traces]
    assert [lane[0].label for lane in lanes] == ["rank 0: GPU 0 stream 7", "rank 1: GPU 1 stream 7"]
    assert lanes[1][0].boxes[0].start_us - lanes[0][0].boxes[0].start_us == pytest.approx(5.0)
    paths = []
    for rank, t in enumerate(traces):
        paths.append(tmp_path / f"rank{rank}.json")
        paths[-1].write_text(json.dumps(t))
    bench_plot.plot_trace(paths, tmp_path / "lanes.png")
    assert (tmp_path / "lanes.png").read_bytes()[:8] == PNG_MAGIC
