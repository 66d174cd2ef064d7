"""A zoo of small Ulysses sequence-parallel attentions, one per layout used in the wild.

Each ``attn_<name>(q, k, v, group, *, is_causal=False, scale=None)`` takes this rank's S/P tokens of
all H heads in the layout's input layout, scatters heads and gathers sequence with all-to-all,
runs SDPA on [B, H/P, S, D], and sends the result back, returning it in the layout of ``q``.

The code is this project's own; only the *sequence of tensor layouts* around each all-to-all
follows the named library, so the compiler pass is tested against the graph shapes real code
produces. Every layout shares the invariant the pass relies on: dim 0 of the send buffer is P
blocks of H/P contiguous heads, and rank r ends up with heads [r*H/P, (r+1)*H/P).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LAYOUTS",
    "Layout",
    "attn_deepspeed_bf",
    "attn_deepspeed_sf",
    "attn_diffusers",
    "attn_dist_inplace",
    "attn_funcol",
    "attn_fused_qkv",
    "attn_stack_cat",
    "attn_stack_chunk",
    "attn_xdit",
    "attn_yunchang",
]

AttnFn = Callable[..., Tensor]


def _world(group: dist.ProcessGroup, heads: int) -> int:
    p = group.size()
    if heads % p:
        raise ValueError(f"{heads} heads are not divisible by world size {p}")
    return p


def _a2a(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Even-split functional all-to-all along dim 0 (differentiable), waited on as real libraries do."""
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(x, None, None, group))


def _sdpa(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float | None) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)


# ---------------------------------------------------------------------------------------------
# 1. hand-written functional collectives: [B, S/P, H, D]
# ---------------------------------------------------------------------------------------------


