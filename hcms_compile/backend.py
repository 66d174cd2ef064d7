"""`torch.compile(model, backend=hcms_backend)`: Dynamo -> AOTAutograd -> HCMS -> inner compiler.

The HCMS rewrite runs on every graph AOTAutograd produces (forward, backward, inference). With
Inductor it runs as a post-grad custom pass (`HcmsGraphPass`, a `CustomGraphPass` whose `uuid()`
names its configuration, so Inductor's FX graph cache stays on and keys on it); with `aot_eager` it
runs in the forward and backward compilers, partitioned as torch's own `aot_eager` backend does.
`torch.compile(..., mode=, options=)` reach Inductor as config patches, as for torch's own Inductor
backend. Environment variables, read at each compile: `HCMS_DISABLE` (1, true, yes, on in any case
compile without the pass; 0, false, no, off or empty do not; anything else is an error) and
`HCMS_CHUNKS` (auto, 3, or 2,1), which overrides `chunks`, and `HCMS_EXCHANGE` (auto, nccl or
copy-engine), which overrides `exchange`.

Terms
- phase: what AOTAutograd compiles a graph as, "forward", "backward" or "inference", as Inductor's
  `compile_fx_inner` is told (`is_backward`, `is_inference`).
- report store: a directory under torch's cache directory (`hcms_reports/`) holding, as JSON, the
  reports of every graph compiled cold. A cache hit skips the post-grad passes, so the pass cannot
  report what it did; the store gives back what it reported when the cached code was compiled.
  Keys: for Inductor's FX graph cache, a hash of the graph `compile_fx_inner` receives; for
  AOTAutograd's cache (which skips `compile_fx_inner` altogether), a hash of the Dynamo graph.
  Both hold the options' key and the pass's code hash, as the caches' own keys do.
- agreement: under chunks="auto" the plan depends on the device profile, and ranks may hold
  different ones (each calibrated on its own). Every rank that runs a site's all-to-alls must plan it
  alike, so the backend agrees on the profile over each process group the graph's all-to-alls use,
  and over no other: a rank that never compiles such a graph is never waited for.

Steps of `HcmsBackend.__call__(gm, example_inputs, mode=, options=)`:
1. Read the environment (`HCMS_DISABLE`, `HCMS_CHUNKS`, `HCMS_EXCHANGE`) and check `mode`/`options` (Inductor's).
2. If the graph has all-to-alls: resolve the profile for the device and the exchanges' group size,
   and under "auto" agree on it over those groups (once per device and groups).
3. Compile with the inner compiler, the pass hooked in; record every graph's report (or, on a cache
   hit, load it from the report store, or say that it could not be found).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.fx

from . import passes as passes_pkg
from .api import ProfileSpec, no_site_reason, rewrite_graph
from .calibrate import agree, resolve_profile
from .passes import ChunkSpec, symbolic, validate_chunks
from .passes.exactness import BITWISE, exactness_policy
from .passes.exchanges import validate_exchange
from .passes.ops import attention_op, exchange_args, is_all_to_all
from .passes.plan import AUTO, parse_chunks
from .passes.profiles import DeviceProfile
from .passes.schedule import pin_pipeline
from .report import SiteReport, render_sites

log = logging.getLogger("hcms_compile")

INNER = ("inductor", "aot_eager")
FORWARD, BACKWARD, INFERENCE = "forward", "backward", "inference"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class HcmsOptions:
    chunks: ChunkSpec = AUTO
    exact: str = BITWISE  # the exactness policy's name
    enabled: bool = True
    profile: DeviceProfile | None = None  # resolved (and agreed between ranks) for the graph's device
    hints: tuple[int, ...] = ()  # example values of the symbolic sizes: what "auto" plans a dynamic graph at
    fuse: bool = True  # a chunk's exchanges of one group and dtype as one all-to-all (see `rewrite`)
    exchange: str = AUTO  # how rewritten all-to-alls move bytes: "auto", "nccl" or "copy-engine" (see `rewrite`)

    @property
    def predicts(self) -> bool:
        """Whether the plan reads the profile: "auto" chunks, or "auto" exchange choosing between kinds."""
        return self.chunks == AUTO or self.exchange == AUTO

    def key(self) -> str:
        chunks = list(self.chunks) if isinstance(self.chunks, (list, tuple)) else self.chunks
        # the plan of "auto" depends on the profile and, in a dynamic graph, on the compiling example's
        # sizes (Inductor's cache keys symbolic sizes by name): a cached graph planned with others must
        # not be reused, or a rank with a warm cache would run another plan than a cold one and hang
        auto = self.predicts
        profile = self.profile.to_json() if self.profile is not None and auto else None
        return json.dumps({"chunks": chunks, "exact": self.exact, "enabled": self.enabled, "profile": profile,
                           "hints": list(self.hints) if auto else [], "fuse": self.fuse, "exchange": self.exchange},
                          sort_keys=True)

    def rewrite(self, graph: torch.fx.Graph, phase: str, earlier: Sequence[GraphReport]) -> GraphReport:
        """Rewrite `graph` in place; its report, with what a graph break did to a site (`earlier`: the
        reports of the graphs this backend compiled before, for `split_note`)."""
        leaving = _escaping_exchanges(graph)  # before the rewrite, which may add all-to-alls
        sites = rewrite_graph(graph, chunks=self.chunks, exact=self.exact, profile=self.profile, fuse=self.fuse,
                              exchange=self.exchange)
        return GraphReport(phase, sites, note=no_site_reason(graph), split=split_note(leaving, sites, earlier))


def _symbolic_hints(example_inputs: Sequence[Any]) -> tuple[int, ...]:
    """The example's value of every symbolic size among the inputs (SymInt inputs and tensor dims)."""
    values: list[Any] = []
    for value in example_inputs:
        values += list(value.shape) if isinstance(value, torch.Tensor) else [value]
    return tuple(symbolic.hint(v) for v in values if symbolic.is_symbolic(v))


