"""`rewrite(gm, chunks=...)`: the standalone HCMS pass over any traced FX graph."""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Callable

import torch.fx

from .calibrate import resolve_profile
from .passes import ChunkSpec, Site, Skip, match_sites, plan_site, rewrite_site, validate_chunks
from .passes.emit import EmitError
from .passes.exactness import exactness_policy
from .passes.match import match_again, value_of
from .passes.plan import AUTO
from .passes.profiles import DeviceProfile
from .passes.symbolic import SYMBOLIC
from .report import REWRITTEN, SKIPPED, RewriteResult, SiteReport

log = logging.getLogger("hcms_compile")


ProfileSpec = DeviceProfile | str | os.PathLike | None


def rewrite(gm: torch.fx.GraphModule, *, chunks: ChunkSpec = AUTO, exact: bool | str = True,
            profile: ProfileSpec = None) -> RewriteResult:
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
    `gm` is not mutated; the result holds a new GraphModule and one report per attention op.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"rewrite() takes a torch.fx.GraphModule, got {type(gm).__name__}")
    spec, policy = _check_args(chunks, exact)
    with warnings.catch_warnings():
        # copying export's pytree codegen trips a torch-internal deprecation warning
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    out = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    out.meta = dict(getattr(gm, "meta", {}))
    reports = rewrite_graph(out.graph, chunks=spec, exact=policy, profile=profile)
    if any(r.rewritten for r in reports):
        out.recompile()
    return RewriteResult(out, reports)


def rewrite_graph(graph: torch.fx.Graph, *, chunks: ChunkSpec = AUTO, exact: bool | str = True,
                  profile: ProfileSpec = None) -> list[SiteReport]:
    """`rewrite` in place on a graph: what compiler hooks (Inductor's post-grad passes) call."""
    spec, policy = _check_args(chunks, exact)
    profiles: dict[tuple[str, int], DeviceProfile] = {}

    def profile_for(site: Site) -> DeviceProfile:
        device = value_of(site.heads["query"]).device
        key = (str(device), site.world_size)
        if key not in profiles:
            profiles[key] = resolve_profile(profile, device, site.world_size)
        return profiles[key]

    reports = [_apply(graph, found, spec, policy, profile_for) for found in match_sites(graph)]
    if any(r.rewritten for r in reports):
        graph.lint()
    for report in reports:
        log.info("hcms site %d (%s): %s %s", report.index, report.attention, report.status, report.reason)
    _warn_symbolic(reports)
    return reports


def _warn_symbolic(reports: list[SiteReport]) -> None:
    """One warning per graph for the sites dynamic shapes kept plain: a dynamic compile otherwise
    loses the overlap silently (the table is only printed on request)."""
    skipped = [r for r in reports if not r.rewritten and r.reason.startswith(SYMBOLIC)]
    if skipped:
        sites = "; ".join(f"site {r.index} ({r.attention}): {r.reason[len(SYMBOLIC):]}" for r in skipped)
        log.warning("hcms: %d site(s) left unchunked because of symbolic shapes: %s", len(skipped), sites)


def _check_args(chunks: object, exact: object) -> tuple[ChunkSpec, str]:
    return validate_chunks(chunks), exactness_policy(exact)


def _apply(graph: torch.fx.Graph, found: Site | Skip, spec: ChunkSpec, policy: str,
           profile_for: Callable[[Site], DeviceProfile]) -> SiteReport:
    base = dict(index=found.index, attention=found.attention.name, kernel=found.kernel,
                world_size=found.world_size, local_heads=found.local_heads)
    if isinstance(found, Site) and found.is_stale():
        found = match_again(found)  # an earlier site's rewrite replaced a node this one starts from
    if not isinstance(found, Site):
        return SiteReport(status=SKIPPED, reason=found.reason, **base)
    plan = plan_site(found, spec, policy, profile_for(found))
    if isinstance(plan, str):
        return SiteReport(status=SKIPPED, reason=plan, exchanges=len(found.inputs), **base)
    try:
        rewrite_site(graph, found, plan)
    except EmitError as err:
        return SiteReport(status=SKIPPED, reason=f"rewrite did not check: {err}", **base)
    except Exception as err:  # noqa: BLE001 - a bug in the pass must not take the user's compile down
        log.warning("hcms: internal error rewriting %s; site left as it was", found.attention.name, exc_info=True)
        return SiteReport(status=SKIPPED, reason=f"internal error, please report: {type(err).__name__}: {err}",
                          **base)
    predicted = plan.prediction
    return SiteReport(status=REWRITTEN, chunk_sizes=plan.chunk_sizes, exchanges=len(found.inputs),
                      bitwise=plan.exactness.bitwise, grade=plan.exactness.grade,
                      exactness=plan.exactness.why, rho=predicted.rho if predicted else None,
                      predicted_gain=predicted.gain if predicted else None, choice=plan.choice, **base)
