"""A tiny search through real Ray Tune (ASHA), real Ray Train + DeepSpeed per trial and a real MLflow store,
starting from the tiny pipeline run's cached experts; 4 trials run at once against one SQLite store."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import ray
from conftest import wait_until_idle

from moekd_ray.cli import main
from moekd_ray.recipes.tune import run_search


@pytest.fixture(scope="module")
def search(tiny_pipeline):
    cfg, pipeline = tiny_pipeline
    tree = cfg.model_dump(mode="json")
    tree["name"] = "tiny-search"
    tree["distill"]["schedule"]["epochs"] = 3
    # 4 trials at once on 2 CPUs: 4 x (0.45 worker + 0.01 trainable) <= 2.
    tree["distill"]["resources"] = {"num_workers": 1, "cpus_per_worker": 0.45}
    tree["tune"] = {
        "from_run": pipeline.run_id, "num_samples": 4, "max_concurrent": 4, "metric": "val_loss",
        "grace_period": 1, "reduction_factor": 2,
        "space": {"router.temperature": {"dist": "loguniform", "low": 0.5, "high": 2.0},
                  "distill.temperature": {"dist": "choice", "values": [1, 4]},
                  "distill.schedule.lr": {"dist": "loguniform", "low": 1e-4, "high": 1e-2}},
    }
    tune_cfg = type(cfg).model_validate(tree)
    wait_until_idle(ray)
    result = run_search(tune_cfg, log=lambda *_: None)
    wait_until_idle(ray)  # ASHA's stopped trials gave their workers' CPUs back
    return tune_cfg, result


def trial_runs(cfg, result):
    client = mlflow.tracking.MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id
    return client, client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")


def test_every_trial_has_a_nested_run_with_params_and_epochs(search):
    cfg, result = search
    client, trials = trial_runs(cfg, result)
    assert len(trials) == 4
    epochs = []
    for run in trials:
        assert {"router.temperature", "distill.temperature", "distill.schedule.lr"} <= set(run.data.params)
        epochs.append(len(client.get_metric_history(run.info.run_id, "val_loss")))
    assert max(epochs) == 3
    assert min(epochs) < 3, f"ASHA stopped no trial early: epochs per trial {epochs}"


def test_trials_ran_concurrently(search):
    """Epoch metrics carry the time Tune received them, so a trial ran from (last report - trial_seconds) to its
    last report; all 4 trials fit at once (4 x 0.46 CPU <= 2) and start together, before ASHA's first rung."""
    cfg, result = search
    client, trials = trial_runs(cfg, result)
    spans = []
    for run in trials:
        history = client.get_metric_history(run.info.run_id, "val_loss")
        end = max(m.timestamp for m in history) / 1000
        spans.append((end - run.data.metrics["trial_seconds"], end))
    # Report times are whole seconds: a trial counts as running at another's start within 1 s of its own span.
    at_once = max(sum(1 for s, e in spans if s - 1 <= start < e + 1) for start, _ in spans)
    assert at_once == 4, spans
    parent = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert "search_T_vs_metric.png" in parent


NAMES = ["len", "count", "size", "idx", "pos", "val", "tmp", "res", "cur", "off", "num", "end"]


