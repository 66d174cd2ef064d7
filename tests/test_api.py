"""The public rewrite() API: argument errors, non-mutation, and the report."""

from __future__ import annotations

import pytest
import torch

import hcms_compile
from hcms_compile.testing import ranks
from hcms_compile.testing.layouts import attn_funcol
from hcms_compile.testing.tracing import trace

P = 2


@pytest.fixture(scope="module")
def gm():
    g = ranks.group(P)
    return trace(lambda q, k, v: attn_funcol(q, k, v, g), [torch.randn(2, 16, 6, 8) for _ in range(3)])


def test_rejects_a_non_graph_module():
    with pytest.raises(TypeError, match="takes a torch.fx.GraphModule, got Linear"):
        hcms_compile.rewrite(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("chunks, error, message", [
    (0, ValueError, "chunks must be >= 1, got 0"),
    (-3, ValueError, "chunks must be >= 1"),
    (2.5, TypeError, "chunks must be 'auto', an int or a sequence of ints, got float"),
    (True, TypeError, "chunks must be 'auto', an int or a sequence of ints, got bool"),
    ("2", TypeError, "got str"),
    ((), ValueError, "must not be empty"),
    ((2, 1.0), TypeError, "chunk sizes must be integers, got 1.0"),
    ((2, 0), ValueError, "every chunk needs at least one head"),
])
def test_bad_chunk_specs_are_clear_errors(gm, chunks, error, message):
    with pytest.raises(error, match=message):
        hcms_compile.rewrite(gm, chunks=chunks)


def test_exact_must_name_a_policy(gm):
    with pytest.raises(TypeError, match="exact must be True, False, 'bitwise', 'run-to-run' or 'rounding'"):
        hcms_compile.rewrite(gm, exact="yes")


def test_input_graph_is_not_mutated(gm):
    code, nodes = gm.code, [n.format_node() for n in gm.graph.nodes]
    result = hcms_compile.rewrite(gm, chunks=(2, 1))
    assert result.sites[0].rewritten
    assert result.graph_module is not gm
    assert gm.code == code and [n.format_node() for n in gm.graph.nodes] == nodes


def test_report_names_the_site_and_renders_a_table(gm):
    result = hcms_compile.rewrite(gm, chunks=2)
    (site,) = result.sites
    assert (site.status, site.world_size, site.local_heads, site.chunk_sizes) == ("rewritten", 2, 3, (2, 1))
    assert site.attention == "_scaled_dot_product_flash_attention_for_cpu" and site.kernel == "flash_cpu"
    assert site.exchanges == 3 and site.bitwise is True and site.grade == "bitwise" and site.reason == ""
    table = str(result)
    assert "attention" in table.splitlines()[0] and "rewritten" in table and "2+1" in table


def test_even_split_puts_larger_chunks_first():
    from hcms_compile.passes import even_split

    assert even_split(5, 2) == (3, 2)
    assert even_split(7, 3) == (3, 2, 2)
    assert even_split(4, 4) == (1, 1, 1, 1)