def env_flag(name: str, environ: dict[str, str] | None = None) -> bool:
    """A boolean environment variable: 1/true/yes/on (any case) or 0/false/no/off/empty; else ValueError."""
    raw = (os.environ if environ is None else environ).get(name, "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r}: expected one of {', '.join(_TRUE)} (set) or {', '.join(_FALSE[1:])} or "
                     "empty (unset), in any case")


def options_from_env(chunks: ChunkSpec, exact: bool | str, environ: dict[str, str] | None = None,
                     fuse: bool = True, exchange: str = AUTO) -> HcmsOptions:
    env = os.environ if environ is None else environ
    enabled = not env_flag("HCMS_DISABLE", env)
    raw = env.get("HCMS_CHUNKS", "").strip()
    if raw:
        try:
            chunks = validate_chunks(parse_chunks(raw))
        except (ValueError, TypeError) as err:
            raise ValueError(f"HCMS_CHUNKS={raw!r}: expected auto, a count >= 1 like 3, or local heads per chunk "
                             f"like 2,1 ({err})") from None
    raw = env.get("HCMS_EXCHANGE", "").strip()
    if raw:
        try:
            exchange = validate_exchange(raw)
        except ValueError:
            raise ValueError(f"HCMS_EXCHANGE={raw!r}: expected auto, nccl or copy-engine") from None
    return HcmsOptions(validate_chunks(chunks), exactness_policy(exact), enabled, fuse=fuse,
                       exchange=validate_exchange(exchange))


@dataclass
class GraphReport:
    """The rewrite of one graph the backend compiled."""

    phase: str  # "forward", "backward" or "inference"; "unknown" when a cache hid even that
    sites: list[SiteReport] = field(default_factory=list)
    graph_module: torch.fx.GraphModule | None = None  # the rewritten graph (aot_eager only)
    cached: bool = False  # the compiled code came from a cache: the report is the one recorded when it was compiled
    missing: str = ""  # on a cache hit whose report was not recorded: why the plan cannot be shown
    note: str = ""  # why a graph with all-to-alls has no candidate site (`api.no_site_reason`); else empty
    split: str = ""  # a site this graph holds only part of (graph break): which graph held the other part

    def table(self) -> str:
        if self.missing:
            return f"{self.phase} graph: {self.missing}"
        note = " (compiled code came from a cache; the plan shown was recorded when it was compiled)" \
            if self.cached else ""
        if self.split and not self.sites:  # not "no site found": there is half of one
            return f"{self.phase} graph{note}: {self.split}"
        split = f"\n{self.split}" if self.split else ""
        return f"{self.phase} graph{note}\n{render_sites(self.sites, self.note)}{split}"

    def __str__(self) -> str:
        return self.table()

    def to_json(self) -> dict[str, Any]:
        return {"phase": self.phase, "sites": [dataclasses.asdict(site) for site in self.sites], "note": self.note,
                "split": self.split}

    @classmethod
    def from_json(cls, data: dict[str, Any], cached: bool = True) -> GraphReport:
        sites = [SiteReport(**{**site, "chunk_sizes": tuple(site["chunk_sizes"])}) for site in data["sites"]]
        return cls(data["phase"], sites, cached=cached, note=data.get("note", ""), split=data.get("split", ""))


