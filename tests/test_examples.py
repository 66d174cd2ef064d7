"""The shipped example and the CLI keep working."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from hcms_compile.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_rewrite_example_runs_and_is_bitwise(capsys):
    runpy.run_path(str(ROOT / "examples" / "rewrite_a_graph.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "rewritten" in out and "bitwise equal on every rank: True" in out


def test_cli_rejects_heads_that_do_not_divide(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--heads", "10", "--ranks", "4"])
    assert "not divisible" in capsys.readouterr().err
