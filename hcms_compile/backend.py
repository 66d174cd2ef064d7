"""`torch.compile(model, backend=hcms_backend)`: Dynamo -> AOTAutograd -> HCMS -> inner compiler.

The HCMS rewrite runs on every graph AOTAutograd produces (forward, backward, inference). With
Inductor it runs as a post-grad custom pass (`HcmsGraphPass`, a `CustomGraphPass` whose `uuid()`
names its configuration, so Inductor's FX graph cache stays on and keys on it); with `aot_eager` it
runs in the forward and backward compilers. Environment variables, read at each compile:
`HCMS_DISABLE=1` compiles without the pass; `HCMS_CHUNKS=3` or `HCMS_CHUNKS=2,1` sets the chunks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.fx

from . import passes as passes_pkg
from .api import ProfileSpec, rewrite_graph
from .calibrate import agree_if_distributed, resolve_profile
from .passes import ChunkSpec, validate_chunks
from .passes.exactness import BITWISE, exactness_policy
from .passes.ops import is_all_to_all
from .passes.plan import AUTO, parse_chunks
from .passes.profiles import DeviceProfile
from .passes.schedule import pin_pipeline
from .report import SiteReport, render_sites

log = logging.getLogger("hcms_compile")

INNER = ("inductor", "aot_eager")


@dataclass(frozen=True)
class HcmsOptions:
    chunks: ChunkSpec = AUTO
    exact: str = BITWISE  # the exactness policy's name
    enabled: bool = True
    profile: DeviceProfile | None = None  # resolved (and agreed between ranks) for the graph's device

    def key(self) -> str:
        chunks = list(self.chunks) if isinstance(self.chunks, (list, tuple)) else self.chunks
        # the plan of "auto" depends on the profile: a cached graph planned with another must not be reused
        profile = self.profile.to_json() if self.profile is not None and self.chunks == AUTO else None
        return json.dumps({"chunks": chunks, "exact": self.exact, "enabled": self.enabled, "profile": profile},
                          sort_keys=True)

    def rewrite(self, graph: torch.fx.Graph) -> list[SiteReport]:
        return rewrite_graph(graph, chunks=self.chunks, exact=self.exact, profile=self.profile)


def options_from_env(chunks: ChunkSpec, exact: bool | str, environ: dict[str, str] | None = None) -> HcmsOptions:
    env = os.environ if environ is None else environ
    enabled = env.get("HCMS_DISABLE", "").strip() not in ("1", "true", "yes")
    raw = env.get("HCMS_CHUNKS", "").strip()
    if raw:
        try:
            chunks = parse_chunks(raw)
        except ValueError:
            raise ValueError(f"HCMS_CHUNKS={raw!r}: expected auto, a count like 3 or sizes like 2,1") from None
    return HcmsOptions(validate_chunks(chunks), exactness_policy(exact), enabled)


@dataclass
class GraphReport:
    """The rewrite of one graph the backend compiled."""

    phase: str  # "forward", "backward" or "inference"
    sites: list[SiteReport] = field(default_factory=list)
    graph_module: torch.fx.GraphModule | None = None  # the rewritten graph (aot_eager only)
    cached: bool = False  # the compiled code came from a cache: the plan is re-derived, not observed

    def table(self) -> str:
        note = " (compiled code came from a cache; the plan shown is re-derived)" if self.cached else ""
        return f"{self.phase} graph{note}\n{render_sites(self.sites)}"

    def __str__(self) -> str:
        return self.table()


def _phase(graph: torch.fx.Graph, default: str) -> str:
    names = [n.name for n in graph.nodes if n.op == "placeholder"]
    return "backward" if any(name.startswith("tangents") for name in names) else default


class HcmsGraphPass:
    """The HCMS rewrite as an Inductor post-grad custom pass."""

    def __init__(self, options: HcmsOptions, sink: list[GraphReport]) -> None:
        self.options = options
        self.sink = sink

    def __call__(self, graph: torch.fx.Graph) -> None:
        phase = _phase(graph, "forward")
        sites = self.options.rewrite(graph)
        if any(site.rewritten for site in sites):
            pin_pipeline(graph)
        self.sink.append(GraphReport(phase, sites))

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


class HcmsBackend:
    """A torch.compile backend that applies HCMS to every forward and backward graph."""

    def __init__(self, chunks: ChunkSpec = AUTO, inner: str = "inductor", exact: bool | str = True,
                 profile: ProfileSpec = None) -> None:
        if inner not in INNER:
            raise ValueError(f"inner must be one of {INNER}, got {inner!r}")
        validate_chunks(chunks)
        exactness_policy(exact)
        self.chunks, self.inner, self.exact, self.profile = chunks, inner, exact, profile
        self.reports: list[GraphReport] = []
        self._profiles: dict[str, DeviceProfile] = {}

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        options = options_from_env(self.chunks, self.exact)
        if not options.enabled:
            log.info("hcms: HCMS_DISABLE is set; compiling without the pass")
        elif any(is_all_to_all(node) for node in gm.graph.nodes):
            options = replace(options, profile=self._profile_for(example_inputs, agree=options.chunks == AUTO))
        if self.inner == "inductor":
            return self._inductor(gm, example_inputs, options)
        return self._aot_eager(gm, example_inputs, options)

    def _inductor(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: HcmsOptions):
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        if not options.enabled:
            return compile_fx(gm, example_inputs)

        def inner_compile(graph_module: torch.fx.GraphModule, inputs: Any, **kwargs: Any) -> Any:
            before = len(self.reports)
            compiled = compile_fx_inner(graph_module, inputs, **kwargs)
            if len(self.reports) == before:
                # a cache hit skips post-grad passes; the cache key holds our uuid, so the cached
                # code was rewritten with this very plan: derive the report from a copy
                phase = "backward" if kwargs.get("is_backward") else "forward"
                copy = torch.fx.GraphModule(graph_module, deepcopy(graph_module.graph))
                sites = options.rewrite(copy.graph)
                self.reports.append(GraphReport(phase, sites, cached=True))
            return compiled

        patches = {"post_grad_custom_pre_pass": _as_custom_pass(HcmsGraphPass(options, self.reports))}
        before = len(self.reports)
        dynamo_graph = deepcopy(gm.graph)  # compile_fx may change gm's graph in place
        compiled = compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches=patches)
        if len(self.reports) == before:
            # AOTAutograd's cache served the whole compile (its key holds our uuid): report the plan
            # as the Dynamo graph shows it; the backward graph is not rebuilt just to report on it
            sites = options.rewrite(torch.fx.GraphModule(gm, dynamo_graph).graph)
            self.reports.append(GraphReport("forward", sites, cached=True))
        return compiled

    def _aot_eager(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: HcmsOptions):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def compiler(phase: str) -> Callable[..., Any]:
            def compile_graph(graph_module: torch.fx.GraphModule, _inputs: Any) -> Callable[..., Any]:
                sites: list[SiteReport] = []
                if options.enabled:
                    sites = options.rewrite(graph_module.graph)
                    graph_module.recompile()
                self.reports.append(GraphReport(_phase(graph_module.graph, phase), sites, graph_module))
                return make_boxed_func(graph_module.forward)

            return compile_graph

        backend = aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"),
                               inference_compiler=compiler("inference"))
        return backend(gm, example_inputs)

    def _profile_for(self, example_inputs: Sequence[Any], agree: bool) -> DeviceProfile:
        """The device profile, resolved once per device. Under "auto" the ranks then agree on it (one
        small all-reduce, at the first compile of a graph with an all-to-all, which every rank runs):
        a node with another saved profile would otherwise plan differently and hang the collectives."""
        device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
        key = f"{device} {agree}"
        if key not in self._profiles:
            world = dist.get_world_size() if dist.is_initialized() else None
            profile = resolve_profile(self.profile, device, world)
            self._profiles[key] = agree_if_distributed(profile) if agree else profile
        return self._profiles[key]

    def tables(self) -> str:
        return "\n\n".join(report.table() for report in self.reports)


def make_backend(chunks: ChunkSpec = AUTO, inner: str = "inductor", exact: bool | str = True,
                 profile: ProfileSpec = None) -> HcmsBackend:
    """A configured HCMS backend: `torch.compile(model, backend=make_backend(chunks=(2, 1)))`."""
    return HcmsBackend(chunks=chunks, inner=inner, exact=exact, profile=profile)


hcms_backend = HcmsBackend()
