"""`rewrite(gm, chunks=...)`: the standalone HCMS pass over any traced FX graph.

The pass reads every node's shape from the metadata a tracer records (`val` from make_fx, export
and AOTAutograd, in real or fake tracing mode; `example_value` from Dynamo). A graph without any
(`torch.fx.symbolic_trace`, a hand-built graph) gets it from `example_inputs=`, propagated on the
copy that `rewrite` returns; without them every site is skipped with a reason that says so.
`symbolic_trace` of code that calls funcol (`torch.distributed._functional_collectives`) records
funcol's eager wrapper (`_wrap_tensor_autograd`) after each all-to-all instead of a wait, and its
split sizes as graph arithmetic; the pass does not prove exchanges in that form, and the reason of
every site next to one says so and names the tracers that record the functional form.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .calibrate import resolve_profile
from .passes import ChunkSpec, Site, Skip, match_sites, plan_site, rewrite_site, validate_chunks
from .passes.emit import EmitError, RollbackError
from .passes.exactness import exactness_policy
from .passes.exchanges import validate_exchange
from .passes.match import match_again, value_of
from .passes.ops import attention_op, is_all_to_all, target_name
from .passes.plan import AUTO, launches
from .passes.profiles import DeviceProfile
from .passes.symbolic import SYMBOLIC
from .report import REWRITTEN, SKIPPED, RewriteResult, SiteReport

log = logging.getLogger("hcms_compile")


ProfileSpec = DeviceProfile | str | os.PathLike | None

NO_METADATA = ("the graph has no shape metadata: pass example_inputs= (one rank's inputs, real or fake tensors) "
               "to rewrite(), or trace with make_fx, torch.export or Dynamo")
METADATA_KEYS = ("val", "example_value", "tensor_meta")
EAGER_WRAPPER = "_wrap_tensor_autograd"  # funcol's eager result wrapper, recorded only by symbolic_trace


def rewrite(gm: torch.fx.GraphModule, *, chunks: ChunkSpec = AUTO, exact: bool | str = True,
            profile: ProfileSpec = None, example_inputs: Sequence[object] | None = None,
            fuse: bool = True, exchange: str = AUTO) -> RewriteResult:
    """Chunk every provable all-to-all -> attention -> all-to-all site of `gm` by local heads.

    `chunks` is "auto" (the cost model picks a count per site, 1 meaning leave it alone), a chunk
    count (split evenly, larger chunks first) or local-head counts per chunk. `profile` is the
    device profile the cost model uses: a `DeviceProfile`, a saved profile's path, or None for the
    one `hcms calibrate` saved for the site's device and world size, else a built-in estimate. The
    plan is a function of the graph and the profile: ranks that pass the same profile agree.
    `exact` is the exactness policy (see `hcms_compile.passes.exactness`): with `True` (the default)
    a site is chunked only where the attention kernel is known to keep its bits; `False` also
    allows chunkings that stay within the kernel's own run-to-run variation; "rounding" allows any
    correct chunking. The report says which grade each rewritten site has.
    `fuse` (the default) sends a chunk's exchanges of one process group and dtype (q, k and v; dq,
    dk and dv) as one all-to-all: fewer launches and barriers, the same bytes. With `chunks=1` it
    rewrites the plain site into its fused form; "auto" weighs the fused plain site too.
    `exchange` says how the rewritten all-to-alls move bytes: "nccl" (the process group's own
    all-to-all, as traced), "copy-engine" (`hcms_compile.copy_engine`: copy engines and stream memory
    operations, no SMs; the group's own all-to-all where it cannot run, such as on CPU) or "auto"
    (the default: the cost model chooses between the kinds the site's group supports, NCCL only
    unless it is one node of CUDA ranks with peer access and symmetric memory).
    `example_inputs` (one rank's inputs in the graph's argument order, real or fake tensors) give
    shapes to a graph that has none, such as `torch.fx.symbolic_trace`'s: they are propagated with
    fake tensors through the copy, never through `gm`.
    `gm` is not mutated; the result holds a new GraphModule and one report per attention op.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"rewrite() takes a torch.fx.GraphModule, got {type(gm).__name__}")
    spec, policy = _check_args(chunks, exact, fuse, exchange)
    out = _copy(gm)
    no_metadata = None
    if example_inputs is not None:
        no_metadata = _propagate(out, example_inputs)
        if no_metadata is not None:
            out = _copy(gm)  # a propagation that stopped half way leaves no values behind
    reports = _rewrite_graph(out.graph, spec, policy, profile, no_metadata, fuse, exchange)
    if any(r.rewritten for r in reports):
        out.recompile()
    return RewriteResult(out, reports, no_site_reason(out.graph))


