"""hcms_compile: pipeline Ulysses all-to-all with attention by chunking local heads."""

from .api import rewrite
from .report import RewriteResult, SiteReport

__all__ = ["RewriteResult", "SiteReport", "rewrite"]
__version__ = "0.1.0"