# -- sites split across graphs ---------------------------------------------------------------------

SPLIT_EXCHANGE = "graph break splits a site"
_GRAPH_INPUT = "is a graph input: the all-to-all is in another graph"


def _escaping_exchanges(graph: torch.fx.Graph) -> list[str]:
    """All-to-alls whose result reaches the graph's output without meeting an attention op, and that no
    attention op feeds (an output exchange): their attention runs in another graph, after a graph break."""

    def reach(start: torch.fx.Node, step: Callable[[torch.fx.Node], Any]) -> set[torch.fx.Node]:
        seen, todo = {start}, [start]
        while todo:
            for node in step(todo.pop()):
                if node not in seen:
                    seen.add(node)
                    todo.append(node)
        return seen - {start}

    names = []
    for a2a in (n for n in graph.nodes if is_all_to_all(n)):
        after = reach(a2a, lambda n: n.users)
        before = reach(a2a, lambda n: n.all_input_nodes)
        if any(n.op == "output" for n in after) and not any(attention_op(n) for n in after | before):
            names.append(a2a.name)
    return names


def split_note(leaving: Sequence[str], sites: Sequence[SiteReport], earlier: Sequence[GraphReport]) -> str:
    """What a graph break did to a site, for the report of a graph:
    - `leaving`, its all-to-alls whose results leave it with no attention op (`_escaping_exchanges`, read
      before the rewrite): the exchange half of a site;
    - an attention op whose per-head input is a graph input, after a graph of the same backend that
      sent exchanged tensors out: the attention half, named with the graph that held the exchange.
    Graphs are numbered as they come in `HcmsBackend.reports` (0 first). Empty when nothing is split."""
    index = len(earlier)
    if leaving:
        return (f"{SPLIT_EXCHANGE}: graph {index} holds the all-to-all(s) {list(leaving)}, whose results leave it "
                "as graph outputs without reaching an attention op: the attention they feed is in a later graph. "
                "Remove the graph break (torch.compile(..., fullgraph=True) names it) so that the site is in one graph")
    if not any(_GRAPH_INPUT in site.reason for site in sites):
        return ""
    held = [i for i, report in enumerate(earlier)
            if report.split.startswith(f"{SPLIT_EXCHANGE}: graph {i} holds the all-to-all")]
    where = f"graph {held[-1]}" if held else "an earlier graph"
    return (f"{SPLIT_EXCHANGE}: graph {index} holds the attention, and {where} held the all-to-all that "
            "feeds it (a graph break between them); neither half is rewritten")


def _phase(graph: torch.fx.Graph, default: str) -> str:
    names = [n.name for n in graph.nodes if n.op == "placeholder"]
    return BACKWARD if any(name.startswith("tangents") for name in names) else default


def _inner_phase(kwargs: dict[str, Any]) -> str:
    if kwargs.get("is_backward"):
        return BACKWARD
    return INFERENCE if kwargs.get("is_inference") else FORWARD


class HcmsGraphPass:
    """The HCMS rewrite as an Inductor post-grad custom pass."""

    def __init__(self, options: HcmsOptions, sink: list[GraphReport]) -> None:
        self.options = options
        self.sink = sink
        self.phase: str | None = None  # set by the backend from what compile_fx_inner is told

    def __call__(self, graph: torch.fx.Graph) -> None:
        report = self.options.rewrite(graph, self.phase or _phase(graph, FORWARD), self.sink)
        if any(site.rewritten for site in report.sites):
            pin_pipeline(graph)
        self.sink.append(report)

    def uuid(self) -> bytes:
        """Changes with the options and with the code of the pass, so cached graphs stay correct."""
        return hashlib.sha256(f"{_code_hash()} {self.options.key()}".encode()).digest()