_DECOMPOSED = {"bmm", "baddbmm", "matmul", "mm"}  # what SDPA's math backend, or attention by hand, multiplies with
_SOFTMAX = {"softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax"}


def no_site_reason(graph: torch.fx.Graph) -> str:
    """Why a graph that exchanges tensors by all-to-all has no attention op to report (there is then no
    site, so no site's reason says it); empty when the graph has an attention op or no all-to-all."""
    exchanges = [n for n in graph.nodes if is_all_to_all(n)]
    if not exchanges or any(attention_op(n) is not None for n in graph.nodes):
        return ""
    names = {target_name(n) for n in graph.nodes if n.op in ("call_function", "call_method")}
    if names & _DECOMPOSED and names & _SOFTMAX:
        return (f"the graph has {len(exchanges)} all-to-all(s) but no attention op: attention is computed by "
                f"matrix products and softmax ({', '.join(sorted(names & (_DECOMPOSED | _SOFTMAX)))}), as SDPA's "
                "math backend decomposes it when the graph is traced under sdpa_kernel(SDPBackend.MATH) (or when "
                "attention is written out by hand); HCMS chunks SDPA and its fused ATen kernels only: leave "
                "SDPA's backend choice to torch, or call F.scaled_dot_product_attention")
    return (f"the graph has {len(exchanges)} all-to-all(s) but no attention op HCMS knows (SDPA or its fused ATen "
            "kernels), so there is nothing to chunk")


def _copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    with warnings.catch_warnings():
        # copying export's pytree codegen trips a torch-internal deprecation warning
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    out = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    out.meta = dict(getattr(gm, "meta", {}))
    return out


