"""Running one function on N local CPU processes joined by gloo, or on the ranks torchrun started.

`hcms demo`, `hcms calibrate`, `hcms bench`, the examples and the multi-process tests all need the
same few steps, in this order:
1. pick a free TCP port on this machine for the rendezvous;
2. in each spawned process: join the gloo group as rank r of N, and give it its share of the cores
   (N ranks on one machine otherwise fight over every core);
3. run the work;
4. leave: a barrier (no rank tears gloo down while a peer still has traffic in flight), destroy
   the group, flush, and `os._exit(0)`, because gloo's worker threads can still hold tensors at
   interpreter teardown and abort the process (pytorch/pytorch#179291).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def leave_gloo() -> NoReturn:
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _rank_main(rank: int, work: Callable[..., Any], world: int, port: int, threads: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(threads)
    work(rank, *args)
    leave_gloo()


def spawn_gloo(work: Callable[..., Any], world: int, *args: Any, threads: int = 1) -> None:
    """`work(rank, *args)` on `world` new processes joined by gloo; returns when all have finished
    (an exception in any of them is raised here). `work` must be importable (a module-level function)."""
    mp.spawn(_rank_main, args=(work, world, free_port(), threads, args), nprocs=world, join=True)


def join_torchrun() -> torch.device:
    """Join the process group torchrun describes: NCCL on cuda:LOCAL_RANK where CUDA is available,
    else gloo on the CPU; returns this rank's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")
