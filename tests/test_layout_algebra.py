"""The dimension algebra that matching relies on."""

from __future__ import annotations

import pytest
import torch
from hcms_compile.passes import layout as L
from hcms_compile.passes.emit import viewable
from hcms_compile.passes.ops import CAT, STACK, layout_op, target_name
from hypothesis import given
from hypothesis import strategies as st

from hcms_compile.testing.tracing import trace


def test_reshape_splits_an_axis_into_rank_and_local_heads():
    atoms = L.AtomSpace()
    b, s, h, d = atoms.root((2, 3, 8, 5))
    out = atoms.regroup(((*b,), (*s,), (*h,), (*d,)), (2, 3, 4, 2, 5))
    rank, local = atoms.refined[h[0]]
    assert atoms.resolve(out) == (b, s, (rank,), (local,), d)
    assert atoms.sizes[rank] == 4 and atoms.sizes[local] == 2


def test_flatten_then_reshape_round_trips_atoms():
    atoms = L.AtomSpace()
    lay = atoms.root((4, 3, 2))
    flat = atoms.regroup(lay, (24,))
    assert atoms.resolve(atoms.regroup(flat, (4, 3, 2))) == atoms.resolve(lay)


def test_exchange_replaces_the_destination_prefix_with_a_source_atom():
    atoms = L.AtomSpace()
    lay = atoms.root((12, 5))  # 12 = 4 ranks x 3
    received, dest, src = atoms.exchange(lay, 4)
    assert [atoms.sizes[a] for a in dest] == [4] and [atoms.sizes[a] for a in src] == [4]
    assert [atoms.sizes[a] for a in atoms.expand(received[0])] == [4, 3]


def test_reshape_that_mixes_factors_is_refused():
    atoms = L.AtomSpace()
    lay = atoms.root((2, 3))
    with pytest.raises(L.LayoutError):
        atoms.regroup(lay, (3, 2))


def test_world_size_that_does_not_divide_dim0_is_refused():
    atoms = L.AtomSpace()
    with pytest.raises(L.LayoutError):
        atoms.exchange(atoms.root((6, 2)), 4)


def test_chunk_override_resizes_only_the_head_atom():
    atoms = L.AtomSpace()
    lay = atoms.root((4, 6, 8))
    head = lay[1][0]
    assert atoms.shape(lay, {head: 2}) == (4, 2, 8)


@st.composite
def views(draw):
    nd = draw(st.integers(1, 5))
    shape = draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd))
    x = torch.empty(shape).permute(*draw(st.permutations(range(nd))))
    dim = draw(st.integers(0, nd - 1))
    if x.shape[dim] > 1 and draw(st.booleans()):
        x = x.narrow(dim, 0, x.shape[dim] - 1)
    factors = [p for n in x.shape for p in _primes(n)]
    cuts = draw(st.lists(st.booleans(), min_size=len(factors), max_size=len(factors)))
    new: list[int] = []
    for f, join in zip(factors, cuts, strict=True):
        if new and join:
            new[-1] *= f
        else:
            new.append(f)
    return x, new or [1]


def _primes(n: int) -> list[int]:
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


@given(views())
def test_viewable_agrees_with_eager_view(case):
    x, new = case
    try:
        x.view(new)
        eager = True
    except RuntimeError:
        eager = False
    assert viewable(tuple(x.shape), tuple(x.stride()), new) == eager


def _atom_view(atoms: L.AtomSpace, x: torch.Tensor, layout: L.Layout) -> tuple[torch.Tensor, list[int]]:
    flat = list(atoms.expand([a for dim in layout for a in dim]))
    return x.reshape([atoms.sizes[a] for a in flat]), flat


@st.composite
def joins(draw):
    """A tensor shape, a split of one dim into equal pieces (or unbind), and a stack or cat dim."""
    nd = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd))
    dim = draw(st.integers(0, nd - 1))
    shape[dim] *= draw(st.integers(1, 3))
    squeezed = draw(st.booleans())
    pieces = shape[dim] if squeezed else draw(st.sampled_from([p for p in range(1, shape[dim] + 1)
                                                               if shape[dim] % p == 0]))
    stack = draw(st.booleans())
    rank = nd - squeezed + stack
    if rank == 0:
        stack, rank = True, 1
    return tuple(shape), dim, pieces, int(squeezed), stack, draw(st.integers(0, rank - 1))


@given(joins())
def test_a_stack_or_cat_of_one_tensors_pieces_moves_atoms_only(case):
    # every element of the joined tensor is found where the atoms say: the join is a regroup of x
    shape, dim, pieces, squeezed, stack, join_dim = case
    x = torch.arange(torch.Size(shape).numel()).reshape(shape)
    parts = x.unbind(dim) if squeezed else x.chunk(pieces, dim)
    joined = torch.stack(parts, join_dim) if stack else torch.cat(parts, join_dim)
    atoms = L.AtomSpace()
    lay = atoms.root(shape)
    out = atoms.rejoin(lay, dim, pieces, squeezed, join_dim, stack=stack)
    assert atoms.shape(out) == tuple(joined.shape)
    source, order = _atom_view(atoms, x, lay)
    target, moved = _atom_view(atoms, joined, out)
    assert sorted(order) == sorted(moved)
    assert torch.equal(target.permute([moved.index(a) for a in order]), source)


def test_unequal_pieces_are_refused():
    atoms = L.AtomSpace()
    with pytest.raises(L.LayoutError):
        atoms.rejoin(atoms.root((6, 2)), 0, 4, 0, 0, stack=False)


@pytest.mark.parametrize("tracer", ["make_fx", "dynamo"])
def test_only_a_stack_or_cat_of_one_tensors_pieces_in_order_is_a_layout_op(tracer):
    def fn(x, y, z):
        return (torch.stack(x.chunk(2, 1)), torch.cat(x.unbind(0), 1),  # pieces of x, in order
                torch.stack([x, y, z]),  # three tensors (a fused qkv send): not a layout op
                torch.cat(list(reversed(x.unbind(0))), 1),  # reordered
                torch.cat(x.chunk(2, 1)[:1], 1),  # one piece of two
                torch.cat(x.split([1, 3], 1), 1))  # unequal pieces

    gm = trace(fn, [torch.zeros(2, 4, 3) for _ in range(3)], tracer)
    joins = [n for n in gm.graph.nodes if n.op == "call_function" and target_name(n) in ("stack", "cat")]
    assert len(joins) == 6
    kinds = [getattr(layout_op(n), "kind", None) for n in joins]
    assert kinds == [STACK, CAT, None, None, None, None]
    assert layout_op(joins[0]).dims == (1, 2, 0, 0) and layout_op(joins[1]).dims == (0, 2, 1, 1)
