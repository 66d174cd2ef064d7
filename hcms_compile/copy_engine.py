"""The copy-engine exchange: an all-to-all whose peer-to-peer bytes move with copy engines and whose
ranks signal each other with stream memory operations, so that what crosses a link needs no SM while
an attention kernel runs. Copies that stay on one GPU (staging, the own block) run on the SMs
whatever the driver is asked (measured on the H200, BENCHMARKS.md).

Terms
- exchange: an all-to-all with equal splits on dim 0 over a process group of P ranks: rank r's input
  holds P equal blocks and block j goes to rank j; rank r's output block j is what rank j sent to r.
  `torch.ops.hcms.all_to_all(input, group_name)` is the op; its result is waited on with
  `_c10d_functional.wait_tensor`, as funcol's collectives are, so graphs treat it like one.
- symmetric buffer: memory every rank of the group allocates with `torch.distributed._symmetric_memory`
  (CUDA backend) and maps into every peer's address space (`rendezvous`). One per (group, device,
  block size), made by the first exchange of that size, outside any compiled code, and kept.
- slot: a buffer holds two slots of P blocks; consecutive exchanges of one size alternate slots.
- flags: 32-bit words in each rank's signal pad: READY[slot][j] on rank r says rank j's blocks for
  this slot are staged. Peers write them with `cuStreamWriteValue32` and the owner waits on them with
  `cuStreamWaitValue32` (`cuda_driver.py`): the GPU's front end runs these, no SM does, so they never
  wait for a persistent attention kernel's tail. A waiter consumes its flag (writes 0 back), so the
  same fixed values serve every replay of a CUDA graph: nothing depends on a host-side counter baked
  into a capture.
- slot reuse: rank r stages exchange e+2 into the slot of exchange e only after finishing e+1, which
  needed READY for e+1 from every peer j; j wrote it after its own pulls of e (one stream, in order),
  so no peer still reads the slot. Two slots and READY are the whole handshake.
- comm stream: one per device. The exchange runs there; a `Work` registered on the output records
  an event on it, and the graph's `wait_tensor` makes the consumer's stream wait for that event.
- peer view (`_PeerView`): what one rank sees of the others: every rank's buffer and flag words as
  addresses in its own address space. The protocol reads nothing else, so the same code runs over
  symmetric memory (real ranks, one process per GPU) and over plain buffers of one GPU
  (`Simulation`, P virtual ranks on P streams: peer offsets, slots and flags checked on one device).

Steps of one exchange on rank r (a pull):
1. The comm stream waits for the current stream (the input is ready).
2. r's own block is copied from the input to the output (with P = 1 it goes through the slot too,
   so that one GPU runs the whole protocol).
3. Stage the blocks for the peers into r's slot (contiguous local copies; `cuda_driver.copy`).
4. For each peer j: write READY[slot][r] = 1 on j.
5. For each peer j, starting after r: wait READY[slot][j] and consume it; copy block r of j's slot
   into output block j (a peer-to-peer transfer over NVLink, asked of the copy engines).
6. Register a `Work` whose event the graph's `wait_tensor` waits for.

Where the copy-engine path cannot run (a CPU or gloo group, no symmetric memory, several nodes, no
peer access) the op runs the group's own all-to-all (`_c10d_functional.all_to_all_single`): results are
the same bytes, so the CPU suite runs every graph through this op. `support` says, from facts every
rank of a job shares, whether a group can take the copy-engine path; the first exchange on a group
checks what only running can tell (allocation, rendezvous) and all ranks agree on the outcome.
Multicast stays off: `TORCH_SYMM_MEM_DISABLE_MULTICAST=1` is set before the first rendezvous, and
on a job that set it to anything else `support` says so and the group's all-to-all runs.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed._local_tensor import LocalTensorMode

from . import cuda_driver

log = logging.getLogger("hcms_compile")

OP_NAME = "hcms::all_to_all"
MULTICAST_ENV = "TORCH_SYMM_MEM_DISABLE_MULTICAST"
SLOTS = 2


# -- the op ----------------------------------------------------------------------------------------


@torch.library.custom_op(OP_NAME, mutates_args=())
def all_to_all(input: torch.Tensor, group_name: str) -> torch.Tensor:
    """An all-to-all of `input`'s equal dim-0 blocks over the group; wait on the result with
    `torch.ops._c10d_functional.wait_tensor`. On CPU (and wherever the copy-engine path cannot run)
    this is the group's own all-to-all."""
    return _group_all_to_all(input, group_name)


