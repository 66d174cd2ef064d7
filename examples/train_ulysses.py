"""Train a small Ulysses transformer with the HCMS backend on 2 CPU ranks (gloo).

    python examples/train_ulysses.py

`torch.compile(model, backend=hcms_backend)` is the only change to the training loop: the forward
and backward graphs both have their all-to-all -> attention -> all-to-all sites chunked.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hcms_compile
from hcms_compile.models import UlyssesConfig, UlyssesTransformer

WORLD, BATCH, TOKENS, STEPS = 2, 2, 128, 5


def train(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = UlyssesConfig(heads=8, head_dim=16, blocks=2, causal=True)
    model = UlyssesTransformer(cfg, dist.group.WORLD)
    backend = hcms_compile.make_backend(chunks=(3, 1), inner="aot_eager")  # or hcms_compile.hcms_backend
    compiled = torch.compile(model, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randn(BATCH, TOKENS, cfg.hidden)
    target = data.roll(1, dims=1)
    shard = slice(rank * TOKENS // WORLD, (rank + 1) * TOKENS // WORLD)  # Ulysses: each rank holds S/P tokens
    for step in range(STEPS):
        loss = torch.nn.functional.mse_loss(compiled(data[:, shard]), target[:, shard])
        optimizer.zero_grad()
        loss.backward()
        for p in model.parameters():  # sequence parallelism: every rank's gradient covers its tokens
            dist.all_reduce(p.grad)
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            print(f"step {step}: loss {total.item() / WORLD:.4f}")
    if rank == 0:
        print(backend.tables())
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo threads can abort interpreter teardown (pytorch/pytorch#179291)


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    mp.spawn(train, args=(free_port,), nprocs=WORLD, join=True)
