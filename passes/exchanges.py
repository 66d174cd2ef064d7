"""How a rewritten site moves its bytes: the exchange kinds, which a site may use, and the two nodes
the rewrite emits for one all-to-all.

Terms
- exchange kind: `NCCL`, the process group's own all-to-all (`_c10d_functional.all_to_all_single`:
  NCCL kernels on the SMs of a GPU, gloo on CPU), the form traced code uses; `COPY_ENGINE`,
  `torch.ops.hcms.all_to_all` (`hcms_compile/copy_engine.py`): copy engines move the bytes and
  stream memory operations signal between ranks, so no SM is used and a running attention kernel
  does not hold it back. Where it cannot run (CPU, gloo, several nodes) that op runs the group's
  own all-to-all, so a graph rewritten for it is still correct everywhere.
- exchange spec: what the user asks for: "auto", "nccl" or "copy-engine". "auto" lets the plan
  choose between the kinds the site supports; an explicit kind is used as asked.
- kinds of a site (`site_kinds`): the kinds a plan may choose from; "copy-engine" where the site's
  group is one node of CUDA ranks with peer access and symmetric memory (`copy_engine.support`).
- `Exchange`: the one interface the rewrite uses: `issue` emits the all-to-all of a contiguous,
  rank-major buffer (equal splits), `wait` the node that hands its result on. A third kind is a
  new `Exchange` in `EXCHANGES` and a price in the cost model; matching and rewriting stay as they are.

Steps:
1. `validate_exchange` rejects a malformed spec before any graph is touched.
2. `site_kinds(site, spec)` lists the kinds a site's plan chooses from, and why copy-engine is not
   among them under "auto" (or why an explicit copy-engine will run the group's all-to-all).
3. The plan (`plan.plan_site`) picks one kind per site; the rewrite calls `EXCHANGES[kind]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from . import symbolic
from .emit import Emitter
from .ops import c10d, exchange_args, is_c10d_all_to_all

NCCL = "nccl"
COPY_ENGINE = "copy-engine"
AUTO = "auto"
KINDS = (NCCL, COPY_ENGINE)


def validate_exchange(spec: object) -> str:
    if not isinstance(spec, str) or spec not in (AUTO, *KINDS):
        raise ValueError(f"exchange must be one of 'auto', 'nccl', 'copy-engine', got {spec!r}")
    return spec


def group_name(original: Node) -> str:
    """The process group name an exchange node runs on."""
    return exchange_args(original).group


class Exchange:
    """Emits one all-to-all of a contiguous buffer whose dim 0 holds `rows` rows, split evenly
    between the ranks, standing in for `original` (waited on by `original_wait`)."""

    name: str

    def issue(self, emit: Emitter, send: Node, original: Node, rows: object, world: int) -> Node:
        raise NotImplementedError

    def wait(self, emit: Emitter, issued: Node, original: Node, original_wait: Node) -> Node:
        return emit.call(c10d.wait_tensor.default, issued)


class _GroupAllToAll(Exchange):
    """The group's own all-to-all, in the traced op's form (funcol, its autograd variant, or c10d's)."""

    name = NCCL

    def issue(self, emit: Emitter, send: Node, original: Node, rows: object, world: int) -> Node:
        args = exchange_args(original)
        # a symbolic row count (a flattened buffer holding the sequence) gives split sizes as nodes
        splits = emit.size_args([symbolic.size(rows // world)] * world)
        if is_c10d_all_to_all(original):
            return emit.call(c10d.all_to_all_single.default, send, splits, splits, args.group)
        out_splits = splits if args.output_splits else args.output_splits
        in_splits = splits if args.input_splits else args.input_splits
        return emit.call(original.target, send, out_splits, in_splits, args.group)

    def wait(self, emit: Emitter, issued: Node, original: Node, original_wait: Node) -> Node:
        target = c10d.wait_tensor.default if is_c10d_all_to_all(original) else original_wait.target
        return emit.call(target, issued)


class _CopyEngineAllToAll(Exchange):
    """`torch.ops.hcms.all_to_all`: equal splits on dim 0 are all it needs, so the row count is implied."""

    name = COPY_ENGINE

    def issue(self, emit: Emitter, send: Node, original: Node, rows: object, world: int) -> Node:
        return emit.call(_copy_engine_op(), send, group_name(original))


EXCHANGES: dict[str, Exchange] = {e.name: e for e in (_GroupAllToAll(), _CopyEngineAllToAll())}


def _copy_engine_op() -> torch._ops.OpOverload:
    # hcms_compile.copy_engine, loaded with this package's parent, registers it (and its Inductor lowering)
    from hcms_compile import copy_engine

    return copy_engine.op()


@dataclass(frozen=True)
class SiteKinds:
    kinds: tuple[str, ...]  # what the plan may choose from, NCCL first
    note: str = ""  # why copy-engine is missing (auto), or why it will run the group's all-to-all (explicit)


def site_kinds(device: torch.device, group: str, spec: str) -> SiteKinds:
    """The kinds a site on `group`, computing on `device`, may use under `spec`."""
    if spec == NCCL:
        return SiteKinds((NCCL,))
    from hcms_compile import copy_engine

    why = copy_engine.support(group, device)
    if spec == COPY_ENGINE:
        return SiteKinds((COPY_ENGINE,), "" if why is None else f"copy-engine runs the group's all-to-all here: {why}")
    if why is None:
        return SiteKinds(KINDS)
    # on a CPU the reason is plain; on a GPU the user may have expected copy engines
    return SiteKinds((NCCL,), f"copy-engine exchange not available: {why}" if device.type == "cuda" else "")