@all_to_all.register_fake
def _(input: torch.Tensor, group_name: str) -> torch.Tensor:
    world = dist.distributed_c10d._get_group_size_by_name(group_name)
    torch._check(input.shape[0] % world == 0,
                 lambda: f"hcms all_to_all: dim 0 ({input.shape[0]}) must split evenly over {world} ranks")
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@all_to_all.register_kernel("cuda")
def _(input: torch.Tensor, group_name: str) -> torch.Tensor:
    channel = _channel(group_name, input)
    if channel is None:
        return _group_all_to_all(input, group_name)
    return channel.exchange(input)


def _in_local_tensor_mode(mode: LocalTensorMode, func: object, types: object, args: tuple, kwargs: dict) -> object:
    # in-process ranks (hcms_compile.testing): the mode moves the ranks' data for funcol's op
    with mode:
        return _group_all_to_all(*args, **kwargs)


all_to_all.register_torch_dispatch(LocalTensorMode, _in_local_tensor_mode)


def _setup_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
    ctx.group_name = inputs[1]


def _backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    # an all-to-all of equal blocks is its own transpose: block j of the gradient goes back to rank j
    out = torch.ops.hcms.all_to_all(grad.contiguous(), ctx.group_name)
    return torch.ops._c10d_functional.wait_tensor(out), None


all_to_all.register_autograd(_backward, setup_context=_setup_context)


_lowered = False


def op() -> torch._ops.OpOverload:
    """The op, with its Inductor lowering registered (once, when a graph first emits it, or at import
    where Inductor is loaded already). A graph holding the op that reaches Inductor some other way
    (an exported program in a fresh process) must call this first: importing Inductor's lowering at
    `import hcms_compile` would cost seconds every user pays."""
    global _lowered
    if not _lowered:
        _register_inductor_lowering()
        _lowered = True
    return torch.ops.hcms.all_to_all.default


def _register_inductor_lowering() -> None:
    # As an out-of-place collective, not a plain extern kernel: Inductor then keeps the input buffer
    # from being reused, and the output from being read, until the wait (its "out-of-place collective
    # safety"). As an extern kernel the input's memory went to the next chunk's send buffer while the
    # comm stream was still reading it (found on the H200: hcms-2 over copy engines lost bits).
    from torch._inductor import ir
    from torch._inductor.lowering import add_layout_constraint, constrain_to_fx_strides, register_lowering

    target = torch.ops.hcms.all_to_all
    add_layout_constraint(target, constrain_to_fx_strides)

    @register_lowering(target)
    def _lower(inp: object, group_name: str) -> object:
        node = ir._CollectiveKernel.create_out_of_place(target.default, inp, group_name)
        return ir.TensorBox.create(node)


if "torch._inductor.lowering" in sys.modules:
    op()


