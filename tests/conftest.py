"""Shared fixtures: one real local Ray cluster per test session (starting one costs ~10 s)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub during tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, dashboard_host="127.0.0.1", include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
