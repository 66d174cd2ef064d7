"""Chunk plans: how many local heads each chunk of a site gets.

Terms
- chunk spec: what the user asked for: "auto" (the cost model picks per site), a chunk count
  (split as evenly as possible, larger chunks first: 5 heads in 2 chunks is 3+2), or explicit
  local-head counts per chunk.
- unit: what a chunk holds whole: a local head, or under grouped-query attention a KV head with its
  group of query heads.
- plan: the chunk sizes chosen for one site, or the reason the site stays as it is.

Steps:
1. `validate_chunks` rejects malformed specs before any graph is touched (a clear error).
2. `chunk_sizes` turns a count or explicit sizes into sizes for one site, or a skip reason when the
   spec does not fit that site (more chunks than units, sizes that do not sum to the heads). One
   chunk is the fused plain site where fusing changes something (`fusable`) or the plain site moved
   to the copy-engine exchange, else a skip.
3. The exchange spec ("auto", "nccl", "copy-engine") gives the kinds a site may use
   (`exchanges.site_kinds`); with more than one, the predictions pick (`_fastest`, and "auto" chunks
   weigh every kind with every chunking).
4. With "auto", `choose_chunks` predicts (`cost_model.predict_against`) the plain site, the plain
   site with its exchanges fused (one all-to-all for q, k and v), and every even split into 2..8
   chunks that the exactness policy accepts, each unfused and fused; takes the fastest, and keeps it
   only if it beats the plain site by more than the profile's model error; otherwise the site stays
   plain. `Choice.fused` says which exchange form won; `plan_site` offers the fused forms only where
   fusing changes something (`fusable`) and the caller allows it (`fuse`).
5. `plan_site` asks `exactness.judge` how close the chunked kernel stays to the unchunked one
   (bitwise, within its run-to-run variation, or rounding only); a grade the exactness policy
   does not accept is a skip, an accepted one is planned and reported.
The plan depends only on the graph's shapes, the kernel, the spec, the device profile and the
exchange kinds the group supports (`copy_engine.support` reads facts every rank shares), so ranks
that hold the same profile (`hcms calibrate` and the backend make them agree) reach the same plan.
With a symbolic sequence length (dynamic shapes) explicit chunks do not depend on S at all; "auto"
predicts at the size hints, the lengths of the example that triggered the compile, which every rank
compiles with, and says so in its reason; the exactness verdict covers every length the compiled
artifact accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch.fx import Node

from .cost_model import Prediction, SiteCost, predict, predict_against, site_cost
from .exactness import BITWISE, Exactness, accepts, judge
from .exchanges import COPY_ENGINE, NCCL, group_name, site_kinds
from .match import Site, value_of
from .ops import attention_args
from .profiles import DeviceProfile
from .symbolic import SYMBOLIC, hint, is_symbolic

AUTO = "auto"
MAX_AUTO_CHUNKS = 8
ChunkSpec = int | Sequence[int] | str


@dataclass(frozen=True)
class Choice:
    """What "auto" decided for a site, and the predictions it compared."""

    chunk_sizes: tuple[int, ...]  # local heads per chunk; one entry means leave the site alone
    reason: str
    plain: Prediction
    best: Prediction  # the fastest accepted candidate (the plain site when there is none)
    candidates: tuple[Prediction, ...]  # every accepted candidate, in increasing C, unfused before fused
    fused: bool = False  # the chosen form exchanges each chunk's tensors in one all-to-all per direction
    exchange: str = NCCL  # the chosen exchange kind (exchanges.KINDS)


@dataclass(frozen=True)
class ChunkPlan:
    chunk_sizes: tuple[int, ...]
    exactness: Exactness
    prediction: Prediction | None = None  # with a profile: the predicted time of these chunks
    choice: str = ""  # with "auto": why this chunk count
    fused: bool = False  # a chunk's exchanges of one process group and dtype travel as one all-to-all
    exchange: str = NCCL  # how the chunks' all-to-alls move their bytes (exchanges.KINDS)
    note: str = ""  # about the exchange: why copy-engine was not available, or runs the group's all-to-all

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
    if chunks == AUTO:
        return AUTO
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
    raise TypeError(f"chunks must be 'auto', an int or a sequence of ints, got {type(chunks).__name__} {chunks!r}")


def parse_chunks(text: str) -> int | tuple[int, ...] | str:
    """A chunk spec written as text (a flag, an environment variable): "auto", "3", "2,1" or "2+1".
    Raises ValueError on text that is not one; `validate_chunks` checks the values."""
    text = text.strip()
    if text == AUTO:
        return AUTO
    parts = [int(p) for p in text.replace("+", ",").split(",") if p.strip()]
    return parts[0] if len(parts) == 1 else tuple(parts)


def even_split(heads: int, chunks: int) -> tuple[int, ...]:
    """`heads` in `chunks` parts differing by at most one, larger parts first."""
    base, extra = divmod(heads, chunks)
    return tuple(base + 1 if i < extra else base for i in range(chunks))


def chunk_sizes(local_heads: int, chunks: int | Sequence[int]) -> tuple[int, ...] | str:
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


def _percent(x: float) -> str:
    return f"{x * 100:.1f}%" if abs(x) < 0.1 else f"{x * 100:.0f}%"


def _form(prediction: Prediction) -> str:
    c = len(prediction.chunks)
    name = "plain" if c == 1 else f"C={c}"
    name = f"{name} fused" if prediction.fused else name
    return f"{name} over {prediction.exchange}" if prediction.exchange != NCCL else name


def choose_chunks(cost: SiteCost, profile: DeviceProfile, units: int, group: int = 1,
                  max_chunks: int = MAX_AUTO_CHUNKS,
                  accept: Callable[[tuple[int, ...]], bool] | None = None,
                  fused: Sequence[bool] = (False, True), kinds: Sequence[str] = (NCCL,)) -> Choice:
    """The chunk sizes (in local heads), exchange form and exchange kind for a site of `units`
    chunkable units of `group` query heads each; `accept` drops chunkings the exactness policy
    refuses; `fused` lists the exchange forms to consider (False: one all-to-all per tensor, as
    traced; True: one per chunk and direction); `kinds` the exchange kinds (exchanges.KINDS). The
    plain site in other form (fused, or over another kind) is a candidate too."""
    if units < 1 or group < 1 or max_chunks < 1:
        raise ValueError(f"units, group and max_chunks must be >= 1, got {units}, {group}, {max_chunks}")
    if units * group != cost.local_heads:
        raise ValueError(f"{units} units of {group} heads do not make the site's {cost.local_heads} local heads")
    plain = predict_against(cost, profile, (cost.local_heads,), None)
    splits = [tuple(u * group for u in even_split(units, c)) for c in range(2, min(units, max_chunks) + 1)]
    allowed = [sizes for sizes in splits if accept is None or accept(sizes)]
    forms = sorted(set(fused))  # unfused first: a tie keeps the form as traced
    # a fused exchange of several tensors changes nothing when each direction has one tensor already
    fusable = len(cost.input_bytes) > 1 or len(cost.output_bytes) > 1
    forms = [f for f in forms if not f or fusable]
    kinds = [k for k in (NCCL, COPY_ENGINE) if k in kinds]  # NCCL first: a tie keeps the traced kind
    whole = (cost.local_heads,)
    candidates = [predict_against(cost, profile, whole, plain, f, exchange=k)
                  for k in kinds for f in forms if f or k != NCCL]
    candidates += [predict_against(cost, profile, sizes, plain, f, exchange=k)
                   for sizes in allowed for k in kinds for f in forms]
    if not candidates:
        what = "KV head" if group > 1 else "local head"
        reason = f"one {what}: nothing to chunk" if not splits else "no chunking the exactness policy accepts"
        return Choice((cost.local_heads,), reason, plain, plain, ())
    best = candidates[0]
    for candidate in candidates[1:]:
        if candidate.time_s < best.time_s:  # strict: a tie keeps the smaller C, then the unfused form
            best = candidate
    form = _form(best)
    if best.gain_s > 0 and best.gain_s >= profile.model_error * plain.time_s:
        reason = f"{form} predicted {_percent(best.gain)} faster (rho {_percent(plain.rho)})"
        return Choice(best.chunks, reason, plain, best, tuple(candidates), best.fused, best.exchange)
    if plain.rho < profile.model_error:
        reason = f"rho {_percent(plain.rho)}: nothing to hide"
    elif best.gain_s < 0:
        reason = f"best {form} predicted {_percent(-best.gain)} slower (rho {_percent(plain.rho)}): left alone"
    elif best.gain_s == 0:
        reason = f"best {form} predicted no faster (rho {_percent(plain.rho)}): left alone"
    else:
        reason = f"best {form} gains {_percent(best.gain)} < model error {_percent(profile.model_error)}: left alone"
    if splits and not allowed:  # only the fused plain site was weighed
        reason = f"no chunking the exactness policy accepts; {reason}"
    return Choice((cost.local_heads,), reason, plain, best, tuple(candidates))


def fusion_key(wait: Node) -> object:
    """What an exchange (given by its wait) must share with another to travel in one all-to-all with
    it: its dtype (every exchange of a site runs on the site's process group)."""
    return value_of(wait).dtype


def fusion_keys(exchanges: Sequence[object]) -> list[object]:
    return [fusion_key(ex.wait) for ex in exchanges]


def launches(site: Site, plan: ChunkPlan) -> tuple[int, int]:
    """All-to-alls one chunk launches under `plan`: (input exchanges, output exchanges)."""
    if not plan.fused:
        return len(site.inputs), len(site.outputs)
    return len(set(fusion_keys(site.inputs))), len(set(fusion_keys(site.outputs)))


def fusable(site: Site) -> bool:
    """Whether fusing changes anything: two exchanges of one direction share a dtype."""
    return any(len(set(keys)) < len(keys) for keys in (fusion_keys(site.inputs), fusion_keys(site.outputs)))


def _one_chunk(chunks: ChunkSpec, local_heads: int) -> bool:
    return chunks == 1 or (not isinstance(chunks, (int, str)) and tuple(chunks) == (local_heads,))


ONE_CHUNK = "one chunk: the attention call is the original one"


def plan_site(site: Site, chunks: ChunkSpec, policy: str = BITWISE,
              profile: DeviceProfile | None = None, fuse: bool = True, exchange: str = NCCL) -> ChunkPlan | str:
    """The plan for one site, or why it keeps its original form. With `fuse`, each chunk's
    exchanges that can share an all-to-all do; one chunk then means the fused plain site.
    `exchange` ("auto", "nccl" or "copy-engine", see exchanges.py) says which exchange kinds the plan
    may use; under "auto" the profile's predictions choose between the kinds the site supports."""
    fused = fuse and fusable(site)
    available = site_kinds(value_of(site.heads["query"]).device, group_name(site.inputs[0].all_to_all), exchange)
    kinds, note = available.kinds, available.note
    if _one_chunk(chunks, site.local_heads):
        # one chunk changes the site only by fusing its exchanges or moving them over another kind
        forms = [(f, k) for k in kinds for f in ((True,) if fused else (False,)) if f or k != NCCL]
        if not forms:
            why = ": no two exchanges of one direction share a dtype to fuse" if fuse else ""
            return f"one chunk: nothing to pipeline{why}"
        form, prediction = _fastest(site, (site.local_heads,), forms, profile)
        return ChunkPlan((site.local_heads,), Exactness(BITWISE, ONE_CHUNK), prediction, fused=form[0],
                         exchange=form[1], note=note)
    # keys shared whole by every chunk (one KV head on the rank) are not in `site.heads`
    query, key = (value_of(attention_args(site.attention, site.op)[name]) for name in ("query", "key"))

    def verdict(sizes: tuple[int, ...]) -> Exactness:
        return judge(site.kernel, query, key, sizes, backward=site.op.backward)

    group = site.kv_group
    if chunks == AUTO:
        if profile is None:
            raise ValueError("chunks='auto' needs a device profile")
        cost = site_cost(site)
        refused: list[Exactness] = []

        def accept(sizes: tuple[int, ...]) -> bool:
            grade = verdict(sizes)
            if not accepts(policy, grade):
                refused.append(grade)
            return accepts(policy, grade)

        forms = (False, True) if fused else (False,)
        choice = choose_chunks(cost, profile, site.local_heads // group, group, accept=accept, fused=forms,
                               kinds=kinds)
        hint_note = _hint_note(query, key)
        if len(choice.chunk_sizes) == 1 and (choice.fused or choice.exchange != NCCL):
            return ChunkPlan(choice.chunk_sizes, Exactness(BITWISE, ONE_CHUNK), choice.best, choice.reason + hint_note,
                             choice.fused, choice.exchange, note)
        if len(choice.chunk_sizes) == 1:
            symbolic = next((grade for grade in refused if grade.symbolic), None)
            if symbolic is not None and not choice.candidates:
                return f"{SYMBOLIC}auto: no chunking keeps bits for every length ({symbolic.grade}: {symbolic.why})"
            return f"auto: {choice.reason}{hint_note}"
        return ChunkPlan(choice.chunk_sizes, verdict(choice.chunk_sizes), choice.best, choice.reason + hint_note,
                         choice.fused, choice.exchange, note)
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
    grade = verdict(sizes)
    if not accepts(policy, grade):
        prefix = SYMBOLIC if grade.symbolic else ""
        return f"{prefix}chunking may change bits ({grade.grade}: {grade.why}); pass exact={grade.grade!r} to allow it"
    form, prediction = _fastest(site, sizes, [(fused, k) for k in kinds], profile)
    return ChunkPlan(sizes, grade, prediction, fused=fused, exchange=form[1], note=note)


def _fastest(site: Site, sizes: tuple[int, ...], forms: list[tuple[bool, str]],
             profile: DeviceProfile | None) -> tuple[tuple[bool, str], Prediction | None]:
    """The (fused, exchange kind) of `forms` predicted fastest for `sizes` (the first on a tie, or
    without a profile the last: the kinds come NCCL first, so an explicit or available copy-engine
    exchange is what "auto" takes when nothing can be predicted)."""
    if profile is None:
        return forms[-1], None
    cost = site_cost(site)
    predictions = [predict(cost, profile, sizes, fused=f, exchange=k) for f, k in forms]
    best = min(range(len(forms)), key=lambda i: predictions[i].time_s)
    return forms[best], predictions[best]


def _hint_note(query: object, key: object) -> str:
    """Where "auto" read a symbolic sequence length at its hint, say so (and at which length)."""
    s_q, s_kv = query.shape[-2], key.shape[-2]
    if not (is_symbolic(s_q) or is_symbolic(s_kv)):
        return ""
    return (f"; predicted at the compiling example's S_q={hint(s_q)}, S_kv={hint(s_kv)} (the sequence length is "
            "symbolic; every rank compiles with the same example)")
