"""Shared fixtures and hypothesis profiles.

`HYPOTHESIS_PROFILE=thorough pytest` runs many more examples than CI's default profile.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch.distributed as dist
from hypothesis import HealthCheck, settings

from hcms_compile.testing import ranks

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def fake_group() -> Callable[[int], dist.ProcessGroup]:
    """P -> a process group of ranks 0..P-1 in a fake world of 8 (pair with LocalTensorMode(P))."""
    ranks.fake_world()
    return ranks.group
