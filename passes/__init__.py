"""HCMS graph passes: match -> plan -> rewrite -> schedule, over any FX graph.

This package knows nothing of the torch.compile backend; `hcms_compile.rewrite` drives it.
"""

from .exactness import Exactness, judge
from .match import Site, Skip, match_sites
from .plan import ChunkPlan, ChunkSpec, chunk_sizes, even_split, plan_site, validate_chunks
from .rewrite import rewrite_site

__all__ = [
    "ChunkPlan",
    "ChunkSpec",
    "Exactness",
    "Site",
    "Skip",
    "chunk_sizes",
    "even_split",
    "judge",
    "match_sites",
    "plan_site",
    "rewrite_site",
    "validate_chunks",
]
