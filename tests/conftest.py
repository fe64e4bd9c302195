"""Shared fixtures: one real local Ray cluster per test session (starting one costs ~10 s)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub during tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(items):
    """Tests that start their own Ray cluster run first, before the session's shared cluster exists: two Ray
    instances on one machine at once confuse Ray Train's placement-group cleaner."""
    items.sort(key=lambda item: item.get_closest_marker("own_cluster") is None)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: extra torch threads only add sync overhead, and stall for seconds on a busy machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def ray_cluster():
    """Started as the CLI starts it (dashboard included: Ray Train's placement-group cleaner needs its state API)."""
    import ray

    from moekd_ray.config import load_config
    from moekd_ray.ray_runtime import init_ray

    init_ray(load_config(None, ["ray.num_cpus=2"]))
    yield ray
    ray.shutdown()


TINY_ARCH = {"vocab_size": 400, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "ffn_size": 64, "max_length": 64}


@pytest.fixture(scope="session")
def tiny_pipeline(ray_cluster, tmp_path_factory):
    """One tiny pipeline run (real Ray Train, DeepSpeed ZeRO-2 on 2 workers, MLflow sqlite), shared by the tests
    of the pipeline and of the search that starts from it."""
    import json

    from moekd_ray.config import load_config
    from moekd_ray.recipes.pipeline import run_pipeline

    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = load_config(None, [
        "name=tiny", f"output_dir={tmp / 'runs'}", "data.train_rows=256", "data.eval_rows=48",
        f"experts.model={json.dumps(TINY_ARCH)}", "experts.schedule.batch_size=16", "experts.schedule.epochs=2",
        "router.epochs=20", f"distill.student_arch={json.dumps(TINY_ARCH)}", "distill.schedule.epochs=2",
        "distill.schedule.batch_size=8", "distill.zero_stage=2", "distill.resources.num_workers=2",
        "distill.alpha=0.5", "distill.temperature=2", "distill.augment_ratio=0.5",
        f"mlflow.tracking_uri=sqlite:///{tmp / 'mlruns.db'}", "mlflow.registered_model=tiny-student",
    ])
    return cfg, run_pipeline(cfg, log=lambda *_: None)