def _propagate(gm: torch.fx.GraphModule, example_inputs: Sequence[object]) -> str | None:
    """Record every node's fake value in `gm` from `example_inputs`; the reason it could not, or None."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(example_inputs) != len(placeholders):
        return (f"example_inputs= has {len(example_inputs)} values but the graph takes {len(placeholders)} "
                f"({', '.join(n.name for n in placeholders)})")
    # parameters and buffers reached by get_attr are real: the mode reads their metadata
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    inputs = [mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
    except Exception as err:  # noqa: BLE001 - any failure means the graph keeps no shapes
        return f"example_inputs= did not run through the graph: {type(err).__name__}: {err}"
    return None


def rewrite_graph(graph: torch.fx.Graph, *, chunks: ChunkSpec = AUTO, exact: bool | str = True,
                  profile: ProfileSpec = None, fuse: bool = True, exchange: str = AUTO) -> list[SiteReport]:
    """`rewrite` in place on a graph: what compiler hooks (Inductor's post-grad passes) call."""
    spec, policy = _check_args(chunks, exact, fuse, exchange)
    return _rewrite_graph(graph, spec, policy, profile, None, fuse, exchange)


def _rewrite_graph(graph: torch.fx.Graph, spec: ChunkSpec, policy: str, profile: ProfileSpec,
                   no_metadata: str | None, fuse: bool, exchange: str) -> list[SiteReport]:
    """`no_metadata`: why the graph has no shapes, when `example_inputs` could not give them."""
    if no_metadata is None and not any(key in node.meta for node in graph.nodes for key in METADATA_KEYS):
        no_metadata = NO_METADATA
    reports = (_apply_all(graph, spec, policy, profile, fuse, exchange) if no_metadata is None
               else _unshaped(graph, no_metadata))
    for report in reports:
        log.info("hcms site %d (%s): %s %s", report.index, report.attention, report.status, report.reason)
    _warn_symbolic(reports)
    return reports


def _unshaped(graph: torch.fx.Graph, reason: str) -> list[SiteReport]:
    """Without shapes no proof can start: every attention op is skipped for the one cause."""
    ops = [(node, op) for node in graph.nodes if (op := attention_op(node)) is not None]
    return [SiteReport(index=i, attention=node.name, kernel=op.kernel, status=SKIPPED, reason=reason)
            for i, (node, op) in enumerate(ops)]


def _apply_all(graph: torch.fx.Graph, spec: ChunkSpec, policy: str, profile: ProfileSpec,
               fuse: bool, exchange: str) -> list[SiteReport]:
    profiles: dict[tuple[str, int], DeviceProfile] = {}

    def profile_for(site: Site) -> DeviceProfile:
        device = value_of(site.heads["query"]).device
        key = (str(device), site.world_size)
        if key not in profiles:
            profiles[key] = resolve_profile(profile, device, site.world_size)
        return profiles[key]

    reports = [_apply(graph, found, spec, policy, profile_for, fuse, exchange) for found in match_sites(graph)]
    if any(r.rewritten for r in reports):
        graph.lint()
    return _explain_eager_wrappers(graph, reports)


def _explain_eager_wrappers(graph: torch.fx.Graph, reports: list[SiteReport]) -> list[SiteReport]:
    """Add the cause to the reason of each skipped site connected to an all-to-all whose result goes
    through funcol's eager wrapper: the matcher only sees that no exchange fits, the fix is elsewhere."""
    wrapped = [n for n in graph.nodes if is_all_to_all(n) and any(target_name(u) == EAGER_WRAPPER for u in n.users)]
    if not wrapped:
        return reports
    nodes = {node.name: node for node in graph.nodes}
    out = []
    for report in reports:
        near = _connected(nodes[report.attention]) if not report.rewritten else set()
        names = [a2a.name for a2a in wrapped if a2a in near]
        if names:
            hint = (f"the exchanges {', '.join(names)} pass their results through funcol's eager wrapper "
                    f"{EAGER_WRAPPER}, which torch.fx.symbolic_trace records when it traces funcol: trace with "
                    "make_fx, torch.export or Dynamo (they record wait_tensor), or call "
                    "torch.ops._c10d_functional.all_to_all_single and wait_tensor with static split sizes")
            report = replace(report, reason=f"{report.reason}; {hint}")
        out.append(report)
    return out


def _connected(node: torch.fx.Node) -> set[torch.fx.Node]:
    """The ancestors and descendants of `node`."""
    found: set[torch.fx.Node] = set()
    for step in (lambda n: n.all_input_nodes, lambda n: n.users):
        stack = list(step(node))
        while stack:
            current = stack.pop()
            if current not in found:
                found.add(current)
                stack.extend(step(current))
    return found


def _warn_symbolic(reports: list[SiteReport]) -> None:
    """One warning per graph for the sites dynamic shapes kept plain: a dynamic compile otherwise
    loses the overlap silently (the table is only printed on request)."""
    skipped = [r for r in reports if not r.rewritten and r.reason.startswith(SYMBOLIC)]
    if skipped:
        sites = "; ".join(f"site {r.index} ({r.attention}): {r.reason[len(SYMBOLIC):]}" for r in skipped)
        log.warning("hcms: %d site(s) left unchunked because of symbolic shapes: %s", len(skipped), sites)


def _check_args(chunks: object, exact: object, fuse: object, exchange: object) -> tuple[ChunkSpec, str]:
    if not isinstance(fuse, bool):
        raise TypeError(f"fuse must be True or False, got {type(fuse).__name__} {fuse!r}")
    validate_exchange(exchange)
    return validate_chunks(chunks), exactness_policy(exact)


def _apply(graph: torch.fx.Graph, found: Site | Skip, spec: ChunkSpec, policy: str,
           profile_for: Callable[[Site], DeviceProfile], fuse: bool, exchange: str) -> SiteReport:
    base = dict(index=found.index, attention=found.attention.name, kernel=found.kernel,
                world_size=found.world_size, local_heads=found.local_heads)
    if isinstance(found, Site) and found.is_stale():
        found = match_again(found)  # an earlier site's rewrite replaced a node this one starts from
    if not isinstance(found, Site):
        return SiteReport(status=SKIPPED, reason=found.reason, **base)
    plan = plan_site(found, spec, policy, profile_for(found), fuse, exchange)
    if isinstance(plan, str):
        return SiteReport(status=SKIPPED, reason=plan, exchanges=len(found.inputs), **base)
    try:
        rewrite_site(graph, found, plan)
    except RollbackError:
        raise  # the graph is no longer as it was: reporting a skip would hide that
    except EmitError as err:
        return SiteReport(status=SKIPPED, reason=f"rewrite did not check: {err}", **base)
    except Exception as err:  # noqa: BLE001 - a bug in the pass must not take the user's compile down
        log.warning("hcms: internal error rewriting %s; site left as it was", found.attention.name, exc_info=True)
        return SiteReport(status=SKIPPED, reason=f"internal error, please report: {type(err).__name__}: {err}",
                          **base)
    predicted = plan.prediction
    return SiteReport(status=REWRITTEN, chunk_sizes=plan.chunk_sizes, exchanges=len(found.inputs),
                      collectives=sum(launches(found, plan)) * len(plan.chunk_sizes), fused=plan.fused,
                      exchange=plan.exchange, exchange_note=plan.note,
                      bitwise=plan.exactness.bitwise, grade=plan.exactness.grade,
                      exactness=plan.exactness.why, rho=predicted.rho if predicted else None,
                      predicted_gain=predicted.gain if predicted else None, choice=plan.choice, **base)
