"""The `hcms` command line refuses bad flags before spawning ranks, and the demo cannot pass vacuously."""

from __future__ import annotations

import pytest

from hcms_compile import demo
from hcms_compile.cli import main


@pytest.mark.parametrize("argv, message", [
    (["demo", "--chunks", "0"], "chunks must be >= 1"),
    (["demo", "--chunks", "2,0"], "every chunk needs at least one head"),
    (["demo", "--chunks", "two"], "expected auto, a count"),
    (["demo", "--chunks", "4"], "4 chunks requested but the site has 3 local head(s)"),
    (["demo", "--chunks", "2+2"], "sum to 4, but the site has 3 local heads"),
    (["demo", "--ranks", "0"], "must be >= 1"),
    (["bench", "--modes", "hcms-0"], "unknown mode 'hcms-0'"),
    (["bench", "--modes", "fast"], "unknown mode 'fast'"),
    (["calibrate", "--repeats", "0"], "must be >= 1"),
])
def test_bad_flags_are_refused_before_any_rank_is_spawned(monkeypatch, capsys, argv, message):
    def spawned(*_args, **_kwargs):
        raise AssertionError("ranks were spawned")

    monkeypatch.setattr(demo, "spawn_gloo", spawned)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_fails_when_nothing_was_rewritten(capfd):
    # one head per rank and q, k, v already in one exchange: nothing to chunk or fuse, every site is
    # skipped, and equal bits prove nothing
    status = main(["demo", "--ranks", "2", "--heads", "2", "--head-dim", "8", "--blocks", "1", "--tokens-per-rank",
                   "16", "--repeats", "1", "--inner", "aot_eager", "--chunks", "auto", "--layout", "fused_qkv"])
    captured = capfd.readouterr()
    assert status == 1
    assert "skipped" in captured.out and "rewritten" not in captured.out.replace("no site was rewritten", "")
    assert "no site was rewritten" in captured.err


def test_demo_passes_when_sites_were_rewritten_and_match(capfd):
    status = main(["demo", "--ranks", "2", "--heads", "4", "--head-dim", "8", "--blocks", "1", "--tokens-per-rank",
                   "32", "--repeats", "1", "--inner", "aot_eager", "--chunks", "2"])
    out = capfd.readouterr().out
    assert status == 0 and "on every rank: yes" in out and "rewritten" in out
