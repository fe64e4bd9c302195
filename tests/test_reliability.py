"""Failures for real. A Ray Train worker exits hard (os._exit, as a killed process would) in the middle of an
epoch: Ray restarts the run (FailureConfig) and the workers resume from the previous epoch's checkpoint, not from
step 0, and end where an uninterrupted run ends. A pipeline driver is SIGKILLed: `--resume` reuses what it
finished."""

from pathlib import Path

import numpy as np
import pytest
import torch

from moekd_ray import ray_runtime
from moekd_ray.config import load_config
from moekd_ray.models import load_model
from moekd_ray.recipes.distill import distill_student
from moekd_ray.recipes.experts import train_experts

TINY = '{"vocab_size": 300, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "ffn_size": 64, "max_length": 32}'


def arrays(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 300, size=(n, 32)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 0, 2
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


@pytest.fixture(scope="module")
def data():
    enc = {"train": arrays(96, 0), "valid": arrays(32, 1)}
    labels = {"train": (enc["train"]["input_ids"][:, 1] % 2).astype(np.int64),
              "valid": (enc["valid"]["input_ids"][:, 1] % 2).astype(np.int64)}
    return enc, labels


def config(tmp_path, *extra):
    return load_config(None, [f"output_dir={tmp_path}", "experts.k=1", f"experts.model={TINY}",
                              "experts.schedule.epochs=3", "experts.schedule.batch_size=16", f"distill.student_arch={TINY}",
                              "distill.schedule.epochs=3", "distill.schedule.batch_size=16", "ray.max_failures=1", *extra])


TOLERANCE = 1e-5  # weights, optimizer state and shuffle order are restored: equal up to float rounding


def assert_same_run(clean, faulty) -> None:
    """Same per-epoch training loss and the same final weights."""
    for a, b in zip(ray_runtime.epoch_rows(clean), ray_runtime.epoch_rows(faulty), strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=TOLERANCE)
    with clean.checkpoint.as_directory() as a, faulty.checkpoint.as_directory() as b:
        for pa, pb in zip(load_model(a).parameters(), load_model(b).parameters(), strict=True):
            assert torch.allclose(pa, pb, atol=TOLERANCE)


def test_killed_expert_worker_resumes_from_its_checkpoint(ray_cluster, data, tmp_path):
    enc, labels = data
    parts = np.zeros(len(labels["train"]), dtype=np.int64)
    clean = train_experts(config(tmp_path), [enc], labels, parts, tmp_path / "clean")[0][0]
    # 96 rows / 16 = 6 steps an epoch: step 9 is in the middle of epoch 2, before its checkpoint.
    faulty_cfg = config(tmp_path, "ray.fault_injection=expert_0:9")
    faulty = train_experts(faulty_cfg, [enc], labels, parts, tmp_path / "faulty")[0][0]

    marker = tmp_path / "faulty" / "ray" / "faulty-expert_0.fault_injected"
    assert marker.read_text() == "killed at step 9"  # the worker did die
    rows = ray_runtime.epoch_rows(faulty)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["resumed_from"] for r in rows] == [0, 1, 1]  # epochs 2-3 ran after a restart from epoch 1
    assert_same_run(clean, faulty)


def test_killed_distillation_worker_resumes_from_its_checkpoint(ray_cluster, data, tmp_path):
    """DeepSpeed ZeRO-2 on 2 workers: each rank's optimizer shard is in the checkpoint and restored."""
    enc, labels = data
    teacher = np.random.default_rng(0).dirichlet([1, 1], size=len(labels["train"])).astype(np.float32)

    def distill(name, *extra):
        run_dir = tmp_path / name
        run_dir.mkdir()
        cfg = config(tmp_path, "distill.zero_stage=2", "distill.resources.num_workers=2", *extra)
        return distill_student(cfg, enc, labels, teacher, run_dir)

    clean = distill("clean")
    # 96 rows over 2 workers, 16 a batch: 3 steps an epoch; step 5 is in the middle of epoch 2.
    faulty = distill("faulty", "ray.fault_injection=student:5")
    assert (tmp_path / "faulty" / "ray" / "faulty-student.fault_injected").read_text() == "killed at step 5"
    rows = ray_runtime.epoch_rows(faulty)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and [r["resumed_from"] for r in rows] == [0, 1, 1]
    assert_same_run(clean, faulty)


