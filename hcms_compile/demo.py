"""`hcms demo`: compile a real Ulysses transformer with the HCMS backend on CPU ranks and check it.

Spawns N processes joined by gloo. Each builds the same seeded model and compiles it twice with
`torch.compile`: once with the HCMS backend, once with the same inner compiler alone. One training
step on each rank's shard of the same input must give bitwise-equal outputs and gradients. Rank 0
prints the forward and backward site tables, the check, and CPU timings (gloo on one machine: these
show cost, not the overlap a GPU cluster gains). The demo fails (exit status 1) when the outputs
differ, and when no site was rewritten: equal bits would then prove nothing.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .backend import make_backend
from .models import UlyssesConfig, UlyssesTransformer
from .spawn import spawn_gloo


@dataclass(frozen=True)
class DemoArgs:
    ranks: int = 4
    batch: int = 2
    tokens_per_rank: int = 64
    chunks: int | tuple[int, ...] = 2
    repeats: int = 5
    inner: str = "inductor"
    config: UlyssesConfig = UlyssesConfig()


def _median_ms(step, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _train_step(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = model(x)
    out.sum().backward()
    return out.detach(), [x.grad, *(p.grad for p in model.parameters())]


def _demo(rank: int, args: DemoArgs, verdict_path: str) -> None:
    cfg = args.config
    models = []
    for _ in range(2):  # the same seed gives the same weights: one model per compiled variant
        torch.manual_seed(0)
        models.append(UlyssesTransformer(cfg, dist.group.WORLD))
    model, reference = models
    full = torch.randn(args.batch, args.ranks * args.tokens_per_rank, cfg.hidden)
    x = full.chunk(args.ranks, dim=1)[rank].contiguous()

    backend = make_backend(chunks=args.chunks, inner=args.inner)
    hcms = torch.compile(model, backend=backend, fullgraph=True)
    plain = torch.compile(reference, backend=args.inner, fullgraph=True)
    # compile afresh: the time shown is a cold compile (warm caches would replay the recorded reports)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        start = time.perf_counter()
        out, grads = _train_step(hcms, x)
        compile_s = time.perf_counter() - start
    want_out, want_grads = _train_step(plain, x)
    equal = torch.equal(out, want_out) and all(torch.equal(a, b) for a, b in zip(grads, want_grads, strict=True))
    plain_ms = _median_ms(lambda: _train_step(plain, x), args.repeats)
    hcms_ms = _median_ms(lambda: _train_step(hcms, x), args.repeats)
    rewritten = sum(site.rewritten for report in backend.reports for site in report.sites)
    verdict = torch.tensor([int(equal), rewritten])
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
    equal_everywhere, rewritten_everywhere = (int(v) for v in verdict.tolist())
    if rank:
        return
    print(f"hcms demo: {cfg.blocks}-block Ulysses transformer ({cfg.layout} layout), {args.ranks} CPU ranks over "
          f"gloo, {cfg.heads} heads x {cfg.head_dim}, batch {args.batch}, {args.ranks * args.tokens_per_rank} "
          f"tokens, chunks={args.chunks}")
    print(f"torch.compile(model, backend=make_backend(chunks={args.chunks!r}, inner={args.inner!r})): first "
          f"training step (compile included) {compile_s:.1f} s\n")
    for report in backend.reports:
        print(report.table(), end="\n\n")
    print("outputs and gradients bitwise equal to the same model compiled with "
          f"backend={args.inner!r} alone, on every rank: {'yes' if equal_everywhere else 'NO'}")
    print(f"median training step on rank 0 over {args.repeats} runs: {args.inner} {plain_ms:.1f} ms, "
          f"HCMS {hcms_ms:.1f} ms (CPU and gloo on one machine: no network to hide; what changes is the "
          "number of gloo calls, each with a fixed cost, and the copies chunking adds)")
    problem = ""
    if not equal_everywhere:
        problem = "the HCMS-compiled model differs from the plain compiled model"
    elif not rewritten_everywhere:
        problem = ("no site was rewritten (see the reasons above), so the equal bits prove nothing: pass --chunks "
                   "with a count that fits the local heads")
    with open(verdict_path, "w") as out:
        out.write(problem or "ok")


def run_demo(args: DemoArgs) -> int:
    """Run the demo; 0 when every rank rewrote a site and matched bit for bit, else 1 (with the reason on stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        verdict_path = os.path.join(tmp, "verdict")
        # one core per rank keeps the ranks from fighting over this machine
        spawn_gloo(_demo, args.ranks, args, verdict_path)
        with open(verdict_path) as verdict:
            problem = verdict.read()
    if problem == "ok":
        return 0
    print(f"hcms demo: FAILED: {problem}", file=sys.stderr)
    return 1
