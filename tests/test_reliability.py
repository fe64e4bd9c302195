"""Failures for real. A Ray Train worker exits hard (os._exit, as a killed process would) in the middle of an
epoch: Ray restarts the run (FailureConfig) and the workers resume from the previous epoch's checkpoint, not from
step 0, and end where an uninterrupted run ends. A pipeline driver is SIGKILLed: `--resume` reuses what it
finished. A tracking server dies mid-run: the run trains on, spooling its MLflow writes, and `moekd sync` completes
its MLflow run, each write once even when the sync is killed and rerun."""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from moekd_ray import ray_runtime
from moekd_ray.config import load_config
from moekd_ray.models import load_model
from moekd_ray.stages.distill import distill_student
from moekd_ray.stages.experts import train_experts

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


def alive_pids(class_name: str) -> list[int]:
    """PIDs of this cluster's live Ray actors of a class (Ray's state API: never another cluster's processes; the
    address is explicit because other Ray clusters may run on this machine)."""
    import ray
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                       filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])]


def wait_for(condition, what: str, timeout_s: float = 300, poll_s: float = 0.005):
    """condition()'s first truthy value, polled every `poll_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"waited {timeout_s} s for {what}")


def reported(run_folder: Path) -> dict | None:
    """The metrics of a Ray Train run's latest checkpoint as its controller registered it (its snapshot file), with
    the checkpoint's folder name; None before the first."""
    try:
        latest = json.loads((run_folder / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (OSError, ValueError):  # not written yet, or being written
        return None
    return latest and {**latest["metrics"], "folder": latest["checkpoint_dir_name"]}


def checkpoint_folders(run_folder: Path) -> list[str]:
    # named by the time they were written (checkpoint_manager_snapshot.json is not one)
    return sorted(p.name for p in run_folder.glob("checkpoint_*") if p.is_dir())


def written(folder: Path, like: Path, epochs: int) -> bool:
    """Whether checkpoint `folder` is completely written: every file of checkpoint `like`, of the same size (same
    tensors), and a metrics history of `epochs` rows."""
    files = {p.relative_to(like): p.stat().st_size for p in like.rglob("*") if p.is_file()}
    history = Path(ray_runtime.HISTORY_FILE)
    try:
        same = all((folder / f).stat().st_size == size for f, size in files.items() if f != history)
        return same and len(json.loads((folder / history).read_text())) == epochs
    except (OSError, ValueError):
        return False


class WorkerKiller(threading.Thread):
    """SIGKILLs the one worker process of a Ray Train run from outside, by PID, while the run trains.

    The first kills land a seeded random time, up to one epoch (`epoch_s`), after the worker wrote a checkpoint:
    anywhere in the next epoch, its validation, its checkpoint write, or the window before Ray registers the report.
    The last kill lands between checkpoints being written and being reported: once all but the last two epochs are
    registered, the run's controller is paused (SIGSTOP: it takes no reports, as when it is slow to poll), the
    worker writes the last two epochs' checkpoints (its report queue holds one, so it then waits), and is killed;
    `at_window(run_folder)` runs then, and the controller goes on. After each kill Ray restarts the worker;
    `restarts` is the epoch each restart resumed from (the latest registered checkpoint)."""

    def __init__(self, run_folder: Path, epochs: int, random_kills: int, epoch_s: float, seed: int, at_window):
        super().__init__(daemon=True)
        self.run_folder, self.epochs, self.random_kills, self.epoch_s = run_folder, epochs, random_kills, epoch_s
        self.rng, self.at_window = random.Random(seed), at_window
        self.restarts, self.delays, self.unreported, self.error = [], [], [], None
        # Actors of earlier tests in this session's cluster may still be alive: never this run's.
        self.stale = set(alive_pids("RayTrainWorker")) | set(alive_pids("TrainController"))

    def workers(self) -> list[int]:
        return [p for p in alive_pids("RayTrainWorker") if p not in self.stale]

    def run(self):
        try:
            pid = wait_for(self.workers, "the worker")[0]
            for _ in range(self.random_kills):
                seen = checkpoint_folders(self.run_folder)
                wait_for(lambda: checkpoint_folders(self.run_folder) != seen, "a checkpoint")
                self.delays.append(self.rng.uniform(0, self.epoch_s))
                time.sleep(self.delays[-1])
                os.kill(pid, signal.SIGKILL)
                pid = self.restarted(pid)
            self.kill_between_write_and_report(pid)
            self.restarted(pid)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the test's thread)
            self.error = exc

    def kill_between_write_and_report(self, pid: int) -> None:
        controller = [p for p in alive_pids("TrainController") if p not in self.stale]
        assert len(controller) == 1, controller
        wait_for(lambda: (reported(self.run_folder) or {"epoch": 0})["epoch"] >= self.epochs - 2, "the reports")
        os.kill(controller[0], signal.SIGSTOP)
        try:
            registered = reported(self.run_folder)
            assert registered["epoch"] == self.epochs - 2, f"{registered['epoch']} epochs registered"
            newer = lambda: [f for f in checkpoint_folders(self.run_folder) if f > registered["folder"]]  # noqa: E731
            self.unreported = wait_for(lambda: len(newer()) >= 2 and newer(), "two unreported checkpoints")
            wait_for(lambda: written(self.run_folder / self.unreported[1], self.run_folder / registered["folder"],
                                     self.epochs), "the last checkpoint written")
            os.kill(pid, signal.SIGKILL)
            self.at_window(self.run_folder)
        finally:
            os.kill(controller[0], signal.SIGCONT)

    def restarted(self, old_pid: int) -> int:
        """The restarted worker's PID, once it is up; records the epoch it resumed from."""
        pid = wait_for(lambda: [p for p in self.workers() if p != old_pid], "a restarted worker", poll_s=0.1)[0]
        self.restarts.append((reported(self.run_folder) or {"epoch": 0})["epoch"])
        return pid


def test_worker_sigkilled_several_times_resumes_equal(ray_cluster, tmp_path):
    """An expert's worker is SIGKILLed from outside three times in one run (twice at seeded random points of an
    epoch, then with the last two epochs' checkpoints written but not reported): the run finishes with the same
    per-epoch losses and final weights as an uninterrupted run. A checkpoint written but not reported is never used:
    the restart resumes from the latest registered one and redoes the epochs after it, and a resumed pipeline does
    not take the unreported final epoch's checkpoint for a finished expert."""
    from moekd_ray.stages.context import finished_members

    enc = {"train": arrays(960, 0), "valid": arrays(32, 1)}  # 60 steps an epoch: long enough to land inside one
    labels = {s: (a["input_ids"][:, 1] % 2).astype(np.int64) for s, a in enc.items()}
    parts = np.zeros(len(labels["train"]), dtype=np.int64)
    epochs = 7
    cfg = config(tmp_path, f"experts.schedule.epochs={epochs}", "ray.max_failures=3")
    clean = train_experts(cfg, [enc], labels, parts, tmp_path / "clean")[0][0]
    ends = [r["finished_at"] for r in ray_runtime.epoch_rows(clean)]
    epoch_s = min(b - a for a, b in zip(ends, ends[1:]))

    run_folder = tmp_path / "faulty" / "ray" / "faulty-expert_0"
    at_window = []

    def nothing_finished(folder):  # the unreported checkpoints include the final epoch's, complete on disk
        newest = folder / checkpoint_folders(folder)[-1]
        at_window.append((json.loads((newest / ray_runtime.HISTORY_FILE).read_text())[-1]["final"],
                          finished_members(cfg, tmp_path / "faulty")))

    killer = WorkerKiller(run_folder, epochs, random_kills=2, epoch_s=epoch_s, seed=19, at_window=nothing_finished)
    killer.start()
    faulty = train_experts(cfg, [enc], labels, parts, tmp_path / "faulty")[0][0]
    killer.join(timeout=60)
    if killer.error:
        raise killer.error
    print(f"epoch {epoch_s:.2f} s; random kills {[f'{d:.2f}' for d in killer.delays]} s after a checkpoint; "
          f"restarts resumed from epochs {killer.restarts}")
    assert len(killer.restarts) == 3 and killer.restarts[-1] == epochs - 2  # the two written checkpoints: unused
    assert at_window == [(1, {})]
    rows = ray_runtime.epoch_rows(faulty)
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    # each epoch's row comes from the last restart that ran it
    assert [r["resumed_from"] for r in rows] == [max([0] + [s for s in killer.restarts if s < e])
                                                 for e in range(1, epochs + 1)]
    assert_same_run(clean, faulty)
    # the unreported checkpoints stay on disk; Ray's record (what a resumed pipeline reads) never names them
    assert set(killer.unreported) <= set(checkpoint_folders(run_folder))
    assert Path(ray_runtime.saved_result(run_folder).checkpoint.path).name == Path(faulty.checkpoint.path).name
    assert Path(faulty.checkpoint.path).name not in killer.unreported


@pytest.fixture
def drivers():
    """Starts `moekd` driver processes (each its own process group); any still running at the end is killed."""
    started = []

    def start(args: list[str], log: Path) -> subprocess.Popen:
        started.append(subprocess.Popen([sys.executable, "-u", "-m", "moekd_ray.cli", *args], start_new_session=True,
                                        stdout=log.open("w"), stderr=subprocess.STDOUT))
        return started[-1]

    yield start
    for driver in started:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()


def kill_driver_when(driver: subprocess.Popen, log: Path, condition, what: str) -> None:
    """Once `condition()` holds, SIGKILL the driver (its process group) and its Ray Train processes, frozen first
    (SIGSTOP) so that nothing moves on: Ray ends a dead driver's actors within about a second, time enough here for
    a tiny run to finish the epochs that make the kill "mid-stage"."""
    def met():
        if driver.poll() is not None:
            raise AssertionError(f"the driver ended before {what}:\n{log.read_text()[-3000:]}")
        pids = alive_pids("RayTrainWorker") + alive_pids("TrainController")
        return condition() and pids

    def signal_all(pids, sig):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    pids = []
    try:
        pids = wait_for(met, what, timeout_s=900, poll_s=0.01)
        signal_all(pids, signal.SIGSTOP)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        signal_all(pids, signal.SIGKILL)
    wait_for(lambda: not alive_pids("RayTrainWorker") and not alive_pids("TrainController"),
             "Ray to register the Ray Train processes' deaths", timeout_s=120, poll_s=0.1)


def run_folder_of(log: Path) -> tuple[Path, str]:
    line = wait_for(lambda: next((x for x in log.read_text().splitlines() if x.startswith("run folder ")), None),
                    "the run folder line", timeout_s=900, poll_s=0.1)
    folder, run_id = line.removeprefix("run folder ").split(", MLflow run ")
    return Path(folder), run_id.removesuffix(" (resumed)")


def test_driver_killed_mid_experts_and_mid_distillation_resumes(ray_cluster, drivers, tmp_path):
    """`moekd run`'s driver is SIGKILLed in the middle of the experts stage (one expert has finished, the other is
    between checkpoints), and its `--resume` in the middle of distillation (the student between checkpoints); a
    second `--resume` finishes the run on the same MLflow run. Reused: the tokenizers; the finished expert (its Ray
    Train run is not started again), then both experts; the soft targets. Resumed from the latest checkpoint Ray
    registered: the other expert's run, then the student's (the epochs after it are redone). Redone: encoding,
    partition, and what the interrupted stages had not finished."""
    import mlflow
    import yaml

    from moekd_ray.recipes.pipeline import run_pipeline

    tiny = yaml.safe_load(TINY)
    # Whichever expert finishes first, the other is caught between checkpoints (their starts can be seconds apart).
    experts_epochs, student_epochs = {"expert_0": 4, "expert_1": 8}, 4
    tree = {"name": "killed", "output_dir": str(tmp_path / "runs"), "data": {"train_rows": 128, "eval_rows": 32},
            "experts": {"k": 2, "model": tiny,
                        "schedules": [{"epochs": e, "batch_size": 8} for e in experts_epochs.values()]},
            "router": {"epochs": 5}, "distill": {"student_arch": tiny,
                                                 "schedule": {"epochs": student_epochs, "batch_size": 16}},
            "ray": {"address": ray_cluster.get_runtime_context().gcs_address},
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "registered_model": None}}
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(tree))

    # 1. killed in the middle of the experts stage
    log1 = tmp_path / "driver1.log"
    driver = drivers(["run", str(path)], log1)
    folder, run_id = run_folder_of(log1)
    runs = {name: folder / "ray" / f"{folder.name}-{name}" for name in ("expert_0", "expert_1", "student")}

    def one_finished_one_mid_run():
        states = [reported(runs[name]) for name in experts_epochs]
        return all(states) and sorted(s["final"] for s in states) == [0, 1]

    kill_driver_when(driver, log1, one_finished_one_mid_run, "an expert finished and the other mid-run")
    done, mid = sorted(experts_epochs, key=lambda name: -reported(runs[name])["final"])
    mid_at = reported(runs[mid])["epoch"]
    assert reported(runs[done])["final"] and 1 <= mid_at < experts_epochs[mid]
    assert "experts ran in" not in log1.read_text()
    finished_files = sorted(runs[done].rglob("*"))
    stamps_done = {p: p.stat().st_mtime_ns for p in finished_files}

    # 2. resumed, and killed in the middle of distillation
    log2 = tmp_path / "driver2.log"
    driver = drivers(["run", str(path), "--resume", str(folder)], log2)
    assert run_folder_of(log2) == (folder, run_id)
    student_mid_run = lambda: (r := reported(runs["student"])) and not r["final"]  # noqa: E731
    kill_driver_when(driver, log2, student_mid_run, "the student mid-run")
    student_at = reported(runs["student"])["epoch"]
    assert 1 <= student_at < student_epochs
    text = log2.read_text()
    assert f"{done} finished before the interruption (reused); training {mid}" in text, text[-3000:]
    assert "tokenizers reused in" in text and " experts ran in " in text
    assert sorted(runs[done].rglob("*")) == finished_files  # the finished expert: no new checkpoint, none rewritten
    assert {p: p.stat().st_mtime_ns for p in finished_files} == stamps_done
    mid_rows = ray_runtime.epoch_rows(ray_runtime.saved_result(runs[mid]))
    assert [r["resumed_from"] for r in mid_rows] == [0] * mid_at + [mid_at] * (experts_epochs[mid] - mid_at)
    experts = sorted(p for name in ("expert_0", "expert_1") for p in runs[name].rglob("*"))
    stamps = {p: p.stat().st_mtime_ns for p in experts}
    assert (folder / "soft_targets.safetensors").is_file() and not (folder / "student").exists()

    # 3. resumed again: finishes
    result = run_pipeline(load_config(path), log=lambda *_: None, resume=str(folder))
    assert result.run_id == run_id and (folder / "student" / "model.safetensors").is_file()
    assert {p: p.stat().st_mtime_ns for p in experts} == stamps  # neither expert's checkpoints rewritten
    rows = ray_runtime.epoch_rows(ray_runtime.saved_result(runs["student"]))
    assert [r["resumed_from"] for r in rows] == [0] * student_at + [student_at] * (student_epochs - student_at)

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    run = client.get_run(run_id)
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED" and tags["moekd.stage.tokenizers"] == "reused"
    assert tags["moekd.stage.experts"] == "reused" and tags["moekd.stage.router"] == "reused"
    assert tags["moekd.stage.distill"] == "ran"
    assert metrics["seconds_experts"] < 20  # no Ray Train fit (each costs ~20-30 s here)
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    finished = {r.info.run_name: r.info.run_id for r in children if r.info.status == "FINISHED"}

    def resumed_from(name):  # a Ray Train run's restart point is a tag of its MLflow run (its epochs are above)
        return next(r for r in children if r.info.run_id == finished[name]).data.tags["moekd.resumed_from"]

    # each expert logged once, by the driver that finished the stage; the student by the one that finished it
    assert sorted(r.info.run_name for r in children if r.info.run_name.startswith("expert_")) == ["expert_0", "expert_1"]
    assert resumed_from(done) == "0" and resumed_from(mid) == str(mid_rows[-1]["resumed_from"])
    assert resumed_from("distill") == str(rows[-1]["resumed_from"])

    # 4. the same config run once without interruption (another folder) ends with the same student
    tree.update(output_dir=str(tmp_path / "uninterrupted"))
    (tmp_path / "uninterrupted.yaml").write_text(yaml.safe_dump(tree))
    clean = run_pipeline(load_config(tmp_path / "uninterrupted.yaml"), log=lambda *_: None)
    resumed, uninterrupted = load_model(folder / "student").state_dict(), load_model(clean.run_dir / "student").state_dict()
    assert resumed.keys() == uninterrupted.keys()
    for name, weights in uninterrupted.items():
        torch.testing.assert_close(resumed[name], weights, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def spool_a_run(run_dir, log, experiment_id="0", student=None):
    """A parent run with one nested stage, written through a Tracker whose http server never answers: everything,
    the runs' creation included, goes to the run folder's spool; `student` (log_student_model's arguments) is logged
    into the parent last. Returns the spooled parent's local key."""
    import matplotlib.pyplot as plt

    from moekd_ray import tracking
    from servers import LOOPBACK, free_port

    uri = f"http://{LOOPBACK}:{free_port()}"  # nothing listens there
    mlflow.set_tracking_uri(uri)
    (run_dir / "tokenizers").mkdir(parents=True)
    (run_dir / "tokenizers" / "vocab.txt").write_text("artifact bytes stay in the run folder")
    (run_dir / "soft.bin").write_bytes(b"soft targets")
    tracker = tracking.Tracker(run_dir, experiment_id, log, uri)
    with tracker.run(None, "spooled") as run_id:
        tracker.set_tags({"moekd.run_dir": str(run_dir.resolve())})
        tracker.log_config({"experts": {"k": 2}})
        with tracker.stage("expert_0", {"hidden": 32}):
            tracker.log_epochs([{"epoch": 1, "train_loss": 0.7}, {"epoch": 2, "train_loss": 0.5}])
            tracker.log_artifact(run_dir / "tokenizers", "tokenizers")
        with tracker.stage("router"):
            tracker.log_artifact(run_dir / "soft.bin")
            tracker.log_dict([{"part": 0}], "partition.json")
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
        # the replayed parent, the replayed table and the version registered after the outage agree on the student
        table = json.loads(Path(client.download_artifacts(children["evaluate"].info.run_id, "results.json",
                                                          str(folder / "check"))).read_text())
        student = next(r for r in (table["data"] if isinstance(table, dict) else table) if r["model"] == "student")
        assert parent.data.metrics["student_test_f1"] == pytest.approx(student["test_f1"])
        assert float(client.get_model_version("outage-student", "1").tags["metric.test_f1"]) == \
            pytest.approx(student["test_f1"], abs=1e-5)
        assert {"tokenizers", "partition", "expert_0", "expert_1", "router", "distill", "evaluate"} <= set(children)
        assert all(r.info.status == "FINISHED" for r in children.values())
        assert len(client.get_metric_history(children["distill"].info.run_id, "train_loss")) == 2
        assert {"model_comparison.png", "results.json"} <= {
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
