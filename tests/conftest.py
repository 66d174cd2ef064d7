"""Shared fixtures and hypothesis profiles.

`HYPOTHESIS_PROFILE=thorough pytest` runs many more examples than CI's default profile.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch.distributed as dist
from hypothesis import HealthCheck, settings

from hcms_compile.testing import ranks
from tests.helpers import every_site_checked

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
# HYPOTHESIS_EXAMPLES=N sets the thorough profile's count where 1000 per property would not fit a time budget
settings.register_profile("thorough", max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "1000")), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# the files that take longest, started first: under `--dist loadfile` the other worker runs the rest
# meanwhile instead of idling while one long file finishes at the end
SLOWEST_FILES = ("test_diffusers_models.py",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in SLOWEST_FILES)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def fake_group() -> Callable[[int], dist.ProcessGroup]:
    """P -> a process group of ranks 0..P-1 in a fake world of 8 (pair with LocalTensorMode(P))."""
    ranks.fake_world()
    return ranks.group


@pytest.fixture(autouse=True)
def sites_left_as_they_were() -> Iterator[None]:
    """In every test, every site any rewrite skips leaves its graph structurally as it was, and
    every site it rewrites changes only its own nodes (`tests.helpers.every_site_checked`)."""
    with every_site_checked() as problems:
        yield
    assert not problems, problems
