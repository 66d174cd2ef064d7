"""Profile one Ulysses attention layer compiled with and without HCMS on one GPU (NCCL, world size 1).

At world size 1 NCCL still runs every all-to-all as a kernel on its own stream, so one GPU shows the
overlap structure (chunk c+1's all-to-all running while chunk c's attention kernel runs), though not
its payoff. Writes Chrome traces and a JSON summary under --out and prints the summary:

    python benchmarks/overlap_trace.py --seq 16384 --heads 40 --head-dim 128 --chunks 4 --out /tmp/trace
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import hcms_compile
from hcms_compile.testing.layouts import LAYOUTS

COMM = ("nccl", "sendrecv", "alltoall")
ATTENTION = ("flash", "fmha", "cudnn", "attention", "sdpa", "mha")


def _attend(fn, group, q, k, v):
    return fn(q, k, v, group)


def _kernels(trace_path: Path) -> list[dict]:
    events = json.loads(trace_path.read_text())["traceEvents"]
    return [e for e in events if e.get("cat") == "kernel" and "dur" in e]


def _summary(kernels: list[dict]) -> dict:
    comm = [k for k in kernels if any(w in k["name"].lower() for w in COMM)]
    attn = [k for k in kernels if k not in comm and any(w in k["name"].lower() for w in ATTENTION)]
    overlapped, overlap_us = 0, 0.0
    for c in comm:
        start, end = c["ts"], c["ts"] + c["dur"]
        shared = [min(end, a["ts"] + a["dur"]) - max(start, a["ts"]) for a in attn
                  if a["args"].get("stream") != c["args"].get("stream")]
        shared = [s for s in shared if s > 0]
        if shared:
            overlapped += 1
            overlap_us += sum(shared)
    return {
        "comm_kernels": len(comm),
        "attention_kernels": len(attn),
        "comm_kernels_overlapping_attention": overlapped,
        "overlap_us": round(overlap_us, 1),
        "comm_streams": sorted({k["args"].get("stream") for k in comm}),
        "attention_streams": sorted({k["args"].get("stream") for k in attn}),
        "attention_kernel_names": sorted({k["name"][:80] for k in attn}),
        "comm_kernel_names": sorted({k["name"][:80] for k in comm}),
    }


def _median_ms(fn, inputs, iters: int) -> float:
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*inputs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[16384])
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--chunks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layout", default="funcol")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("overlap_trace"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    group = dist.group.WORLD
    lay = LAYOUTS[args.layout]
    fn = functools.partial(_attend, lay.fn, group)
    results = {"torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
               "device": torch.cuda.get_device_name(), "runs": []}
    for seq in args.seq:
        shape = lay.local_shape(1, seq, args.heads, args.head_dim, 1)
        inputs = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        torch._dynamo.reset()
        plain = torch.compile(fn, backend="inductor", fullgraph=True)
        want = plain(*inputs)
        plain_ms = _median_ms(plain, inputs, args.iters)
        for chunks in args.chunks:
            torch._dynamo.reset()
            backend = hcms_compile.make_backend(chunks=chunks, exact=False)
            compiled = torch.compile(fn, backend=backend, fullgraph=True)
            got = compiled(*inputs)
            hcms_ms = _median_ms(compiled, inputs, args.iters)
            traces = {}
            for name, f in (("plain", plain), ("hcms", compiled)):
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(2):
                        f(*inputs)
                    torch.cuda.synchronize()
                path = args.out / f"trace_{name}_s{seq}_c{chunks}.json"
                prof.export_chrome_trace(str(path))
                traces[name] = _summary(_kernels(path))
            run = {
                "seq": seq, "heads": args.heads, "head_dim": args.head_dim, "chunks": chunks,
                "sites": [(s.kernel, s.status, s.chunk_sizes, s.reason) for r in backend.reports for s in r.sites],
                "bitwise_equal_to_plain": bool(torch.equal(want, got)),
                "max_abs_diff": float((want.float() - got.float()).abs().max()),
                "plain_ms": round(plain_ms, 3), "hcms_ms": round(hcms_ms, 3),
                "plain_trace": traces["plain"], "hcms_trace": traces["hcms"],
            }
            results["runs"].append(run)
            print(json.dumps(run, indent=1), flush=True)
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