def _group_all_to_all(input: torch.Tensor, group_name: str) -> torch.Tensor:
    """The group's own all-to-all; the caller's `wait_tensor` waits for it."""
    world = dist.distributed_c10d._get_group_size_by_name(group_name)
    splits = [input.shape[0] // world] * world
    return torch.ops._c10d_functional.all_to_all_single(input.contiguous(), splits, splits, group_name)


# -- whether a group can take the copy-engine path -------------------------------------------------


def support(group_name: str, device: torch.device) -> str | None:
    """None where exchanges on `group_name` from `device` can move with copy engines, else why not.

    Reads only what every rank of a homogeneous job shares (device kind, group size and backend,
    the node layout torchrun describes, the node's peer access, the build), so every rank answers
    alike and plans alike.
    """
    if device.type != "cuda":
        return f"the exchange runs on {device.type}, not CUDA"
    if not dist.is_available() or not dist.is_initialized():
        return "no process group is initialised"
    try:
        group = dist.distributed_c10d._resolve_process_group(group_name)
    except Exception as err:  # noqa: BLE001 - an unknown name is a reason, not a crash
        return f"process group {group_name!r} cannot be resolved ({err})"
    backend = dist.get_backend(group)
    if "nccl" not in str(backend).lower():
        return f"process group backend is {backend}, not NCCL on CUDA"
    world = group.size()
    if world > torch.cuda.device_count():
        return f"{world} ranks but this node has {torch.cuda.device_count()} GPU(s): the group spans nodes"
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local and local.isdigit() and int(local) > 0:
        ranks = dist.get_process_group_ranks(group)
        if len({r // int(local) for r in ranks}) > 1:
            return f"the group's ranks {ranks} span nodes of {local} ranks each (LOCAL_WORLD_SIZE)"
    multicast = os.environ.get(MULTICAST_ENV)
    if multicast is not None and multicast.strip() != "1":
        return f"{MULTICAST_ENV}={multicast!r}: the copy-engine exchange needs multicast off (1)"
    count = torch.cuda.device_count()
    for a in range(min(world, count)):
        for b in range(min(world, count)):
            if a != b and not torch.cuda.can_device_access_peer(a, b):
                return f"GPU {a} has no peer access to GPU {b}"
    try:
        from torch.distributed import _symmetric_memory as symm_mem
    except ImportError:
        return "this torch build has no symmetric memory"
    if symm_mem.get_backend(device) not in (None, "CUDA"):
        return f"symmetric memory uses the {symm_mem.get_backend(device)} backend, not CUDA"
    return cuda_driver.unavailable()


# -- the protocol over one rank's view of its peers --------------------------------------------------


def flag_words(world: int) -> int:
    """32-bit flag words each rank needs: READY per slot and source rank."""
    return SLOTS * world


def _ready(slot: int, source: int, world: int) -> int:
    """The byte offset of READY[slot][source] in a rank's flag words."""
    return 4 * (slot * world + source)


def initial_flags(world: int) -> torch.Tensor:
    """A rank's flag words before its first exchange: nothing staged."""
    return torch.zeros(flag_words(world), dtype=torch.int32)


@dataclass
class _PeerView:
    """What rank `rank` sees of its group: each rank's buffer (bytes, `SLOTS` slots of P blocks) and
    the address of each rank's flag words, all in this rank's address space."""

    rank: int
    world: int
    buffers: list[torch.Tensor]
    flags: list[int]
    stream: torch.cuda.Stream
    through_self: bool  # route the own block through the slot too (one GPU: run the whole protocol)
    views: dict[tuple[int, int], list[torch.Tensor]] = field(default_factory=dict, repr=False)

    def _slots(self, n: int, slot: int) -> list[torch.Tensor]:
        """Each rank's slot `slot` as [P, n] bytes (cached: views cost host time on every exchange)."""
        if (n, slot) not in self.views:
            self.views[(n, slot)] = [b[: SLOTS * self.world * n].view(SLOTS, self.world, n)[slot] for b in self.buffers]
        return self.views[(n, slot)]

    def exchange(self, send: torch.Tensor, out: torch.Tensor, slot: int) -> None:
        """Steps 2-5 on `self.stream`: `send` and `out` are [P, n] byte tensors."""
        r, world = self.rank, self.world
        slots = self._slots(send.shape[1], slot)
        peers = [(r + step) % world for step in range(world)]  # r first when it goes through the slot
        if self.through_self:
            cuda_driver.copy(self.stream, slots[r], send)
        else:  # the own block directly; the blocks around it, in at most two contiguous copies
            peers = peers[1:]
            cuda_driver.copy(self.stream, out[r], send[r])
            if r > 0:
                cuda_driver.copy(self.stream, slots[r][:r], send[:r])
            if r < world - 1:
                cuda_driver.copy(self.stream, slots[r][r + 1:], send[r + 1:])
        for j in peers:
            cuda_driver.write(self.stream, self.flags[j] + _ready(slot, r, world), 1)
        for j in peers:
            address = self.flags[r] + _ready(slot, j, world)
            cuda_driver.wait(self.stream, address, 1)
            cuda_driver.write(self.stream, address, 0)
            cuda_driver.copy(self.stream, out[j], slots[j][r])


class _Work(torch._C._distributed_c10d.Work):
    """What `wait_tensor` finds registered on an exchange's output: an event on the comm stream."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        super().__init__()
        self.event = torch.cuda.Event()
        self.event.record(stream)

    def wait(self, timeout: object = None) -> bool:
        self.event.wait(torch.cuda.current_stream())
        return True


def _as_blocks(t: torch.Tensor, world: int) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8).view(world, -1)


@dataclass
class Channel:
    """The exchanges of one size on one group from one device: the symmetric buffer, the view of the
    peers, and which slot the next exchange uses."""

    group_name: str
    view: _PeerView
    block_bytes: int
    next_slot: int = 0
    keep: list[object] = field(default_factory=list)  # what must outlive the view (symmetric memory handle)

    def exchange(self, input: torch.Tensor) -> torch.Tensor:
        world = self.view.world
        input = input.contiguous()
        out = torch.empty_like(input)
        slot, self.next_slot = self.next_slot, (self.next_slot + 1) % SLOTS
        stream = self.view.stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.view.exchange(_as_blocks(input, world), _as_blocks(out, world), slot)
            # the caching allocator may hand `input` to the current stream's next kernel otherwise
            input.record_stream(stream)
            out.record_stream(stream)
            torch._C._distributed_c10d._register_work(out, _Work(stream))
        return out


# -- channels over symmetric memory -----------------------------------------------------------------

_channels: dict[tuple[str, int, int], Channel | None] = {}
_comm_streams: dict[int, torch.cuda.Stream] = {}
_lock = threading.Lock()


def comm_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _comm_streams:
        _comm_streams[index] = torch.cuda.Stream(device=index)
    return _comm_streams[index]


def _channel(group_name: str, input: torch.Tensor) -> Channel | None:
    """The channel for `input`'s block size, made on first use (a collective: every rank makes it at
    the same exchange), or None where the copy-engine path cannot run on this group."""
    world = dist.distributed_c10d._get_group_size_by_name(group_name)
    nbytes = input.numel() * input.element_size()
    if nbytes % world:
        raise ValueError(f"hcms all_to_all: {nbytes} bytes do not split evenly over {world} ranks")
    key = (group_name, input.device.index, nbytes // world)
    with _lock:
        if key not in _channels:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("hcms copy-engine exchange: the first exchange of a size allocates and "
                                   "rendezvouses its symmetric buffer and cannot run under CUDA graph capture; "
                                   "run one step before capturing (torch.compile's cudagraph trees do)")
            _channels[key] = _open(group_name, input.device, nbytes // world)
        return _channels[key]


def _open(group_name: str, device: torch.device, block_bytes: int) -> Channel | None:
    from torch.distributed import _symmetric_memory as symm_mem

    reason = support(group_name, device)
    group = dist.distributed_c10d._resolve_process_group(group_name)
    buffer = None
    if reason is None:
        os.environ.setdefault(MULTICAST_ENV, "1")
        try:
            buffer = symm_mem.empty(SLOTS * group.size() * block_bytes, dtype=torch.uint8, device=device)
        except Exception as err:  # noqa: BLE001 - agreed on below, then reported
            reason = f"symmetric memory allocation failed ({type(err).__name__}: {err})"
    # every rank must take the same path, or the collectives mismatch and the job hangs
    verdict = torch.tensor([0 if reason is None else 1], device=device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MAX, group=group)
    if verdict.item():
        log.warning("hcms: copy-engine exchange unavailable on group %s (%s); using the group's all-to-all",
                    group_name, reason or "another rank could not allocate symmetric memory")
        return None
    handle = symm_mem.rendezvous(buffer, group_name)
    world = handle.world_size
    words = flag_words(world)
    if handle.signal_pad_size < 4 * words:
        raise RuntimeError(f"hcms copy-engine exchange: the signal pad holds {handle.signal_pad_size} bytes, "
                           f"{4 * words} are needed")
    handle.get_signal_pad(handle.rank, (words,), dtype=torch.int32).copy_(initial_flags(world).to(device))
    torch.cuda.synchronize(device)
    # no peer may signal before every rank has set its flags
    dist.all_reduce(torch.zeros(1, device=device), group=group)
    torch.cuda.synchronize(device)
    buffers = [handle.get_buffer(j, (buffer.numel(),), torch.uint8) for j in range(world)]
    flags = [handle.signal_pad_ptrs[j] for j in range(world)]
    view = _PeerView(handle.rank, world, buffers, flags, comm_stream(device), through_self=world == 1)
    return Channel(group_name, view, block_bytes, keep=[handle, buffer])


def channel_state(group_name: str) -> list[Channel]:
    """The open channels of a group (for reports and tests)."""
    return [c for (name, _, _), c in _channels.items() if name == group_name and c is not None]


# -- P virtual ranks on one GPU ----------------------------------------------------------------------


class Simulation:
    """P virtual ranks on one GPU, each with its own buffer, flag words and stream, running the same
    protocol as real ranks (`_PeerView.exchange`): checks peer offsets, slots and flags where one
    GPU cannot host several processes' symmetric memory."""

    def __init__(self, world: int, block_bytes: int, device: torch.device | str = "cuda") -> None:
        device = torch.device(device)
        self.world = world
        self.buffers = [torch.zeros(SLOTS * world * block_bytes, dtype=torch.uint8, device=device)
                        for _ in range(world)]
        self.flag_tensors = [initial_flags(world).to(device) for _ in range(world)]
        flags = [t.data_ptr() for t in self.flag_tensors]
        self.views = [_PeerView(r, world, self.buffers, flags, torch.cuda.Stream(device=device), through_self=False)
                      for r in range(world)]
        self.next_slot = 0

    def exchange(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every virtual rank's exchange of `inputs[r]`; returns each rank's output."""
        outs = [torch.empty_like(x) for x in inputs]
        slot, self.next_slot = self.next_slot, (self.next_slot + 1) % SLOTS
        current = torch.cuda.current_stream()
        for view, x, out in zip(self.views, inputs, outs, strict=True):
            view.stream.wait_stream(current)
            with torch.cuda.stream(view.stream):
                view.exchange(_as_blocks(x, self.world), _as_blocks(out, self.world), slot)
        for view in self.views:
            current.wait_stream(view.stream)
        return outs
