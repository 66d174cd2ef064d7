"""Inductor keeps the pipeline: read its generated code for the forward and the backward graph.

With Inductor's default configuration (memory-driven reordering on), each all-to-all whose wait
follows a later chunk's attention in the FX graph must still be waited on only after that
attention in the generated code; without HCMS no exchange overlaps any attention.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import hcms_compile
from hcms_compile.testing import ranks
from hcms_compile.testing.layouts import attn_funcol

# the group's all-to-all, or the copy-engine exchange (`exchange="copy-engine"`: on CPU it runs the former)
A2A = re.compile(r"^\s*(buf\d+) = torch\.ops\.(_c10d_functional\.all_to_all_single|hcms\.all_to_all)\.default\(")
WAIT = re.compile(r"torch\.ops\._c10d_functional\.wait_tensor\.default\((buf\d+)\)")
ALIAS = re.compile(r"^\s*(buf\d+) = (buf\d+)$")  # a fallback kernel's single output, renamed
ATTENTION = re.compile(r"= torch\.ops\.aten\._scaled_dot_product_flash_attention_for_cpu(_backward)?\.default\(")


def _events(code: str) -> list[tuple[str, str]]:
    """(kind, buffer) in the order the generated `call` runs them."""
    body = code[code.index("def call(self, args):"):]
    events = []
    names: dict[str, str] = {}
    for line in body.splitlines():
        if m := A2A.match(line):
            events.append(("a2a", m.group(1)))
        elif m := ALIAS.match(line):
            names[m.group(1)] = names.get(m.group(2), m.group(2))
        elif m := WAIT.search(line):
            events.append(("wait", names.get(m.group(1), m.group(1))))
        elif ATTENTION.search(line):
            events.append(("attention", ""))
    return events


def _attention_between_issue_and_wait(events: list[tuple[str, str]]) -> list[int]:
    """For each all-to-all, how many attention kernels run between its launch and its first wait."""
    gaps = []
    for i, (kind, buf) in enumerate(events):
        if kind != "a2a":
            continue
        first_wait = next(j for j in range(i + 1, len(events)) if events[j] == ("wait", buf))
        gaps.append(sum(1 for kind2, _ in events[i + 1:first_wait] if kind2 == "attention"))
    return gaps


def compile_and_get_code(layout=attn_funcol, shape=(2, 32, 4, 8), fuse=True, exchange="auto"):
    """Inductor's generated code for the forward and the backward graph of one training step of
    `layout`'s attention on 2 ranks (chunks=2), and the backend that compiled it."""
    group = ranks.group(2)
    backend = hcms_compile.make_backend(chunks=2, inner="inductor", exact="rounding", fuse=fuse, exchange=exchange)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: layout(q, k, v, group, is_causal=True), backend=backend,
                             fullgraph=True)
    inputs = [torch.randn(*shape, requires_grad=True) for _ in range(3)]

    def step():
        compiled(*inputs).sum().backward()

    with torch._inductor.config.patch(fx_graph_cache=False):
        _, codes = run_and_get_code(step)
    assert len(codes) == 2, "expected a forward and a backward kernel module"
    return codes, backend


def _compile_and_get_code(disable: bool, monkeypatch, fuse: bool = True, exchange: str = "auto") -> list[str]:
    if disable:
        monkeypatch.setenv("HCMS_DISABLE", "1")
    codes, _ = compile_and_get_code(fuse=fuse, exchange=exchange)
    return codes


@pytest.mark.parametrize(("fuse", "exchange"), [(True, "auto"), (False, "auto"), (True, "copy-engine")],
                         ids=["fused", "unfused", "copy-engine"])
def test_generated_code_keeps_the_pipeline(monkeypatch, fuse, exchange):
    forward, backward = _compile_and_get_code(False, monkeypatch, fuse, exchange)
    if exchange == "copy-engine":  # every exchange of the rewritten sites is the copy-engine op
        for code in (forward, backward):
            assert "torch.ops.hcms.all_to_all.default(" in code
            assert "_c10d_functional.all_to_all_single" not in code
    # forward: 3 input exchanges per chunk and 1 output; backward: 1 input and 3 outputs (dq, dk, dv);
    # fused, each chunk sends its three as one. Only chunk 0's inputs and the last chunk's outputs
    # have no attention to hide behind.
    three = 1 if fuse else 3
    for code, inputs, exposed in ((forward, three, three + 1), (backward, 1, 1 + three)):
        events = _events(code)
        assert sum(kind == "attention" for kind, _ in events) == 2
        gaps = _attention_between_issue_and_wait(events)
        assert len(gaps) == 2 * (1 + three)
        assert sum(g == 0 for g in gaps) == exposed, (gaps, events)
        # every input exchange is launched before chunk 0's attention kernel, and so before any
        # output exchange: none is queued behind one on the NCCL stream
        first_attention = events.index(("attention", ""))
        launched = [kind for kind, _ in events[:first_attention]].count("a2a")
        assert launched == 2 * inputs, events


def test_without_hcms_nothing_overlaps(monkeypatch):
    forward, backward = _compile_and_get_code(True, monkeypatch)
    for code in (forward, backward):
        assert all(g == 0 for g in _attention_between_issue_and_wait(_events(code)))


def test_the_copy_engine_exchange_keeps_its_input_until_its_wait(monkeypatch):
    # the op reads its input on its own stream after it returns: Inductor must treat it as an
    # out-of-place collective, or it hands the input's memory to the next chunk's send buffer
    # (as a plain extern kernel it did, and hcms-2 lost bits on the H200)
    forward, backward = _compile_and_get_code(False, monkeypatch, exchange="copy-engine")
    call = re.compile(r"^\s*(buf\d+) = torch\.ops\.hcms\.all_to_all\.default\((buf\d+),")
    checked = 0
    for code in (forward, backward):
        lines = code[code.index("def call(self, args):"):].splitlines()
        for i, line in enumerate(lines):
            if not (m := call.match(line)):
                continue
            out, send = m.groups()
            names = {out} | {a.group(1) for later in lines[i:] if (a := ALIAS.match(later)) and a.group(2) == out}
            wait = next(j for j in range(i, len(lines))
                        if any(f"wait_tensor.default({name})" in lines[j] for name in names))
            # no `del`, reuse (`bufN = bufX; del bufX  # reuse`) or write into the send buffer before the wait
            freed = [line for line in lines[i + 1:wait] if re.search(rf"\b{send}\b", line)]
            assert not freed, (line, freed)
            checked += 1
    assert checked == 2 * 2 * 2  # 2 chunks, in and out, forward and backward
