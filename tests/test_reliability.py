"""Failures for real. A Ray Train worker exits hard (os._exit, as a killed process would) in the middle of an
epoch: Ray restarts the run (FailureConfig) and the workers resume from the previous epoch's checkpoint, not from
step 0, and end where an uninterrupted run ends. A pipeline driver is SIGKILLed: `--resume` reuses what it
finished. A tracking server dies mid-run: the run trains on, spooling its MLflow writes, and `moekd sync` completes
its MLflow run, each write once even when the sync is killed and rerun."""

from pathlib import Path

import mlflow
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
                              "distill.schedule.epochs=3", "distill.schedule.batch_size=16", "ray.max_failures=1",
                              # the last epoch's weights are what gets compared (the best epoch could be one from
                              # before the failure)
                              "experts.schedule.keep_best_by=last", "distill.schedule.keep_best_by=last", *extra])


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
        while "] experts ran in " not in out.read_text() and time.time() < deadline and driver.poll() is None:
            time.sleep(0.2)
        assert "] experts ran in " in out.read_text(), out.read_text()[-3000:]
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


def spool_a_run(run_dir, log, experiment_id="0", student=None):
    """A parent run with one nested stage, written through a Tracker whose http server never answers: everything,
    the runs' creation included, goes to the run folder's spool; `student` (log_student_model's arguments) is logged
    into the parent last. Returns the spooled parent's local key."""
    import matplotlib.pyplot as plt

    from moekd_ray import tracking
    from servers import LOOPBACK, free_port

    mlflow.set_tracking_uri(f"http://{LOOPBACK}:{free_port()}")  # nothing listens there
    (run_dir / "tokenizers").mkdir(parents=True)
    (run_dir / "tokenizers" / "vocab.txt").write_text("artifact bytes stay in the run folder")
    (run_dir / "soft.bin").write_bytes(b"soft targets")
    tracker = tracking.Tracker(run_dir, experiment_id, log)
    with tracker.run(None, "spooled") as run_id:
        tracker.set_tags({"moekd.run_dir": str(run_dir.resolve())})
        tracker.log_config({"experts": {"k": 2}})
        with tracker.stage("expert_0", {"hidden": 32}):
            tracker.log_epochs([{"epoch": 1, "train_loss": 0.7}, {"epoch": 2, "train_loss": 0.5}])
            tracker.log_artifact(run_dir / "tokenizers", "tokenizers")
        with tracker.stage("router"):
            tracker.log_artifact(run_dir / "soft.bin")
            tracker.log_table([{"part": 0}], "partition.json")
            tracker.log_figure(plt.figure(), "confusion.png")
        tracker.log_metrics({"student.test_f1": 0.5})
        if student:
            tracker.log_student_model(*student)
    return run_id


@pytest.fixture
def restore_tracking_uri(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries take minutes by default
    uri = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(uri)


def test_writes_spooled_in_an_outage_are_replayed_once(tmp_path, restore_tracking_uri, monkeypatch, capsys):
    """Spooled writes reference artifacts by path, and `moekd sync` creates the runs and replays every write; a
    replay cut short continues where it stopped, and a second sync adds nothing."""
    from moekd_ray import tracking
    from moekd_ray.cli import main

    run_dir, lines = tmp_path / "run", []
    key = spool_a_run(run_dir, lines.append)
    assert key.startswith("local-") and len(lines) == 2
    assert "stopped answering" in lines[0] and f"moekd sync {run_dir.resolve()}" in lines[1]
    spool = (run_dir / tracking.SPOOL).read_text()
    assert "artifact bytes" not in spool and '"path": "tokenizers"' in spool
    (run_dir / "config.yaml").write_text(f"mlflow:\n  tracking_uri: sqlite:///{tmp_path / 'mlruns.db'}\n")

    applied, real_apply = [], tracking._apply

    def server_gone_after_five(client, op, ids, folder, **kw):
        if len(applied) == 5:
            raise mlflow.exceptions.MlflowException("the store went away")
        applied.append(op["op"])
        return real_apply(client, op, ids, folder, **kw)

    monkeypatch.setattr(tracking, "_apply", server_gone_after_five)
    with pytest.raises(mlflow.exceptions.MlflowException):
        main(["sync", str(run_dir)])
    monkeypatch.setattr(tracking, "_apply", real_apply)
    assert main(["sync", str(run_dir)]) == 0  # continues after the 5 writes already replayed
    assert "replayed" in capsys.readouterr().out and not (run_dir / tracking.SPOOL).exists()

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = {r.info.run_name: r for r in client.search_runs(["0"])}
    assert sorted(runs) == ["expert_0", "router", "spooled"]  # each run created once
    parent = runs["spooled"]
    assert parent.info.status == "FINISHED" and parent.data.metrics == {"student.test_f1": 0.5}
    assert parent.data.params == {"experts.k": "2"} and parent.data.tags["moekd.run_dir"] == str(run_dir.resolve())
    for name in ("expert_0", "router"):
        assert runs[name].data.tags["mlflow.parentRunId"] == parent.info.run_id
    history = client.get_metric_history(runs["expert_0"].info.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.7), (2, 0.5)]
    assert runs["expert_0"].data.params == {"hidden": "32"}
    assert [a.path for a in client.list_artifacts(runs["expert_0"].info.run_id, "tokenizers")] == ["tokenizers/vocab.txt"]
    assert {a.path for a in client.list_artifacts(runs["router"].info.run_id)} == {
        "soft.bin", "partition.json", "confusion.png"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"config.yaml"}

    assert main(["sync", str(run_dir)]) == 0
    assert "nothing to replay" in capsys.readouterr().out
    assert main(["sync", str(tmp_path)]) == 2 and "not a `moekd run` folder" in capsys.readouterr().err
    assert len(client.search_runs(["0"])) == 3
    assert len(client.get_metric_history(runs["expert_0"].info.run_id, "train_loss")) == 2


