"""Dimension algebra: which factor of which axis a tensor's elements come from.

Terms
- atom: an indivisible factor of a tensor's index space, with a size > 1. A dimension of size 1
  has no atom. Atoms are created fresh for the dims of a chain's root tensor and are refined
  (split into an outer and an inner atom) when a later reshape cuts through one; a refinement is
  global, so every layout that mentions the atom sees the finer pair.
- layout: for each dimension of a tensor, the atoms (major to minor) whose product is its size.
  Two tensors whose layouts name the same atom index the same elements along that factor.

Layout-only ops move elements without computing on them, so a layout op maps an input layout to
an output layout by rules alone:
1. regroup (view, reshape, flatten, unflatten): flatten the atoms in row-major order and cut them
   into the new sizes, refining an atom where a boundary falls inside it.
2. permute and transpose: reorder the dims.
3. squeeze and unsqueeze: drop or add an empty dim.
4. select (and unbind, and an equal split): fix the index of a whole dim; its atoms disappear.
5. identity (contiguous, clone, detach, alias, wait on an already waited tensor).
6. join (a stack or cat of all the pieces of one split, chunk or unbind, in order): cut the split
   dim into (pieces, piece size) by rule 1; the pieces factor becomes the stacked dim, or the
   leading factor of the cat dim. Unbind pieces have size 1, so their dim disappears.
7. broadcast (expand of a size-1 dim, repeat_interleave): a fresh "broadcast" atom, whose index
   does not come from the source at all; every position along it reads the same source element.
   Explicitly repeated keys and values (repeat_kv) carry one inside their head axis.

An all-to-all with equal splits over P ranks is the one non-local step: the first atoms of the send
buffer whose sizes multiply to P name the destination rank; the receive buffer has the same shape,
with a fresh "source rank" atom of size P replacing that prefix. `LayoutError` says why an op
could not be followed; callers turn it into a skip reason.

Sizes may be symbolic (`symbolic.py`): a dynamic sequence length or batch is an atom whose size is a
SymInt. Every comparison and divisibility test is decided by the shape environment without adding
a guard; one it cannot prove for every value of the symbols is a `LayoutError`. Head atoms stay
static ints (the matcher refuses a symbolic head count).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .symbolic import Size, divides, is_symbolic, known, same, size

Atom = int
Layout = tuple[tuple[Atom, ...], ...]


class LayoutError(Exception):
    """An op whose effect on the atoms cannot be proven."""


class SymbolicLayoutError(LayoutError):
    """A comparison of symbolic sizes that the shape environment cannot decide for every value."""


@dataclass
class AtomSpace:
    """All atoms of one site, with their sizes and refinements."""

    sizes: dict[Atom, Size]
    refined: dict[Atom, tuple[Atom, Atom]]
    broadcast: set[Atom]

    def __init__(self) -> None:
        self.sizes = {}
        self.refined = {}
        self.broadcast = set()

    def new(self, n: Size) -> tuple[Atom, ...]:
        """A fresh atom for a dim of `n`, or none for size 1."""
        if same(n, 1):
            return ()
        atom = len(self.sizes)
        self.sizes[atom] = n
        return (atom,)

    def root(self, shape: Sequence[Size]) -> Layout:
        return tuple(self.new(size(s)) for s in shape)

    def expand(self, atoms: Sequence[Atom]) -> tuple[Atom, ...]:
        out: list[Atom] = []
        for atom in atoms:
            if atom in self.refined:
                out.extend(self.expand(self.refined[atom]))
            else:
                out.append(atom)
        return tuple(out)

    def resolve(self, layout: Layout) -> Layout:
        return tuple(self.expand(dim) for dim in layout)

    def size(self, atoms: Sequence[Atom], override: dict[Atom, int] | None = None) -> Size:
        override = override or {}
        return size(math.prod(override.get(a, self.sizes[a]) for a in self.expand(atoms)))

    def shape(self, layout: Layout, override: dict[Atom, int] | None = None) -> tuple[Size, ...]:
        """The dims' sizes, with some atoms resized (a head chunk instead of all local heads)."""
        return tuple(self.size(dim, override) for dim in layout)

    def split(self, atom: Atom, outer: Size) -> tuple[Atom, Atom]:
        n = self.sizes[atom]
        if not (known(outer > 1) and known(outer < n) and divides(outer, n)):
            if is_symbolic(n) or is_symbolic(outer):
                raise SymbolicLayoutError(f"cannot prove that a factor of size {n} splits into {outer} x "
                                          f"{n // outer} for every value of its symbols")
            raise LayoutError(f"cannot split a factor of size {n} into {outer} x {n // outer}")
        (o,) = self.new(outer)
        (i,) = self.new(size(n // outer))
        self.refined[atom] = (o, i)
        return o, i

    # -- rules -------------------------------------------------------------------------------

    def regroup(self, layout: Layout, shape: Sequence[Size]) -> Layout:
        flat = list(self.expand([a for dim in layout for a in dim]))
        out: list[tuple[Atom, ...]] = []
        for target in (size(s) for s in shape):
            group: list[Atom] = []
            have: Size = 1
            while not same(have, target):
                if not flat:
                    raise LayoutError(f"reshape to {tuple(shape)} does not match the input's size")
                atom = flat[0]
                n = self.sizes[atom]
                if divides(have * n, target):
                    group.append(flat.pop(0))
                    have = size(have * n)
                elif divides(have, target) and divides(target // have, n):
                    outer, inner = self.split(atom, size(target // have))
                    group.append(outer)
                    flat[0] = inner
                    have = target
                elif any(is_symbolic(s) for s in (*shape, n)):
                    raise SymbolicLayoutError(f"reshape to {tuple(shape)}: cannot prove how its symbolic sizes "
                                              "factor into the input's")
                else:
                    raise LayoutError(f"reshape to {tuple(shape)} mixes factors it cannot separate")
            out.append(tuple(group))
        if flat:
            raise LayoutError(f"reshape to {tuple(shape)} does not match the input's size")
        return tuple(out)

    def rejoin(self, layout: Layout, split_dim: int, pieces: int, squeezed: int, join_dim: int, *,
               stack: bool) -> Layout:
        """`stack(x.split(..., split_dim), join_dim)` or `cat(...)` of all the `pieces` in order: x
        regrouped, the pieces factor moved to `join_dim`. `squeezed` says the pieces lost the split
        dim (unbind)."""
        size = self.size(layout[split_dim])
        if not divides(pieces, size) or (squeezed and not same(size, pieces)):
            raise LayoutError(f"{pieces} pieces of a dim of size {size} are not equal")
        outer, inner = self.regroup((layout[split_dim],), (pieces, size // pieces))
        rest = layout[:split_dim] + (() if squeezed else (inner,)) + layout[split_dim + 1 :]
        if stack:
            return rest[:join_dim] + (outer,) + rest[join_dim:]
        return rest[:join_dim] + (outer + rest[join_dim],) + rest[join_dim + 1 :]

    def broadcast_to(self, layout: Layout, source: Sequence[Size], target: Sequence[Size]) -> Layout:
        """`expand(target)`: new leading dims and size-1 dims grown to n get broadcast atoms."""
        lead = len(target) - len(source)
        if lead < 0:
            raise LayoutError(f"expand to {tuple(target)} has fewer dims than {tuple(source)}")
        out = [self._broadcast(size(n)) for n in target[:lead]]
        for dim, have, want in zip(layout, source, target[lead:], strict=True):
            if same(want, -1) or same(want, have):
                out.append(dim)
            elif same(have, 1):
                out.append(self._broadcast(size(want)))
            else:
                raise LayoutError(f"expand of a dim of size {have} to {want}")
        return tuple(out)

    def repeat_each(self, layout: Layout, dim: int, repeats: int) -> Layout:
        """`repeat_interleave(repeats, dim)`: each index of `dim` repeated `repeats` times in a row."""
        dim = dim % len(layout)
        return layout[:dim] + (layout[dim] + self._broadcast(repeats),) + layout[dim + 1 :]

    def _broadcast(self, n: Size) -> tuple[Atom, ...]:
        atoms = self.new(n)
        self.broadcast.update(atoms)
        return atoms

    def exchange(self, layout: Layout, world_size: int) -> tuple[Layout, tuple[Atom, ...], tuple[Atom, ...]]:
        """All-to-all over dim 0: returns (receive layout, destination atoms, source atoms)."""
        if not layout:
            raise LayoutError("all-to-all of a 0-d tensor")
        dim0 = list(self.expand(layout[0]))
        if not divides(world_size, self.size(dim0)):
            raise LayoutError(f"dim 0 of size {self.size(dim0)} is not divisible by {world_size} ranks")
        dest: list[Atom] = []
        have: Size = 1
        while not same(have, world_size):
            atom = dim0[0]
            n = self.sizes[atom]
            if divides(have * n, world_size):
                dest.append(dim0.pop(0))
                have = size(have * n)
            else:
                outer, inner = self.split(atom, size(world_size // have))
                dest.append(outer)
                dim0[0] = inner
                have = world_size
        src = self.new(world_size)
        return (src + tuple(dim0),) + tuple(layout[1:]), tuple(dest), src


def permute(layout: Layout, dims: Sequence[int]) -> Layout:
    dims = [d % len(layout) for d in dims] if layout else []
    if sorted(dims) != list(range(len(layout))):
        raise LayoutError(f"permute{tuple(dims)} is not a permutation of {len(layout)} dims")
    return tuple(layout[d] for d in dims)


def transpose(layout: Layout, d0: int, d1: int) -> Layout:
    order = list(range(len(layout)))
    order[d0 % len(layout)], order[d1 % len(layout)] = order[d1 % len(layout)], order[d0 % len(layout)]
    return permute(layout, order)


def unsqueeze(layout: Layout, dim: int) -> Layout:
    dim = dim % (len(layout) + 1)
    return layout[:dim] + ((),) + layout[dim:]


def squeeze(layout: Layout, dims: Sequence[int]) -> Layout:
    dims = {d % len(layout) for d in dims}
    if any(layout[d] for d in dims):
        raise LayoutError("squeeze of a dim whose size is not 1")
    return tuple(dim for i, dim in enumerate(layout) if i not in dims)


def select(layout: Layout, dim: int) -> Layout:
    """Fixing one index of `dim` removes it; the caller checks that no chunked atom lives there."""
    dim = dim % len(layout)
    return layout[:dim] + layout[dim + 1 :]