@functools.cache
def _code_hash() -> str:
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    sources = sorted(Path(passes_pkg.__file__).resolve().parent.glob("*.py"))
    for module in (*sources, here / "api.py", here / "backend.py"):
        digest.update(module.read_bytes())
    return digest.hexdigest()


def _as_custom_pass(graph_pass: HcmsGraphPass) -> Any:
    # Inductor checks for its CustomGraphPass type; subclass it where available so the cache keys on uuid()
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class _Pass(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            graph_pass(graph)

        def uuid(self) -> bytes:
            return graph_pass.uuid()

    return _Pass()


# -- mode and options: what torch.compile passes a backend ----------------------------------------


def inductor_config_patches(mode: str | None, options: dict[str, Any] | None) -> dict[str, Any]:
    """Inductor config patches for `torch.compile`'s `mode` and `options`, checked as torch checks them
    for its own Inductor backend; a ValueError names an unknown mode or option, or a wrong type."""
    from torch._inductor import config, list_mode_options

    patches: dict[str, Any] = {}
    if mode and mode != "default":
        try:
            patches.update(list_mode_options(mode, None))
        except RuntimeError as err:
            raise ValueError(f"hcms backend: {err}") from None
    current = config.get_config_copy()
    for key, value in (options or {}).items():
        name = key.replace("-", "_")
        if name not in current:
            raise ValueError(f"hcms backend: unknown Inductor option {key!r} (see torch._inductor.list_options())")
        if name == "post_grad_custom_pre_pass":
            raise ValueError("hcms backend: the option post_grad_custom_pre_pass is where HCMS runs its own pass; "
                             "use post_grad_custom_post_pass for yours")
        kind = config.get_type(name) if hasattr(config, "get_type") else type(current[name])
        if getattr(kind, "__origin__", None) is None and isinstance(kind, type) and not isinstance(value, kind):
            raise ValueError(f"hcms backend: Inductor option {key!r} takes a {kind.__name__}, got "
                             f"{type(value).__name__} {value!r}")
        patches[name] = value
    return patches


# -- the report store ------------------------------------------------------------------------------


def _cache_dir() -> Path:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # older layouts
        from torch._inductor.utils import cache_dir  # type: ignore[attr-defined,no-redef]
    return Path(cache_dir()) / "hcms_reports"


def _input_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return [list(map(str, value.shape)), list(map(str, value.stride())), str(value.dtype), str(value.device),
                value.requires_grad]
    return type(value).__name__ if not isinstance(value, (int, float, bool, torch.SymInt)) else str(value)


def _graph_key(*parts: Any) -> str:
    text = json.dumps([_code_hash(), *parts], default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class ReportStore:
    """The reports of graphs compiled cold, for the cache hits that skip the pass (see the module docstring)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else _cache_dir()

    def save(self, key: str, reports: Sequence[GraphReport]) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            target = self.root / f"{key}.json"
            partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            partial.write_text(json.dumps([r.to_json() for r in reports]))
            partial.replace(target)  # ranks writing the same key never leave half a file
        except OSError as err:  # a read-only cache must not fail the compile: hits then say so
            log.warning("hcms: could not record the report in %s: %s", self.root, err)

    def load(self, key: str) -> list[GraphReport] | None:
        try:
            return [GraphReport.from_json(r) for r in json.loads((self.root / f"{key}.json").read_text())]
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _not_recorded(cache: str, store: ReportStore) -> str:
    return (f"compiled code came from {cache}, and the report recorded when it was compiled is not in {store.root}; "
            "the plan cannot be shown. Compile with torch._inductor.config.fx_graph_cache=False and "
            "torch._functorch.config.enable_autograd_cache=False to see it")


# -- the backend -----------------------------------------------------------------------------------


class HcmsBackend:
    """A torch.compile backend that applies HCMS to every forward and backward graph."""

    def __init__(self, chunks: ChunkSpec = AUTO, inner: str = "inductor", exact: bool | str = True,
                 profile: ProfileSpec = None, fuse: bool = True, exchange: str = AUTO) -> None:
        if inner not in INNER:
            raise ValueError(f"inner must be one of {INNER}, got {inner!r}")
        validate_chunks(chunks)
        exactness_policy(exact)
        if not isinstance(fuse, bool):
            raise TypeError(f"fuse must be True or False, got {type(fuse).__name__} {fuse!r}")
        validate_exchange(exchange)
        self.chunks, self.inner, self.exact, self.profile, self.fuse = chunks, inner, exact, profile, fuse
        self.exchange = exchange
        self.reports: list[GraphReport] = []
        self._profiles: dict[tuple[Any, ...], DeviceProfile] = {}

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None,
                 options: dict[str, Any] | None = None) -> Callable[..., Any]:
        """Compile one Dynamo graph; `mode` and `options` are torch.compile's, passed on to Inductor."""
        options_ = options_from_env(self.chunks, self.exact, fuse=self.fuse, exchange=self.exchange)
        if self.inner == "aot_eager" and ((mode and mode != "default") or options):
            given = f"mode={mode!r}" if mode and mode != "default" else f"options={options!r}"
            raise ValueError(f"hcms backend: {given} configures Inductor, and this backend compiles with "
                             "inner='aot_eager'; use make_backend(inner='inductor') or drop it")
        patches = inductor_config_patches(mode, options) if self.inner == "inductor" else {}
        # subgraphs too: an autograd.Function (DeepSpeed's _SeqAllToAll) puts its exchange in one, and the
        # AOT graphs the pass rewrites have it inlined; missing it would plan "auto" on an unagreed profile
        exchanges = [node for module in gm.modules() if isinstance(module, torch.fx.GraphModule)
                     for node in module.graph.nodes if is_all_to_all(node)]
        if not options_.enabled:
            log.info("hcms: HCMS_DISABLE is set; compiling without the pass")
        elif exchanges:
            profile = self._profile_for(example_inputs, _exchange_groups(exchanges), must_agree=options_.predicts)
            options_ = replace(options_, profile=profile, hints=_symbolic_hints(example_inputs))
        if self.inner == "inductor":
            return self._inductor(gm, example_inputs, options_, patches)
        return self._aot_eager(gm, example_inputs, options_)

    def _inductor(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: HcmsOptions,
                  patches: dict[str, Any]) -> Callable[..., Any]:
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        if not options.enabled:
            return compile_fx(gm, example_inputs, config_patches=patches)
        store = ReportStore()
        graph_pass = HcmsGraphPass(options, self.reports)
        # every graph of this Dynamo graph, for AOTAutograd's cache hits (the backward comes later, lazily)
        dynamo_key = _graph_key("dynamo", options.key(), sorted(patches.items(), key=str), gm.code,
                                [_input_meta(t) for t in example_inputs], torch.is_grad_enabled())
        recorded: list[GraphReport] = []

        def inner_compile(graph_module: torch.fx.GraphModule, inputs: Any, **kwargs: Any) -> Any:
            phase = _inner_phase(kwargs)
            key = _graph_key("inner", dynamo_key, phase, graph_module.code, [_input_meta(t) for t in inputs])
            before = len(self.reports)
            graph_pass.phase = phase
            try:
                compiled = compile_fx_inner(graph_module, inputs, **kwargs)
            finally:
                graph_pass.phase = None
            if len(self.reports) > before:
                store.save(key, self.reports[before:])
            else:  # Inductor's FX graph cache served it and skipped the pass
                self.reports.append(_from_store(store, key, phase, "Inductor's FX graph cache"))
            recorded.extend(self.reports[before:])
            store.save(dynamo_key, recorded)
            return compiled

        patches = {**patches, "post_grad_custom_pre_pass": _as_custom_pass(graph_pass)}
        before = len(self.reports)
        compiled = compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches=patches)
        if len(self.reports) == before:  # AOTAutograd's cache served every graph of it
            found = store.load(dynamo_key)
            self.reports.extend(found if found else
                                [GraphReport("unknown", missing=_not_recorded("AOTAutograd's cache", store))])
        return compiled

    def _aot_eager(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: HcmsOptions):
        from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
        from torch._dynamo.backends.common import aot_autograd

        def compiler(phase: str) -> Callable[..., Any]:
            def compile_graph(graph_module: torch.fx.GraphModule, _inputs: Any) -> Callable[..., Any]:
                report = GraphReport(phase)
                if options.enabled:
                    report = options.rewrite(graph_module.graph, phase, self.reports)
                    graph_module.recompile()
                self.reports.append(replace(report, graph_module=graph_module))
                return make_boxed_func(graph_module.forward)

            return compile_graph

        # partitioned as torch's own aot_eager backend (torch/_dynamo/backends/debugging.py): the default
        # partitioner would leave a dead recomputation of the forward attention in the backward graph
        backend = aot_autograd(fw_compiler=compiler(FORWARD), bw_compiler=compiler(BACKWARD),
                               inference_compiler=compiler(INFERENCE),
                               partition_fn=min_cut_rematerialization_partition, keep_inference_input_mutations=True)
        return backend(gm, example_inputs)

    def _profile_for(self, example_inputs: Sequence[Any], groups: list[tuple[str, dist.ProcessGroup | None]],
                     must_agree: bool) -> DeviceProfile:
        """The device profile for the graph's device and exchange groups, resolved once per both. Under
        "auto" the ranks of each group then agree on it (see the module docstring)."""
        device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
        key = (str(device), tuple(name for name, _ in groups), must_agree)
        if key not in self._profiles:
            sizes = {dist.get_world_size(group) for _, group in groups if group is not None}
            profile = resolve_profile(self.profile, device, sizes.pop() if len(sizes) == 1 else None)
            self._profiles[key] = _agree_over(profile, groups) if must_agree else profile
        return self._profiles[key]

    def tables(self) -> str:
        return "\n\n".join(report.table() for report in self.reports)


def _from_store(store: ReportStore, key: str, phase: str, cache: str) -> GraphReport:
    found = store.load(key)
    if found and len(found) == 1:
        return found[0]
    return GraphReport(phase, missing=_not_recorded(cache, store))


def _exchange_groups(exchanges: Sequence[torch.fx.Node]) -> list[tuple[str, dist.ProcessGroup | None]]:
    """The process groups of the graph's all-to-alls, by name (sorted, so every rank visits them in one
    order); a group this process cannot resolve is None."""
    groups: dict[str, dist.ProcessGroup | None] = {}
    for node in exchanges:
        group = exchange_args(node).group
        if isinstance(group, dist.ProcessGroup):
            groups[group.group_name] = group
        elif isinstance(group, str) and group not in groups:
            groups[group] = _resolve_group(group)
    return sorted(groups.items(), key=lambda item: item[0])


def _resolve_group(name: str) -> dist.ProcessGroup | None:
    try:
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(name)
    except (ImportError, ValueError, RuntimeError, KeyError):
        return None


def _agree_over(profile: DeviceProfile, groups: list[tuple[str, dist.ProcessGroup | None]]) -> DeviceProfile:
    """`agree` over each group in turn. Over a device mesh's groups (one per dimension) that gives every
    rank of the mesh the same profile; with one group, every rank of that group."""
    for _, group in groups:
        if group is None or dist.get_world_size(group) == 1 or dist.get_backend(group) == "fake":
            continue  # nothing to agree with, or in-process ranks that share one profile already
        profile = agree(profile, group)
    return profile


def make_backend(chunks: ChunkSpec = AUTO, inner: str = "inductor", exact: bool | str = True,
                 profile: ProfileSpec = None, fuse: bool = True, exchange: str = AUTO) -> HcmsBackend:
    """A configured HCMS backend: `torch.compile(model, backend=make_backend(chunks=(2, 1)))`.
    `fuse=False` keeps one all-to-all per exchanged tensor in every chunk; `exchange` is "auto",
    "nccl" or "copy-engine" (see `hcms_compile.rewrite`)."""
    return HcmsBackend(chunks=chunks, inner=inner, exact=exact, profile=profile, fuse=fuse, exchange=exchange)


hcms_backend = HcmsBackend()
