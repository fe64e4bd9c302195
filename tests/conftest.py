"""Shared fixtures: one real local Ray cluster per test session (starting one costs ~10 s)."""

import inspect
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub during tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _devign_for_tests() -> tuple[Path, bool]:
    """The Devign folder the tests read, by the package's own rule (data.dir, then $MOEKD_DATA_DIR, then
    ../shared/data/devign), and whether it is the real data. Where neither is there (a fresh clone), a synthetic
    stand-in of the same shape (tests/synthetic.py: C functions with a learnable label) is written to a temporary
    folder and $MOEKD_DATA_DIR points at it, for this process and every Ray worker and subprocess it starts; tests
    of facts only real Devign has skip (`needs_real_devign`)."""
    made = os.environ.get(_SYNTHETIC_ENV)
    if made and Path(made).is_dir() and os.environ.get("MOEKD_DATA_DIR") == made:  # imported a second time
        return Path(made), False
    from moekd_ray.config import DataConfig
    from moekd_ray.data import DataError, resolve_data_dir

    try:
        found = resolve_data_dir(DataConfig())
    except DataError:  # $MOEKD_DATA_DIR names no folder: the data tests report it, as a user's run would
        return Path(os.environ["MOEKD_DATA_DIR"]), True
    if found is not None:
        return found, True
    from synthetic import write_devign_like

    folder = write_devign_like(Path(tempfile.mkdtemp(prefix="moekd-synthetic-devign-")))
    os.environ["MOEKD_DATA_DIR"] = os.environ[_SYNTHETIC_ENV] = str(folder)
    return folder, False


_SYNTHETIC_ENV = "MOEKD_TEST_SYNTHETIC_DEVIGN"
DEVIGN_DIR, REAL_DEVIGN = _devign_for_tests()
needs_real_devign = pytest.mark.skipif(
    not REAL_DEVIGN, reason="checks facts of the real Devign rows, absent here: set MOEKD_DATA_DIR=<folder with "
    "Devign's train/valid/test.jsonl.gz> (e.g. ../shared/data/devign)")


def pytest_report_header(config):
    if REAL_DEVIGN:
        return f"devign: {DEVIGN_DIR}"
    return (f"devign: no ../shared/data/devign and MOEKD_DATA_DIR unset: a synthetic stand-in at {DEVIGN_DIR} "
            "(tests of the real rows skip)")


# Modules whose every test waits on a server, a cluster or a whole run started in a subprocess.
SLOW_MODULES = {"test_team_server", "test_cluster_run", "test_predict", "test_serving"}


def is_slow(item) -> bool:
    """Whatever starts Ray (the session's cluster, its own, or a fixture built on one: a tiny pipeline, a benchmark)
    or waits on a server: seconds to minutes each. The rest (components, configs, bad input) runs in a few minutes."""
    return ("ray_cluster" in getattr(item, "fixturenames", ()) or item.get_closest_marker("own_cluster") is not None
            or item.module.__name__.rpartition(".")[2] in SLOW_MODULES
            or "wait_http(" in inspect.getsource(item.function))  # starts a server of its own


def pytest_collection_modifyitems(items):
    """Marks the slow tests (`-m "not slow"` is the quick subset). Tests that start their own Ray cluster run first,
    before the session's shared cluster exists: two Ray instances on one machine at once confuse Ray Train's
    placement-group cleaner."""
    for item in items:
        if is_slow(item):
            item.add_marker(pytest.mark.slow)
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
    shutdown_within(ray, seconds=120)


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
        "distill.alpha=0.5", "distill.temperature=2", "distill.augment_ratio=0.5", "distill.consistency_weight=1",
        # The default registered name, so that `moekd predict` with no --model finds this run's student.
        f"mlflow.tracking_uri=sqlite:///{tmp / 'mlruns.db'}", "mlflow.registered_model=moekd-student",
    ])
    return cfg, run_pipeline(cfg, log=lambda *_: None)


def wait_until_idle(ray, seconds: float = 60.0) -> None:
    """Every CPU of the cluster free again (Ray returns a finished run's resources asynchronously); otherwise fail
    at once, naming what still holds them, rather than leave the next run waiting for a placement until the timeout."""
    import time

    total = ray.cluster_resources().get("CPU", 0)
    deadline = time.time() + seconds
    while ray.available_resources().get("CPU", 0) < total - 1e-6 and time.time() < deadline:
        time.sleep(0.5)
    free = ray.available_resources().get("CPU", 0)
    if free < total - 1e-6:
        groups = [f"{g['placement_group_id'][:12]} {g['state']} {g['name'] or '-'} {list(g['bundles'].values())}"
                  for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
        pytest.fail(f"{total - free:g} of {total:g} CPUs still held {seconds:g} s after the last run; placement "
                    f"groups not removed: {groups or 'none'}")


_left_hung = {}


def shutdown_within(ray, seconds: float) -> None:
    """ray.shutdown(), waited for at most `seconds`: a shutdown stuck in Ray's C++ cannot be broken by pytest-timeout's
    signal, and would hold the whole run (with its summary unprinted) until CI's limit."""
    import faulthandler
    import sys
    import threading

    thread = threading.Thread(target=ray.shutdown, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        print(f"\nray.shutdown() had not returned after {seconds:g} s; every thread's stack:", file=sys.stderr)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        _left_hung["ray"] = True


def pytest_sessionfinish(session, exitstatus):
    _left_hung["status"] = int(exitstatus)


def pytest_unconfigure(config):
    """After the summary: leave at once if Ray's shutdown hung, or if a timed-out test left a thread running (a
    trainer's fit() in a pool thread, say): Ray's exit handler and Python's join of those threads would wait forever."""
    import sys
    import threading

    if not REAL_DEVIGN and os.environ.get(_SYNTHETIC_ENV) == str(DEVIGN_DIR):
        shutil.rmtree(DEVIGN_DIR, ignore_errors=True)

    stuck = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if _left_hung.get("ray") or stuck:
        print(f"leaving without exit handlers: ray.shutdown hung: {bool(_left_hung.get('ray'))}, threads still "
              f"running: {stuck}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_left_hung.get("status", 1))
