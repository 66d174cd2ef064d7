"""`hcms demo`: rewrite a real Ulysses transformer on CPU ranks and check it bit for bit.

Spawns N processes joined by gloo. Each builds the same seeded model, traces it with
torch.export, runs the HCMS rewrite, and runs the original and the rewritten graph on its shard of
the same input. Rank 0 prints the site table, whether every rank's output was bitwise equal, and
CPU timings (gloo on one machine: these show cost, not the overlap a GPU cluster gains).
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .api import rewrite
from .models import UlyssesConfig, UlyssesTransformer


@dataclass(frozen=True)
class DemoArgs:
    ranks: int = 4
    batch: int = 1
    tokens_per_rank: int = 64
    chunks: int | tuple[int, ...] = 2
    repeats: int = 5
    config: UlyssesConfig = UlyssesConfig()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median_ms(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _rank_main(rank: int, port: int, args: DemoArgs) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    torch.set_num_threads(1)  # one core per rank keeps the ranks from fighting over this machine
    _demo(rank, args)
    dist.barrier()  # no rank tears gloo down while a peer still has traffic in flight
    dist.destroy_process_group()
    # Gloo worker threads can still hold tensors at interpreter teardown and abort the process
    # (pytorch/pytorch#179291); everything is printed, so skip the teardown.
    sys.stdout.flush()
    os._exit(0)


def _demo(rank: int, args: DemoArgs) -> None:
    cfg = args.config
    torch.manual_seed(0)
    model = UlyssesTransformer(cfg, dist.group.WORLD).eval()
    full = torch.randn(args.batch, args.ranks * args.tokens_per_rank, cfg.hidden)
    x = full.chunk(args.ranks, dim=1)[rank].contiguous()
    with torch.no_grad():
        start = time.perf_counter()
        original = torch.export.export(model, (x,), strict=False).module()
        traced_s = time.perf_counter() - start
        start = time.perf_counter()
        result = rewrite(original, chunks=args.chunks)
        rewrite_s = time.perf_counter() - start
        want, got = original(x), result.graph_module(x)
        plain_ms = _median_ms(original, x, args.repeats)
        hcms_ms = _median_ms(result.graph_module, x, args.repeats)
    equal = torch.tensor([int(torch.equal(want, got))])
    dist.all_reduce(equal, op=dist.ReduceOp.MIN)
    if rank:
        return
    print(f"hcms demo: {cfg.blocks}-block Ulysses transformer ({cfg.layout} layout), {args.ranks} CPU ranks "
          f"over gloo, {cfg.heads} heads x {cfg.head_dim}, {args.ranks * args.tokens_per_rank} tokens, "
          f"chunks={args.chunks}")
    print(f"traced with torch.export in {traced_s:.2f} s; HCMS rewrite in {rewrite_s * 1e3:.0f} ms\n")
    print(result.table())
    print()
    print(f"outputs bitwise equal on every rank: {'yes' if equal.item() else 'NO'}")
    print(f"median forward on rank 0 over {args.repeats} runs: plain {plain_ms:.1f} ms, HCMS {hcms_ms:.1f} ms "
          "(CPU and gloo on one machine: no network to hide, so no speed-up is expected here)")
    if not equal.item():
        raise SystemExit("the rewritten model's output differs from the original")


def run_demo(args: DemoArgs) -> None:
    mp.spawn(_rank_main, args=(_free_port(), args), nprocs=args.ranks, join=True)
