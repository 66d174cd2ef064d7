"""Chunk plans: how many local heads each chunk of a site gets.

Terms
- chunk spec: what the user asked for, either a chunk count (split as evenly as possible, larger
  chunks first: 5 heads in 2 chunks is 3+2) or explicit local-head counts per chunk.
- plan: the chunk sizes chosen for one site, or the reason the site stays as it is.

Steps:
1. `validate_chunks` rejects malformed specs before any graph is touched (a clear error).
2. `chunk_sizes` turns a valid spec into sizes for one site, or a skip reason when the spec does
   not fit that site (more chunks than local heads, explicit sizes that do not sum to them).
3. `plan_site` asks `exactness.judge` how close the chunked kernel stays to the unchunked one
   (bitwise, within its run-to-run variation, or rounding only); a grade the exactness policy
   does not accept is a skip, an accepted one is planned and reported.
The plan depends only on the graph's shapes, the kernel and the spec, so every rank reaches the
same plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .exactness import BITWISE, Exactness, accepts, judge
from .match import Site, value_of
from .ops import attention_args

ChunkSpec = int | Sequence[int]


@dataclass(frozen=True)
class ChunkPlan:
    chunk_sizes: tuple[int, ...]
    exactness: Exactness

    @property
    def offsets(self) -> tuple[int, ...]:
        starts, total = [], 0
        for size in self.chunk_sizes:
            starts.append(total)
            total += size
        return tuple(starts)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_chunks(chunks: object) -> ChunkSpec:
    if _is_int(chunks):
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        return chunks
    if isinstance(chunks, Sequence) and not isinstance(chunks, (str, bytes)):
        sizes = tuple(chunks)
        if not sizes:
            raise ValueError("chunks as a sequence of local-head counts must not be empty")
        bad = [s for s in sizes if not _is_int(s)]
        if bad:
            raise TypeError(f"chunk sizes must be integers, got {bad[0]!r} in {chunks!r}")
        if any(s < 1 for s in sizes):
            raise ValueError(f"every chunk needs at least one head, got {sizes}")
        return sizes
    raise TypeError(f"chunks must be an int or a sequence of ints, got {type(chunks).__name__} {chunks!r}")


def even_split(heads: int, chunks: int) -> tuple[int, ...]:
    """`heads` in `chunks` parts differing by at most one, larger parts first."""
    base, extra = divmod(heads, chunks)
    return tuple(base + 1 if i < extra else base for i in range(chunks))


def chunk_sizes(local_heads: int, chunks: ChunkSpec) -> tuple[int, ...] | str:
    """Local heads per chunk, or why the spec does not fit the site."""
    if _is_int(chunks):
        if chunks > local_heads:
            return f"{chunks} chunks requested but the site has {local_heads} local head(s)"
        sizes = even_split(local_heads, chunks)
    else:
        sizes = tuple(chunks)
        if sum(sizes) != local_heads:
            return f"chunk sizes {sizes} sum to {sum(sizes)}, but the site has {local_heads} local heads"
    if len(sizes) == 1:
        return "one chunk: nothing to pipeline"
    return sizes


def plan_site(site: Site, chunks: ChunkSpec, policy: str = BITWISE) -> ChunkPlan | str:
    """The plan for one site, or why it keeps its original form."""
    group = site.kv_group
    if group > 1:
        # grouped-query attention: a chunk holds whole groups of `group` query heads and their KV head
        if not isinstance(chunks, int) and any(size % group for size in chunks):
            return f"chunk sizes {tuple(chunks)} split a group of {group} query heads sharing one KV head"
        units = chunk_sizes(site.local_heads // group, chunks if isinstance(chunks, int)
                            else tuple(size // group for size in chunks))
        if isinstance(units, str):
            return f"{units} (in KV heads: grouped-query attention, {group} query heads each)"
        sizes = tuple(unit * group for unit in units)
    else:
        sizes = chunk_sizes(site.local_heads, chunks)
    if isinstance(sizes, str):
        return sizes
    # keys shared whole by every chunk (one KV head on the rank) are not in `site.heads`
    query, key = (value_of(attention_args(site.attention, site.op)[name]) for name in ("query", "key"))
    verdict = judge(site.kernel, query, key, sizes, backward=site.op.backward)
    if not accepts(policy, verdict):
        return f"chunking may change bits ({verdict.grade}: {verdict.why}); pass exact={verdict.grade!r} to allow it"
    return ChunkPlan(sizes, verdict)