def keyed_functions(n: int, seed: int) -> list[dict]:
    """Vulnerable exactly when the buffer parameter is called `buf`: a student that learns this keys on a name,
    so renaming it flips the student (the tiny Devign students predict one class whatever the input: ASR 0)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b, c = rng.choice(NAMES, 3, replace=False)
        key = "buf" if i % 2 == 0 else str(rng.choice(["dst", "out", "data"]))
        rows.append({"target": int(key == "buf"), "func": f"int f{i}(char *{key}, int {a}) {{\n  int {b} = {a} + "
                     f"{rng.integers(9)};\n  int {c};\n  for ({c} = 0; {c} < {b}; {c}++) {key}[{c}] = {a};\n"
                     f"  return {b};\n}}"})
    return rows


@pytest.fixture(scope="module")
def robust_search(tiny_pipeline, tmp_path_factory):
    """The robust objective on a tiny pipeline run over keyed functions: 3 epochs, ASHA on val_f1 at epoch 2,
    each trial that finishes attacked by MHM on the same 8 validation functions (10 queries each). lr 3e-3 learns
    the key by epoch 2 (so it can be flipped), 1e-4 does not (and ASHA stops it, or it predicts one class)."""
    from moekd_ray.recipes.pipeline import run_pipeline

    cfg, _ = tiny_pipeline
    tmp = tmp_path_factory.mktemp("keyed")
    for split, n, seed in (("train", 256, 0), ("valid", 48, 1), ("test", 48, 2)):
        (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keyed_functions(n, seed)))
    tree = cfg.model_dump(mode="json")
    tree.update(name="tiny-keyed", output_dir=str(tmp / "runs"))
    tree["data"] = {"dir": str(tmp)}
    # Constant rates and last-epoch weights: students that key on the identifier fast, so the attack can flip them.
    constant = {"warmup_ratio": 0.0, "decay": "none", "keep_best_by": "last"}
    tree["experts"]["schedule"].update(epochs=4, lr=3e-3, **constant)
    wait_until_idle(ray)
    pipeline = run_pipeline(type(cfg).model_validate(tree), log=lambda *_: None)
    tree["distill"]["schedule"].update(epochs=3, batch_size=4, **constant)
    tree["distill"]["resources"] = {"num_workers": 1, "cpus_per_worker": 0.45}
    tree["attack"].update(method="mhm", query_budget=10, candidates=4, vocab_rows=200)
    tree["tune"] = {
        "from_run": pipeline.run_id, "num_samples": 4, "max_concurrent": 4, "metric": "robust_f1",
        "robustness_weight": 0.5, "attack_n": 8, "grace_period": 2, "reduction_factor": 2, "register_best": False,
        "space": {"distill.schedule.lr": {"dist": "choice", "values": [1e-4, 3e-3]},
                  "distill.temperature": {"dist": "choice", "values": [1, 4]}},
    }
    tune_cfg = type(cfg).model_validate(tree)
    result = run_search(tune_cfg, log=lambda *_: None)
    wait_until_idle(ray)
    return tune_cfg, result


def test_robust_objective_is_val_f1_minus_weighted_asr_and_ranks_trials(robust_search):
    cfg, result = robust_search
    client, trials = trial_runs(cfg, result)
    assert len(trials) == 4
    objectives = []
    for run in trials:
        m = run.data.metrics
        epochs = len(client.get_metric_history(run.info.run_id, "val_f1"))
        if epochs < cfg.distill.schedule.epochs:  # stopped by ASHA: never attacked, so no objective
            assert "objective" not in m and "asr" not in m
            continue
        assert 0 <= m["asr"] <= 1 and m["asr_seconds"] > 0 and m["asr_attacked"] <= 8
        assert m["objective"] == m["val_f1"] - 0.5 * m["asr"]  # exactly: the last epoch's val_f1
        objectives.append((m["objective"], m["asr"]))
    assert any(asr > 0 for _, asr in objectives), f"no student was flipped: {objectives}"
    best = max(o for o, _ in objectives)
    assert result.best_metrics["objective"] == best
    parent = client.get_run(result.parent_run_id).data.metrics
    assert parent["best.objective"] == best and parent["best.asr"] == result.best_metrics["asr"]


@pytest.mark.parametrize("overrides, words", [
    (["tune.robustness_weight=0.5"], ["tune:", "robustness_weight", "robust_f1"]),
    (["tune.attack_n=10"], ["tune:", "attack_n", "robust_f1"]),
    (["tune.metric=robust_f1"], ["tune:", "robust_f1 needs robustness_weight"]),
    (["tune.metric=robust_f1", "tune.robustness_weight=0"], ["tune.robustness_weight", "greater than 0"]),
])
def test_bad_robust_objective_is_one_line(tmp_path, capsys, overrides, words):
    path = tmp_path / "tune.yaml"
    path.write_text("name: x\n")
    assert main(["validate", str(path), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moekd: error:")
    assert all(w in err for w in words), err


def test_best_student_is_registered_and_loads(search):
    cfg, result = search
    name, version = result.model_uri.removeprefix("models:/").split("/")
    mv = mlflow.MlflowClient(cfg.mlflow.tracking_uri).get_model_version(name, version)
    assert mv.tags["moekd.search_run_id"] == result.parent_run_id
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    probs = mlflow.pyfunc.load_model(result.model_uri).predict(pd.DataFrame({"func": ["int f(void) { return 0; }"]}))
    assert 0 < probs["probability"][0] < 1
    assert set(result.best_values) == {"router.temperature", "distill.temperature", "distill.schedule.lr"}
    assert result.best_metrics["size_mb"] > 0


def test_registered_student_is_the_best_trials(search):
    """The best trial by the search's metric (val_loss at each trial's last reported epoch, lowest wins; a trial
    ASHA stopped counts with its last epoch), read back from the trials' MLflow runs, is the one whose values the
    search reports and the registered version was configured with."""
    cfg, result = search
    client, trials = trial_runs(cfg, result)
    last = {}
    for run in trials:
        history = client.get_metric_history(run.info.run_id, "val_loss")
        last[run.info.run_id] = max(history, key=lambda m: m.step).value
    ranked = sorted(trials, key=lambda r: last[r.info.run_id])
    best = ranked[0]
    assert last[best.info.run_id] < last[ranked[1].info.run_id], last  # one best trial, not a tie
    for key, value in result.best_values.items():
        assert float(best.data.params[key]) == pytest.approx(float(value)), (key, best.data.params, last)
    accuracy = max(client.get_metric_history(best.info.run_id, "val_accuracy"), key=lambda m: m.step).value
    assert result.best_metrics["val_accuracy"] == pytest.approx(accuracy)
    # The registered model's own config holds the best trial's values.
    import yaml

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    from pathlib import Path

    folder = Path(mlflow.artifacts.download_artifacts(result.model_uri))
    registered = yaml.safe_load((folder / "artifacts" / "config.yaml").read_text())
    for key, value in result.best_values.items():
        section, *rest = key.split(".")
        node = registered[section]
        for part in rest:
            node = node[part]
        assert node == pytest.approx(value), key


@pytest.mark.parametrize("space, words", [
    ('{"distill.alpha": {"dist": "gauss", "low": 0, "high": 1}}', ["distill.alpha", "gauss"]),
    ('{"distill.alpha": {"dist": "uniform", "low": 0.9, "high": 0.1}}', ["low=0.9", "high=0.1"]),
    ('{"distill.temperature": {"dist": "choice", "values": [0, 2]}}', ["distill.temperature", "0"]),
    ('{"experts.k": {"dist": "choice", "values": [2, 3]}}', ["experts.k", "cannot be tuned"]),
])
def test_bad_search_space_is_one_line(tmp_path, capsys, space, words):
    path = tmp_path / "tune.yaml"
    path.write_text("name: x\n")
    assert main(["validate", str(path), f"tune.space={space}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moekd: error:")
    assert all(w in err for w in words), err


def test_killed_search_resumes_without_rerunning_finished_trials(tiny_pipeline, ray_cluster, tmp_path):
    """The driver of a real `moekd tune` is SIGKILLed after its first trial finished; `--resume` completes the
    search from Tune's experiment state and keeps the finished trial's result (it is not run again). Under ASHA, the
    default scheduler, whose state (its rungs' recorded results) is restored with the experiment."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from moekd_ray.config import load_config

    cfg, pipeline = tiny_pipeline
    tree = cfg.model_dump(mode="json")
    tree.update(name="tiny-resume", output_dir=str(tmp_path / "runs"))
    tree["ray"]["address"] = ray_cluster.get_runtime_context().gcs_address  # the driver joins this test's cluster
    tree["distill"]["schedule"]["epochs"] = 1
    tree["distill"]["resources"] = {"num_workers": 1, "cpus_per_worker": 0.45}
    tree["tune"] = {"from_run": pipeline.run_id, "num_samples": 3, "max_concurrent": 1, "scheduler": "asha",
                    "register_best": False, "space": {"distill.temperature": {"dist": "choice", "values": [1, 2, 4]}}}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(tree))
    tune_cfg = load_config(path)
    search_dir = tmp_path / "runs" / "tune" / f"tune-{tune_cfg.name}-{tune_cfg.digest()}"

    wait_until_idle(ray_cluster)

    def finished_trials():
        return [p for p in search_dir.glob("run_trial_*/result.json") if p.stat().st_size > 0]

    driver = subprocess.Popen([sys.executable, "-m", "moekd_ray.cli", "tune", str(path)], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not finished_trials() and time.time() < deadline and driver.poll() is None:
            time.sleep(1)
        assert finished_trials(), "no trial finished before the deadline"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    first = finished_trials()
    assert len(first) < 3, "the search finished before it could be interrupted"
    before = {p: p.read_text() for p in first}

    result = run_search(tune_cfg, resume=True, log=lambda *_: None)
    assert len(finished_trials()) == 3
    for p, text in before.items():  # a rerun trial would have rewritten its result file
        assert p.read_text() == text
    assert len(trial_runs(tune_cfg, result)[1]) == 3  # one nested MLflow run per trial, logged once
