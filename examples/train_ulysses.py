"""Train a small Ulysses transformer with the HCMS backend on 2 CPU ranks (gloo).

    python examples/train_ulysses.py

`torch.compile(model, backend=...)` is the only change to the training loop: the forward and
backward graphs both have their all-to-all -> attention -> all-to-all sites chunked. The chunk
sizes are fixed here, (3, 1); with the default `chunks="auto"` the cost model would leave these
sites alone, since CPU ranks on one machine have no network to hide.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import hcms_compile
from hcms_compile.models import UlyssesConfig, UlyssesTransformer
from hcms_compile.spawn import spawn_gloo

WORLD, BATCH, TOKENS, STEPS = 2, 2, 128, 5


def train(rank: int) -> None:
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


if __name__ == "__main__":
    spawn_gloo(train, WORLD)
