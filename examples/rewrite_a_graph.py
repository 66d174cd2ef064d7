"""Rewrite one traced Ulysses attention with the standalone pass, and check it on 4 ranks in-process.

    python examples/rewrite_a_graph.py
"""

from __future__ import annotations

import functools

import torch

import hcms_compile
from hcms_compile.testing import ranks
from hcms_compile.testing.layouts import attn_diffusers
from hcms_compile.testing.tracing import trace

P, B, S, H, D = 4, 1, 128, 20, 16  # 5 local heads per rank

group = ranks.group(P)  # a fake 8-rank world; LocalTensorMode supplies the data of each rank
attention = functools.partial(attn_diffusers, group=group, is_causal=True)
gm = trace(lambda q, k, v: attention(q, k, v), [torch.randn(B, S // P, H, D) for _ in range(3)])

result = hcms_compile.rewrite(gm, chunks=(3, 2))  # 5 local heads as 3 + 2
print(result, end="\n\n")

inputs = [ranks.shard(torch.randn(B, S, H, D), 1, P) for _ in range(3)]
before = ranks.run_on_ranks(gm, inputs, P)
after = ranks.run_on_ranks(result.graph_module, inputs, P)
print("bitwise equal on every rank:", all(torch.equal(a, b) for a, b in zip(before, after, strict=True)))
roles = [(n.name, n.meta["hcms"]["chunk"], n.meta["hcms"]["role"]) for n in result.graph_module.graph.nodes
         if "hcms" in n.meta and n.meta["hcms"]["stream"] == "comm"]
print("communication nodes in pipeline order:")
for name, chunk, role in roles:
    print(f"  chunk {chunk}: {role:<18} {name}")