def test_killed_driver_resumes_without_retraining_experts(ray_cluster, tmp_path):
    """`moekd run`'s driver is SIGKILLed right after the experts stage; `moekd run --resume <folder>` reuses the
    tokenizers and experts (stage status and timing logged to the same MLflow run) and finishes the run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import mlflow
    import yaml

    from moekd_ray.recipes.pipeline import run_pipeline

    tiny = yaml.safe_load(TINY)
    tree = {"name": "killed", "output_dir": str(tmp_path / "runs"), "data": {"train_rows": 128, "eval_rows": 32},
            "experts": {"k": 2, "model": tiny, "schedule": {"epochs": 1, "batch_size": 16}},
            "router": {"epochs": 5}, "distill": {"student_arch": tiny, "schedule": {"epochs": 1, "batch_size": 16}},
            "ray": {"address": ray_cluster.get_runtime_context().gcs_address},
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "registered_model": None}}
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(tree))
    out = tmp_path / "driver.log"
    driver = subprocess.Popen([sys.executable, "-u", "-m", "moekd_ray.cli", "run", str(path)], start_new_session=True,
                              stdout=out.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while "== experts ran" not in out.read_text() and time.time() < deadline and driver.poll() is None:
            time.sleep(0.2)
        assert "== experts ran" in out.read_text(), out.read_text()[-3000:]
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    line = next(x for x in out.read_text().splitlines() if x.startswith("run folder "))
    folder, run_id = line.removeprefix("run folder ").split(", MLflow run ")
    experts = sorted((tmp_path / "runs").glob("*/ray/*-expert_*/checkpoint_*/model.safetensors"))
    assert len(experts) == 2 and not (Path(folder) / "student").exists()
    stamps = [p.stat().st_mtime_ns for p in experts]

    result = run_pipeline(load_config(path), log=lambda *_: None, resume=folder)
    assert result.run_id == run_id and (Path(folder) / "student" / "model.safetensors").is_file()
    assert [p.stat().st_mtime_ns for p in experts] == stamps  # the experts' checkpoints were not rewritten
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}").get_run(run_id)
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["moekd.stage.tokenizers"] == "reused" and tags["moekd.stage.experts"] == "reused"
    assert tags["moekd.stage.distill"] == "ran" and run.info.status == "FINISHED"
    assert metrics["seconds_experts"] < 20  # no Ray Train fit (each costs ~30 s here), only the logits pass


def test_tracking_server_lost_mid_run(tmp_path, monkeypatch):
    """A real MLflow server dies mid-run: one line that says how to continue, and after a restart on the same
    store everything logged before the outage is there and the run can be completed."""
    import mlflow

    from moekd_ray import tracking
    from moekd_ray.errors import TrackingError
    from servers import LOOPBACK, START_SERVER, end_group, free_port, start_group, wait_http

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries take minutes by default
    port = free_port()
    env = {"MOEKD_MLFLOW_DIR": str(tmp_path / "store"), "MLFLOW_PORT": str(port)}
    uri = f"http://{LOOPBACK}:{port}"

    def start(log):
        proc = start_group(["bash", str(START_SERVER)], tmp_path / log, **env)
        wait_http(f"{uri}/health", proc, tmp_path / log)
        return proc

    server = start("server1.log")
    try:
        tracking.connect(uri, "outage")
        with pytest.raises(TrackingError, match="stopped answering.*--resume"):
            with tracking.outage_guard("continue with `moekd run ... --resume`"), mlflow.start_run() as run:
                mlflow.log_metric("before", 1.0)
                end_group(server)
                mlflow.log_metric("after", 2.0)
    finally:
        end_group(server)
    server = start("server2.log")
    try:
        client = mlflow.MlflowClient(uri)
        assert client.get_run(run.info.run_id).data.metrics == {"before": 1.0}
        client.set_terminated(run.info.run_id)  # what `--resume` does at its end
        assert client.get_run(run.info.run_id).info.status == "FINISHED"
    finally:
        end_group(server)
