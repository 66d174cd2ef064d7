"""Wan2.2's video transformer under Ulysses, compiled with Inductor alone and with HCMS: per-step
time, the bitwise check and the site tables.

    torchrun --nproc_per_node=N examples/wan22_ulysses.py --layers 2 --frames 81 --height 480 --width 832
    python examples/wan22_ulysses.py --tiny --ranks 2        # a CPU dry run on gloo processes

The model is diffusers' `WanTransformer3DModel` with the Wan2.2 A14B transformer's width (40 heads
x 128, FFN 13824, text dim 4096), random weights, bf16 on GPUs, and `--layers` of its 40 blocks. The
token count is a real video's: 81 frames at 480x832 are 21 x 30 x 52 = 32,760 tokens after the VAE
(4x time, 8x space) and the 1x2x2 patch. With N >= 2 ranks Ulysses is diffusers' own context
parallelism (`ContextParallelConfig(ulysses_degree=N)` and `enable_parallelism`), which splits the
sequence at the model's entry and gathers it at its exit. diffusers refuses a degree of 1, so on
one rank the example puts the same exchange around the model's own self-attention call
(`one_rank_ulysses`: q, k and v through a one-rank all-to-all in, the output out, as diffusers'
templated Ulysses does), so that the site exists and HCMS can act on it; every byte then stays on
the GPU.

Every mode uses the `--inner` compiler (Inductor by default): alone, and as HCMS's inner compiler
with each `--chunks` setting (`--chunks auto,2` compiles two HCMS modes). The model first runs once
eagerly (see `warm_up`), so that every mode traces the same graphs. Each mode then compiles the
model afresh (`torch._dynamo.reset()`), runs one step (compile included, reported), then `--steps`
timed steps (a barrier and a synchronize around each; the slowest rank's time). Each HCMS mode's
output is compared with the inner compiler's alone (`torch.equal`, on every rank).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

import hcms_compile
from hcms_compile.spawn import join_torchrun, leave_gloo, spawn_gloo, under_torchrun

WAN22_A14B = dict(num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                  freq_dim=256, ffn_dim=13824, patch_size=(1, 2, 2), cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TINY = dict(WAN22_A14B, num_attention_heads=4, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=128)
TEXT_TOKENS = 512  # the text encoder's context length the model is built for


def one_rank_ulysses(group: dist.ProcessGroup) -> None:
    """Put a one-rank Ulysses exchange around the Wan model's self-attention calls."""
    from diffusers.models.transformers import transformer_wan

    dispatch = transformer_wan.dispatch_attention_fn

    def exchange(x: torch.Tensor) -> torch.Tensor:  # [B, S, H, D]: sequence to heads and back, on one rank
        y = funcol.all_to_all_single(x.contiguous(), None, None, group)
        return funcol.wait_tensor(y)

    def ulysses(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if key.shape[1] != query.shape[1]:  # cross-attention to the text: no exchange, as in diffusers
            return dispatch(query, key, value, *args, **kwargs)
        return exchange(dispatch(exchange(query), exchange(key), exchange(value), *args, **kwargs))

    transformer_wan.dispatch_attention_fn = ulysses


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, world: int) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)  # the same weights on every rank and in every mode
    config = dict(TINY if args.tiny else WAN22_A14B, num_layers=args.layers)
    model = WanTransformer3DModel(**config).to(device=device, dtype=dtype).eval()
    if world > 1:
        from diffusers import ContextParallelConfig

        if device.type == "cpu":  # diffusers picks the rank's device modulo the accelerator count, 0 on a CPU
            torch.accelerator.device_count = lambda: 1
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    else:
        one_rank_ulysses(dist.group.WORLD)
    return model


def inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, text_dim: int) -> dict[str, Any]:
    latent = ((args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    gen = torch.Generator(device="cpu").manual_seed(1)
    return dict(
        hidden_states=torch.randn(1, 16, *latent, generator=gen).to(device, dtype),
        timestep=torch.tensor([500], device=device),
        encoder_hidden_states=torch.randn(1, TEXT_TOKENS, text_dim, generator=gen).to(device, dtype),
        return_dict=False,
    )


def warm_up(model: torch.nn.Module, batch: dict[str, Any]) -> None:
    """One eager call, before any compilation. diffusers' context-parallel hooks fill an argument-index
    cache (`ModuleForwardMetadata.cached_parameter_indices`) with `inspect.signature` on their first call,
    which Dynamo cannot trace: a first call under torch.compile breaks the graph in blocks.0's split hook
    and compiles the model as several graphs (7 for `--tiny --ranks 2`), every later compile as one graph.
    Without this call only the first mode would get the broken graphs, and Inductor's output for them
    differs from its output for the one graph (by up to 4.8e-7 in the tiny CPU run, Inductor alone),
    which the bitwise check would then blame on HCMS."""
    with torch.no_grad():
        model(**batch)


def run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(args, device, dtype, world)
    text_dim = (TINY if args.tiny else WAN22_A14B)["text_dim"]
    batch = inputs(args, device, dtype, text_dim)
    tokens = batch["hidden_states"][0, 0].numel() // 4
    if rank == 0:
        print(f"Wan2.2 transformer, {args.layers} block(s), {model.config.num_attention_heads} heads x "
              f"{model.config.attention_head_dim}, {tokens} video tokens, {world} rank(s) on {device.type}, {dtype}")
    warm_up(model, batch)
    outputs, times = {}, {}
    modes = {"plain": None, **{f"hcms chunks={chunks}": chunks for chunks in args.chunks}}
    for mode, chunks in modes.items():
        torch._dynamo.reset()
        backend = (args.inner if chunks is None
                   else hcms_compile.make_backend(chunks=chunks, inner=args.inner, fuse=not args.no_fuse))
        compiled = torch.compile(model, backend=backend)
        with torch.no_grad():
            start = time.perf_counter()
            outputs[mode] = compiled(**batch)[0].clone()
            first = time.perf_counter() - start
            steps = []
            for _ in range(args.steps):
                dist.barrier()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                compiled(**batch)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                steps.append(elapsed.item())
        times[mode] = statistics.median(steps)
        if rank == 0:
            name = f"{args.inner} alone" if mode == "plain" else f"HCMS {mode[5:]} ({args.inner})"
            print(f"{name}: first step (compile included) {first:.1f} s, median step {times[mode] * 1e3:.1f} ms "
                  f"over {args.steps}")
            if mode != "plain":
                for report in backend.reports:
                    print(report.table())
        if mode != "plain":
            same = torch.tensor([int(torch.equal(outputs["plain"], outputs[mode]))], device=device)
            dist.all_reduce(same, op=dist.ReduceOp.MIN)
            if rank == 0:
                print(f"{mode}: outputs bitwise equal to {args.inner} alone on every rank: "
                      f"{'yes' if same.item() else 'NO'}; step time / {args.inner} alone: "
                      f"{times[mode] / times['plain']:.3f}")


def _chunk_settings(text: str) -> list[int | str]:
    """--chunks: "auto", a count, or a comma-separated list of them."""
    try:
        return [item if item == "auto" else int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give auto or a count of chunks, comma-separated") from None


def _spawned(rank: int, args: argparse.Namespace) -> None:
    run(args, rank, dist.get_world_size(), torch.device("cpu"))
    leave_gloo()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (Wan2.2 A14B has 40)")
    parser.add_argument("--frames", type=int, help="video frames (default 81; 5 with --tiny)")
    parser.add_argument("--height", type=int, help="video height in pixels (default 480; 64 with --tiny)")
    parser.add_argument("--width", type=int, help="video width in pixels (default 832; 64 with --tiny)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--chunks", type=_chunk_settings, default=["auto"],
                        help="HCMS chunks: auto or a count; a comma-separated list compiles one HCMS mode each")
    parser.add_argument("--no-fuse", action="store_true", help="one all-to-all per tensor in every chunk")
    parser.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager"),
                        help="the compiler, alone and under HCMS")
    parser.add_argument("--tiny", action="store_true", help="a small model and video for a CPU dry run")
    parser.add_argument("--ranks", type=int, default=2, help="gloo processes without torchrun")
    args = parser.parse_args()
    for name, real, tiny in (("frames", 81, 5), ("height", 480, 64), ("width", 832, 64)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else real)
    if under_torchrun():
        device = join_torchrun()
        run(args, dist.get_rank(), dist.get_world_size(), device)
        dist.destroy_process_group()
    else:
        spawn_gloo(_spawned, args.ranks, args)


if __name__ == "__main__":
    main()
