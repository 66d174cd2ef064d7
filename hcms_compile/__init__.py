"""hcms_compile: pipeline Ulysses all-to-all with attention by chunking local heads."""

from . import copy_engine  # noqa: F401 - registers torch.ops.hcms.all_to_all
from .api import rewrite, rewrite_graph
from .backend import GraphReport, HcmsBackend, hcms_backend, make_backend
from .report import RewriteResult, SiteReport

__all__ = [
    "GraphReport",
    "HcmsBackend",
    "RewriteResult",
    "SiteReport",
    "hcms_backend",
    "make_backend",
    "rewrite",
    "rewrite_graph",
]
__version__ = "0.1.0"
