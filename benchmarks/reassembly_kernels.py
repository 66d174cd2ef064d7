"""Which kernels Inductor launches around a chunked site's output: is the chunks' concatenation a
kernel of its own, or read by the consumer's copy?

One Ulysses layer (funcol layout, 40 heads x 128, bf16) whose output is transposed and made
contiguous (a pointwise copy, as a multi-GPU layout's permute after the output exchange is), compiled
with Inductor alone and through HCMS with two chunks, on one CUDA device (NCCL, world size 1). For
each it prints the Triton kernels of Inductor's generated `call` and whether the outputs are equal
bit for bit:

    python benchmarks/reassembly_kernels.py [--seq 4096]
"""

from __future__ import annotations

import argparse
import os
import re

import torch
import torch.distributed as dist
from torch._inductor.utils import run_and_get_code

import hcms_compile
from hcms_compile.spawn import free_port
from hcms_compile.testing.layouts import attn_funcol


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    group = dist.group.WORLD

    def layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attn_funcol(q, k, v, group).transpose(1, 2).contiguous()

    q, k, v = (torch.randn(1, args.seq, 40, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    want = None
    for name, backend in (("compiled", "inductor"), ("hcms-2", hcms_compile.make_backend(chunks=2))):
        torch._dynamo.reset()
        compiled = torch.compile(layer, backend=backend, fullgraph=True)
        with torch._inductor.config.patch(fx_graph_cache=False):
            out, (code,) = run_and_get_code(compiled, q, k, v)
        kernels = re.findall(r"(triton_\w+)\.run\(", code[code.index("def call("):])
        same = "-" if want is None else torch.equal(out, want)
        print(f"{name}: Triton kernels {kernels}; bitwise equal to Inductor alone: {same}")
        want = out.clone() if want is None else want
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
