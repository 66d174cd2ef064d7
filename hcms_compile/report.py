"""What the rewrite did to each candidate site, as records and as a table."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx
from tabulate import tabulate

REWRITTEN = "rewritten"
SKIPPED = "skipped"


@dataclass(frozen=True)
class SiteReport:
    """One attention op found in the graph, and what became of it."""

    index: int
    attention: str  # the attention node's name in the input graph
    kernel: str
    status: str  # "rewritten" or "skipped"
    reason: str = ""  # why skipped; empty when rewritten
    world_size: int | None = None
    local_heads: int | None = None
    chunk_sizes: tuple[int, ...] = ()
    exchanges: int = 0  # input all-to-alls of the site as traced (3 for q, k, v; 1 for a fused qkv buffer)
    collectives: int = 0  # all-to-all launches of the rewritten site, inputs and outputs of every chunk
    fused: bool = False  # a chunk's exchanges of one process group and dtype travel as one all-to-all
    exchange: str = ""  # for rewritten sites: how the all-to-alls move bytes, "nccl" or "copy-engine"
    exchange_note: str = ""  # why copy-engine was not available, or where it runs the group's all-to-all
    bitwise: bool | None = None  # for rewritten sites: is the chunked kernel known to keep its bits
    grade: str = ""  # for rewritten sites: "bitwise", "run-to-run" or "rounding" (passes/exactness.py)
    exactness: str = ""  # what that verdict rests on
    rho: float | None = None  # predicted comm / (comm + attention) of the plain site
    predicted_gain: float | None = None  # predicted (plain - chunked) / plain for the chosen chunks
    choice: str = ""  # with chunks="auto": why this chunk count

    @property
    def rewritten(self) -> bool:
        return self.status == REWRITTEN


@dataclass
class RewriteResult:
    graph_module: torch.fx.GraphModule
    sites: list[SiteReport] = field(default_factory=list)
    note: str = ""  # why a graph with all-to-alls has no candidate site (`api.no_site_reason`); else empty

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.rewritten]

    def table(self) -> str:
        return render_sites(self.sites, self.note)

    def __str__(self) -> str:
        return self.table()


def render_sites(sites: list[SiteReport], note: str = "") -> str:
    """The site reports as a table (or a line saying there was no site, and why when `note` says)."""
    if not sites:
        return "no all-to-all -> attention -> all-to-all site found: graph unchanged" + (f" ({note})" if note else "")
    rows = [
        (s.index, s.attention, s.kernel, s.status, s.world_size or "-", s.local_heads or "-",
         "+".join(map(str, s.chunk_sizes)) or "-", s.exchanges or "-", s.collectives or "-", s.exchange or "-",
         _bits(s), _percent(s.rho), _percent(s.predicted_gain), s.reason or _joined(s.choice, s.exchange_note))
        for s in sites
    ]
    headers = ("site", "attention", "kernel", "status", "P", "local heads", "chunks", "a2a in", "a2a/site", "exchange",
               "bits", "rho", "pred. gain", "reason")
    return tabulate(rows, headers=headers, tablefmt="simple")


def _joined(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _bits(site: SiteReport) -> str:
    if not site.grade:
        return "-"
    return {"bitwise": "exact", "run-to-run": "within run-to-run"}.get(site.grade, "rounding differs")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"