def _funcol_in(x: Tensor, group: dist.ProcessGroup, a2a: Callable[..., Tensor] = _a2a) -> Tensor:
    b, s_loc, h, d = x.shape
    p = _world(group, h)
    send = x.reshape(b, s_loc, p, h // p, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = a2a(send, group)  # [P (sequence block), B, S/P, H/P, D]
    return recv.permute(1, 3, 0, 2, 4).reshape(b, h // p, p * s_loc, d)


def _funcol_out(o: Tensor, group: dist.ProcessGroup, a2a: Callable[..., Tensor] = _a2a) -> Tensor:
    b, h_loc, s, d = o.shape
    p = group.size()
    send = o.reshape(b, h_loc, p, s // p, d).permute(2, 0, 3, 1, 4).contiguous()
    recv = a2a(send, group)  # [P (head block), B, S/P, H/P, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s // p, p * h_loc, d)


def attn_funcol(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, *,
    is_causal: bool = False, scale: float | None = None,
) -> Tensor:
    """Hand-written funcol Ulysses: [B, S/P, H, D] in and out."""
    q, k, v = (_funcol_in(x, group) for x in (q, k, v))
    return _funcol_out(_sdpa(q, k, v, is_causal, scale), group)


# ---------------------------------------------------------------------------------------------
# 2. diffusers TemplatedUlyssesAttention: [B, S/P, H, D], flat 1-D all-to-all buffers
# ---------------------------------------------------------------------------------------------


def _a2a_flat(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """diffusers sends a 1-D buffer and restores the shape before waiting."""
    shape = x.shape
    y = funcol.all_to_all_single_autograd(x.flatten(), None, None, group)
    return funcol.wait_tensor(y.reshape(shape))


def _diffusers_in(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    b, s_loc, h, d = x.shape
    p = _world(group, h)
    send = x.reshape(b, s_loc, p, h // p, d).permute(2, 1, 0, 3, 4).contiguous()
    recv = _a2a_flat(send, group)  # [P, S/P, B, H/P, D]
    return recv.flatten(0, 1).permute(1, 0, 2, 3).transpose(1, 2)  # [B, H/P, S, D]


def _diffusers_out(o: Tensor, group: dist.ProcessGroup) -> Tensor:
    b, h_loc, s, d = o.shape
    p = group.size()
    bshd = o.transpose(1, 2)
    send = bshd.reshape(b, p, s // p, h_loc, d).permute(1, 3, 0, 2, 4).contiguous()
    recv = _a2a_flat(send, group)  # [P, H/P, B, S/P, D]
    return recv.flatten(0, 1).permute(1, 2, 0, 3).contiguous()


def attn_diffusers(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, *,
    is_causal: bool = False, scale: float | None = None,
) -> Tensor:
    """diffusers-style Ulysses: [B, S/P, H, D] in and out, flattened all-to-all buffers."""
    q, k, v = (_diffusers_in(x, group) for x in (q, k, v))
    return _diffusers_out(_sdpa(q, k, v, is_causal, scale), group)


# ---------------------------------------------------------------------------------------------
# 3. yunchang all_to_all_4D: [B, S/P, H, D]
# ---------------------------------------------------------------------------------------------


def _yunchang_scatter_heads(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    b, s_loc, h, d = x.shape
    p = _world(group, h)
    send = x.reshape(b, s_loc, p, h // p, d).transpose(0, 2).contiguous()  # [P, S/P, B, H/P, D]
    recv = _a2a(send, group)
    return recv.reshape(p * s_loc, b, h // p, d).transpose(0, 1).contiguous()  # [B, S, H/P, D]


def _yunchang_scatter_seq(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    b, s, h_loc, d = x.shape
    p = group.size()
    send = x.reshape(b, p, s // p, h_loc, d).transpose(0, 3).transpose(0, 1).contiguous()
    recv = _a2a(send, group)  # [P, H/P, S/P, B, D]
    return recv.reshape(p * h_loc, s // p, b, d).transpose(0, 2).contiguous()  # [B, S/P, H, D]


def attn_yunchang(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, *,
    is_causal: bool = False, scale: float | None = None,
) -> Tensor:
    """yunchang-style Ulysses: [B, S/P, H, D] in and out, [B, S, H/P, D] in the middle."""
    q, k, v = (_yunchang_scatter_heads(x, group).transpose(1, 2) for x in (q, k, v))
    out = _sdpa(q, k, v, is_causal, scale).transpose(1, 2)
    return _yunchang_scatter_seq(out, group)


# ---------------------------------------------------------------------------------------------
# 4. DeepSpeed batch-first: [B, S/P, H, D]
# ---------------------------------------------------------------------------------------------


def _ds_bf_in(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    b, s_loc, h, d = x.shape
    p = _world(group, h)
    send = x.reshape(b, s_loc, p, h // p, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = _a2a(send, group)  # [P, B, S/P, H/P, D]
    return recv.permute(1, 0, 2, 3, 4).reshape(b, p * s_loc, h // p, d)  # [B, S, H/P, D]


def _ds_bf_out(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    b, s, h_loc, d = x.shape
    p = group.size()
    send = x.reshape(b, p, s // p, h_loc, d).transpose(0, 1).contiguous()  # [P, B, S/P, H/P, D]
    recv = _a2a(send, group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s // p, p * h_loc, d)


def attn_deepspeed_bf(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, *,
    is_causal: bool = False, scale: float | None = None,
) -> Tensor:
    """DeepSpeed batch-first Ulysses: [B, S/P, H, D] in and out."""
    q, k, v = (_ds_bf_in(x, group).transpose(1, 2) for x in (q, k, v))
    return _ds_bf_out(_sdpa(q, k, v, is_causal, scale).transpose(1, 2), group)


# ---------------------------------------------------------------------------------------------
# 5. DeepSpeed sequence-first: [S/P, B, H, D]
# ---------------------------------------------------------------------------------------------


def _ds_sf_in(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    s_loc, b, h, d = x.shape
    p = _world(group, h)
    send = x.reshape(s_loc, b, p, h // p, d).permute(2, 0, 1, 3, 4).contiguous()
    # Sequence-first: source-rank blocks already sit in sequence order, so a reshape suffices.
    return _a2a(send, group).reshape(p * s_loc, b, h // p, d)  # [S, B, H/P, D]


def _ds_sf_out(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    s, b, h_loc, d = x.shape
    p = group.size()
    send = x.reshape(p, s // p, b, h_loc, d).contiguous()  # [P, S/P, B, H/P, D]
    recv = _a2a(send, group)
    return recv.permute(1, 2, 0, 3, 4).reshape(s // p, b, p * h_loc, d)


def attn_deepspeed_sf(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, *,
    is_causal: bool = False, scale: float | None = None,
) -> Tensor:
    """DeepSpeed sequence-first Ulysses: [S/P, B, H, D] in and out."""
    q, k, v = (_ds_sf_in(x, group).permute(1, 2, 0, 3) for x in (q, k, v))
    out = _sdpa(q, k, v, is_causal, scale).permute(2, 0, 1, 3)  # [S, B, H/P, D]
    return _ds_sf_out(out, group)


# ---------------------------------------------------------------------------------------------
# 6. xDiT USP: [B, H, S/P, D]
# ---------------------------------------------------------------------------------------------


def _xdit_in(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    b, h, s_loc, d = x.shape
    p = _world(group, h)
    # Heads first: dim 0 is already P blocks of H/P heads, no extra split needed.
    send = x.permute(1, 0, 2, 3).contiguous().flatten()
    recv = _a2a(send, group)
    bhsd = recv.reshape(p, h // p, b, s_loc, d).permute(2, 1, 0, 3, 4)  # [B, H/P, P, S/P, D]
    return bhsd.reshape(b, h // p, p * s_loc, d)


def _xdit_out(o: Tensor, group: dist.ProcessGroup) -> Tensor:
    b, h_loc, s, d = o.shape
    p = group.size()
    send = o.reshape(b, h_loc, p, s // p, d).permute(2, 1, 0, 3, 4).contiguous().flatten()
    recv = _a2a(send, group)  # [P, H/P, B, S/P, D] flattened
    return recv.reshape(p * h_loc, b, s // p, d).permute(1, 0, 2, 3)  # [B, H, S/P, D]


def attn_xdit(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, *,
    is_causal: bool = False, scale: float | None = None,
) -> Tensor:
    """xDiT USP-style Ulysses: [B, H, S/P, D] in and out."""
    q, k, v = (_xdit_in(x, group) for x in (q, k, v))
    return _xdit_out(_sdpa(q, k, v, is_causal, scale), group)


# ---------------------------------------------------------------------------------------------
# 7. xDiT / sglang fused QKV: [B, H, S/P, D], one all-to-all for q, k and v together
# ---------------------------------------------------------------------------------------------


def attn_fused_qkv(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, *,
    is_causal: bool = False, scale: float | None = None,
) -> Tensor:
    """Fused-QKV Ulysses (xDiT / sglang): [B, H, S/P, D] in and out, one input all-to-all."""
    b, h, s_loc, d = q.shape
    p = _world(group, h)
    qkv = torch.stack([q, k, v])  # [3, B, H, S/P, D]
    # P outermost so each rank's slice of the buffer carries its heads of q, k and v at once.
    send = qkv.reshape(3, b, p, h // p, s_loc, d).permute(2, 0, 1, 3, 4, 5).contiguous()
    recv = _a2a(send, group)  # [P (sequence block), 3, B, H/P, S/P, D]
    qkv = recv.permute(1, 2, 3, 0, 4, 5).reshape(3, b, h // p, p * s_loc, d)
    q, k, v = qkv.unbind(0)
    return _xdit_out(_sdpa(q, k, v, is_causal, scale), group)


# ---------------------------------------------------------------------------------------------
# 8. in-place c10d all-to-all: [B, S/P, H, D]; Dynamo turns it into functional form + copy_
# ---------------------------------------------------------------------------------------------


def _a2a_inplace(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def attn_dist_inplace(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, *,
    is_causal: bool = False, scale: float | None = None,
) -> Tensor:
    """In-place ``dist.all_to_all_single`` Ulysses: [B, S/P, H, D] in and out; for Dynamo."""
    q, k, v = (_funcol_in(x, group, _a2a_inplace) for x in (q, k, v))
    return _funcol_out(_sdpa(q, k, v, is_causal, scale), group, _a2a_inplace)


# ---------------------------------------------------------------------------------------------
# 9. stack and cat instead of reshapes: [B, S/P, H, D]. The send buffer is the stack of the P head
#    blocks, the received blocks are concatenated back along the sequence with cat(unbind)
# ---------------------------------------------------------------------------------------------


def _stack_cat_in(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    p = _world(group, x.shape[2])
    send = torch.stack(x.chunk(p, dim=2))  # [P (head block), B, S/P, H/P, D]
    recv = _a2a(send, group)  # [P (sequence block), B, S/P, H/P, D]
    return torch.cat(recv.unbind(0), dim=1).transpose(1, 2)  # [B, H/P, S, D]


def _stack_cat_out(o: Tensor, group: dist.ProcessGroup) -> Tensor:
    p = group.size()
    send = torch.stack(o.transpose(1, 2).chunk(p, dim=1))  # [P (sequence block), B, S/P, H/P, D]
    recv = _a2a(send, group)  # [P (head block), B, S/P, H/P, D]
    return torch.cat(recv.unbind(0), dim=2)  # [B, S/P, H, D]


def attn_stack_cat(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, *,
    is_causal: bool = False, scale: float | None = None,
) -> Tensor:
    """Ulysses written with stack(chunk) and cat(unbind): [B, S/P, H, D] in and out."""
    q, k, v = (_stack_cat_in(x, group) for x in (q, k, v))
    return _stack_cat_out(_sdpa(q, k, v, is_causal, scale), group)


# ---------------------------------------------------------------------------------------------
# 10. stack and cat(chunk) in the heads-first layout: [B, H, S/P, D]
# ---------------------------------------------------------------------------------------------


def _stack_chunk_in(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    p = _world(group, x.shape[1])
    send = torch.stack(x.chunk(p, dim=1))  # [P (head block), B, H/P, S/P, D]
    recv = _a2a(send, group)  # [P (sequence block), B, H/P, S/P, D]
    return torch.cat(recv.chunk(p), dim=3).squeeze(0)  # [B, H/P, S, D]


def _stack_chunk_out(o: Tensor, group: dist.ProcessGroup) -> Tensor:
    p = group.size()
    send = torch.stack(o.chunk(p, dim=2))  # [P (sequence block), B, H/P, S/P, D]
    recv = _a2a(send, group)  # [P (head block), B, H/P, S/P, D]
    return torch.cat(recv.chunk(p), dim=2).squeeze(0)  # [B, H, S/P, D]


def attn_stack_chunk(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, *,
    is_causal: bool = False, scale: float | None = None,
) -> Tensor:
    """Ulysses written with stack(chunk) and cat(chunk): [B, H, S/P, D] in and out."""
    q, k, v = (_stack_chunk_in(x, group) for x in (q, k, v))
    return _stack_chunk_out(_sdpa(q, k, v, is_causal, scale), group)


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------

ShapeFn = Callable[[int, int, int, int, int], tuple[int, ...]]


def _bshd(b: int, s: int, h: int, d: int, p: int) -> tuple[int, ...]:
    return (b, s // p, h, d)


def _sbhd(b: int, s: int, h: int, d: int, p: int) -> tuple[int, ...]:
    return (s // p, b, h, d)


def _bhsd(b: int, s: int, h: int, d: int, p: int) -> tuple[int, ...]:
    return (b, h, s // p, d)


@dataclass(frozen=True)
class Layout:
    """One Ulysses implementation and the layout of its local q, k, v and output."""

    name: str
    fn: AttnFn
    local_shape: ShapeFn  # (B, S_global, H, D, P) -> local q/k/v shape; P=1 gives the global shape
    seq_dim: int
    head_dim: int
    functional: bool
    source: str

    @property
    def batch_dim(self) -> int:
        """The remaining leading dim; head size D is always last."""
        (b,) = {0, 1, 2} - {self.seq_dim, self.head_dim}
        return b


LAYOUTS: dict[str, Layout] = {
    lay.name: lay
    for lay in (
        Layout("funcol", attn_funcol, _bshd, 1, 2, True,
               "hand-written torch functional collectives"),
        Layout("diffusers", attn_diffusers, _bshd, 1, 2, True,
               "diffusers TemplatedUlyssesAttention (flattened all-to-all buffers)"),
        Layout("yunchang", attn_yunchang, _bshd, 1, 2, True,
               "yunchang all_to_all_4D"),
        Layout("deepspeed_bf", attn_deepspeed_bf, _bshd, 1, 2, True,
               "DeepSpeed Ulysses, batch-first"),
        Layout("deepspeed_sf", attn_deepspeed_sf, _sbhd, 0, 2, True,
               "DeepSpeed Ulysses, sequence-first"),
        Layout("xdit", attn_xdit, _bhsd, 2, 1, True,
               "xDiT USP"),
        Layout("fused_qkv", attn_fused_qkv, _bhsd, 2, 1, True,
               "xDiT / sglang fused-QKV all-to-all"),
        Layout("dist_inplace", attn_dist_inplace, _bshd, 1, 2, False,
               "plain in-place torch.distributed.all_to_all_single (Dynamo functionalises it)"),
        Layout("stack_cat", attn_stack_cat, _bshd, 1, 2, True,
               "stack of head blocks sent, cat(unbind) of sequence blocks received"),
        Layout("stack_chunk", attn_stack_chunk, _bhsd, 2, 1, True,
               "heads-first stack of head blocks sent, cat(chunk) of sequence blocks received"),
    )
}