def test_resume_replays_a_pending_spool_first(tmp_path, restore_tracking_uri):
    """`moekd run --resume <folder>` of a run whose parent was created during an outage finds it after the replay."""
    from moekd_ray.config import dump_yaml
    from moekd_ray.recipes.pipeline import resume_target

    run_dir, lines = tmp_path / "run", []
    spool_a_run(run_dir, lambda _: None)
    cfg = load_config(None, [f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}"])
    (run_dir / "config.yaml").write_text(dump_yaml(cfg.model_dump(mode="json")))
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    writes = len((run_dir / "mlflow_spool.jsonl").read_text().splitlines()) - 1  # less the spool's header line
    folder, run_id = resume_target(cfg, str(run_dir), lines.append)
    assert folder == run_dir.resolve() and f"replayed {writes} MLflow writes" in lines[0]
    assert mlflow.MlflowClient().get_run(run_id).info.run_name == "spooled"


def test_tracking_server_lost_mid_run(ray_cluster, tmp_path):
    """A real MLflow server dies after the experts stage of `moekd run`: the run trains on and finishes (exit 0),
    spooling its MLflow writes, and says so in one line with the command that completes the run. After a restart on
    the same store, `moekd sync` adds the student's metrics, the stage runs created meanwhile and the registered
    model to the same MLflow run, and changes nothing logged before the outage; a second sync adds nothing."""
    import os
    import subprocess
    import sys
    import time

    import yaml

    from servers import LOOPBACK, START_SERVER, end_group, free_port, start_group, wait_http

    port = free_port()
    env = {"MOEKD_MLFLOW_DIR": str(tmp_path / "store"), "MLFLOW_PORT": str(port)}
    uri = f"http://{LOOPBACK}:{port}"

    def start(log):
        proc = start_group(["bash", str(START_SERVER)], tmp_path / log, **env)
        wait_http(f"{uri}/health", proc, tmp_path / log)
        return proc

    def moekd(*args, **kw):
        return subprocess.run([sys.executable, "-u", "-m", "moekd_ray.cli", *args], capture_output=True, text=True,
                              env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}, timeout=600, **kw)

    tiny = yaml.safe_load(TINY)
    tree = {"name": "outage", "output_dir": str(tmp_path / "runs"), "data": {"train_rows": 128, "eval_rows": 32},
            "experts": {"k": 2, "model": tiny, "schedule": {"epochs": 1, "batch_size": 16}},
            "router": {"epochs": 5}, "distill": {"student_arch": tiny, "schedule": {"epochs": 2, "batch_size": 16}},
            "ray": {"address": ray_cluster.get_runtime_context().gcs_address},
            "mlflow": {"tracking_uri": uri, "experiment": "outage", "registered_model": "outage-student"}}
    path = tmp_path / "outage.yaml"
    path.write_text(yaml.safe_dump(tree))
    out = tmp_path / "driver.log"
    server = start("server1.log")
    try:
        driver = subprocess.Popen([sys.executable, "-u", "-m", "moekd_ray.cli", "run", str(path)],
                                  env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
                                  stdout=out.open("w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while "] experts ran in " not in out.read_text() and time.time() < deadline and driver.poll() is None:
            time.sleep(0.2)
        if "] experts ran in " not in out.read_text():
            driver.kill()
            pytest.fail(out.read_text()[-3000:])
    finally:
        end_group(server)
    assert driver.wait(timeout=600) == 0, out.read_text()[-3000:]
    text = out.read_text()
    folder, run_id = next(x for x in text.splitlines() if x.startswith("run folder ")).removeprefix(
        "run folder ").split(", MLflow run ")
    folder = Path(folder).resolve()
    assert (folder / "student" / "model.safetensors").is_file() and (folder / "mlflow_spool.jsonl").is_file()
    assert text.count("stopped answering") == 1, text[-3000:]
    summary = [x for x in text.splitlines() if "was unreachable" in x]
    assert len(summary) == 1 and summary[0].endswith(f"moekd sync {folder}") and f"run {run_id}" in summary[0]

    server = start("server2.log")
    try:
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name("outage").experiment_id

        def snapshot():
            runs = client.search_runs([experiment])
            return {r.info.run_id: (r.info.run_name, r.data.params, {k: [(m.step, m.value, m.timestamp) for m in
                    client.get_metric_history(r.info.run_id, k)] for k in r.data.metrics}) for r in runs}

        before = snapshot()
        names = {name for name, _, _ in before.values()}
        assert {"expert_0", "expert_1"} <= names and "evaluate" not in names  # the evaluate run: spooled
        assert "seconds_register" not in before[run_id][2] and not client.search_registered_models()
        sync = moekd("sync", str(folder))
        assert sync.returncode == 0 and "replayed" in sync.stdout, sync.stdout + sync.stderr
        after = snapshot()
        for rid, (name, params, metrics) in before.items():  # nothing logged before the outage changed
            # (a stage run created just before the server died may gain the params spooled after its creation)
            assert after[rid][0] == name and after[rid][1].items() >= params.items()
            assert all(after[rid][2][k] == history for k, history in metrics.items()), name
        parent = client.get_run(run_id)
        assert parent.info.status == "FINISHED" and parent.data.tags["moekd.stage.distill"] == "ran"
        assert "seconds_register" in parent.data.metrics
        children = {r.info.run_name: r for r in client.search_runs(
            [experiment], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")}
        assert 0 <= parent.data.metrics["student_test_f1"] <= 1
        assert {"tokenizers", "partition", "expert_0", "expert_1", "router", "distill", "evaluate"} <= set(children)
        assert all(r.info.status == "FINISHED" for r in children.values())
        assert len(client.get_metric_history(children["distill"].info.run_id, "train_loss")) == 2
        assert {"confusion_student_test.png", "results.json"} <= {
            a.path for a in client.list_artifacts(children["evaluate"].info.run_id)}
        version = client.get_model_version("outage-student", "1")
        assert version.run_id == run_id and version.tags["moekd.source_run"] == run_id

        again = moekd("sync", str(folder))
        assert again.returncode == 0 and "nothing to replay" in again.stdout, again.stdout + again.stderr
        assert snapshot() == after and len(client.search_model_versions("name = 'outage-student'")) == 1
    finally:
        end_group(server)


# `moekd sync` that dies hard (os._exit, as a SIGKILL would leave it) at one point of the replay: after applying
# spool line N and before saving its progress, or inside the student's write (before / right after registering it).
SYNC_THAT_DIES = """
import json, os, sys
import mlflow
from moekd_ray import tracking
from moekd_ray.cli import main

folder, uri, at = sys.argv[1:]
apply, register = tracking._apply, mlflow.register_model
if at.isdigit():
    line = json.loads((tracking.Path(folder) / tracking.SPOOL).read_text().splitlines()[int(at)])

    def apply_then_die(client, op, *args, **kw):
        out = apply(client, op, *args, **kw)
        if op == line:
            os._exit(9)
        return out

    tracking._apply = apply_then_die
elif at == "before-register":
    mlflow.register_model = lambda *a, **kw: os._exit(9)
else:  # after-register: the version exists, its evidence tags do not
    mlflow.register_model = lambda *a, **kw: (register(*a, **kw), os._exit(9))
sys.exit(main(["sync", folder, "--tracking-uri", uri]))
"""


def mlflow_state(client, experiment_id: str, model_name: str) -> dict:
    """What a replay leaves in MLflow, comparable between two spools of the same writes: run ids (in tags too) as
    run names, the spool keys and run folders left out, metric histories as (step, value) lists."""
    runs = client.search_runs([experiment_id])
    names = {r.info.run_id: r.info.run_name for r in runs}

    def artifacts(run_id, path=None):
        return sorted(x for a in client.list_artifacts(run_id, path)
                      for x in (artifacts(run_id, a.path) if a.is_dir else [a.path]))

    def tags(tags):
        return {k: names.get(v, v) for k, v in tags.items() if k not in ("moekd.spool_key", "moekd.run_dir")}

    return {
        "runs": sorted((r.info.run_name, r.info.status, r.data.params, tags(r.data.tags), artifacts(r.info.run_id),
                        {k: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)]
                         for k in r.data.metrics}) for r in runs),
        "versions": [(v.version, names.get(v.run_id), tags(v.tags))
                     for v in client.search_model_versions(f"name = '{model_name}'")],
        "logged models": len(client.search_logged_models([experiment_id])),
    }


def test_replay_killed_anywhere_applies_each_write_once(tmp_path, restore_tracking_uri):
    """`moekd sync` is killed after applying a run creation, params, metrics, an artifact folder and the student's
    write, each before its progress is saved, and inside the student's write before and after registering it; a
    sync after each kill continues. Against a real `mlflow server`, the end state equals that of an uninterrupted
    replay of the same writes: no run created twice, no metric point twice, one logged student, one version."""
    import json
    import os
    import subprocess
    import sys

    from moekd_ray import tracking
    from moekd_ray.cli import main
    from servers import LOOPBACK, ROOT, START_SERVER, end_group, free_port, save_tiny_student, start_group, wait_http

    port = free_port()
    uri = f"http://{LOOPBACK}:{port}"
    server = start_group(["bash", str(START_SERVER)], tmp_path / "server.log",
                         MOEKD_MLFLOW_DIR=str(tmp_path / "store"), MLFLOW_PORT=str(port))
    try:
        wait_http(f"{uri}/health", server, tmp_path / "server.log")
        client = mlflow.MlflowClient(uri)
        student = save_tiny_student(tmp_path / "student")
        cfg = load_config(None, []).model_dump(mode="json")
        folders = {}
        for name in ("clean", "killed"):  # the same writes, spooled in an outage, for two experiments
            folders[name] = tmp_path / name
            experiment = client.create_experiment(name)
            spool_a_run(folders[name], lambda _: None, experiment, (*student, cfg, f"{name}-student", {"f1": 0.5}))
            (folders[name] / "config.yaml").write_text(f"mlflow:\n  tracking_uri: {uri}\n")

        assert main(["sync", str(folders["clean"])]) == 0
        lines = [json.loads(x) for x in (folders["killed"] / tracking.SPOOL).read_text().splitlines()]
        first = {kind: next(n for n, op in enumerate(lines) if op["op"] == kind and (
            kind != "artifact" or op["path"] == "tokenizers")) for kind in ("create", "params", "metrics", "artifact")}
        model = next(n for n, op in enumerate(lines) if op["op"] == "model")
        progress = folders["killed"] / "mlflow_spool.progress.json"
        for at in [*sorted(first.values()), "before-register", "after-register", model]:
            died = subprocess.run([sys.executable, "-c", SYNC_THAT_DIES, str(folders["killed"]), uri, str(at)],
                                  cwd=ROOT, capture_output=True, text=True, timeout=600,
                                  env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
            assert died.returncode == 9, (at, died.stdout + died.stderr[-3000:])
            # the write it died in is the next one to replay
            assert json.loads(progress.read_text())["done"] == (at if isinstance(at, int) else model), at
        assert main(["sync", str(folders["killed"])]) == 0

        clean, killed = (mlflow_state(client, client.get_experiment_by_name(name).experiment_id, f"{name}-student")
                         for name in ("clean", "killed"))
        assert len(clean["runs"]) == 3 and len(clean["versions"]) == 1 and clean["logged models"] == 1
        assert killed == clean
    finally:
        end_group(server)


def test_replay_killed_after_a_metrics_write_logs_no_point_twice(tmp_path, restore_tracking_uri, monkeypatch):
    """A folder store (mlflow.tracking_uri may be one) keeps a point logged twice as two points, where a database
    store drops the second: a sync killed right after a metrics write, rerun, must not log it again."""
    import json
    import os
    import subprocess
    import sys

    from moekd_ray import tracking
    from moekd_ray.cli import main
    from servers import ROOT

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a folder store without it
    store, run_dir = f"file://{tmp_path / 'mlruns'}", tmp_path / "run"
    spool_a_run(run_dir, lambda _: None)
    (run_dir / "config.yaml").write_text(f"mlflow:\n  tracking_uri: {store}\n")
    lines = [json.loads(x) for x in (run_dir / tracking.SPOOL).read_text().splitlines()]
    at = next(n for n, op in enumerate(lines) if op["op"] == "metrics")
    died = subprocess.run([sys.executable, "-c", SYNC_THAT_DIES, str(run_dir), store, str(at)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert died.returncode == 9, died.stdout + died.stderr[-3000:]
    assert main(["sync", str(run_dir)]) == 0

    client = mlflow.MlflowClient(store)
    expert = client.search_runs(["0"], "attributes.run_name = 'expert_0'")
    assert len(expert) == 1
    history = client.get_metric_history(expert[0].info.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.7), (2, 0.5)]
