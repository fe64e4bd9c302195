"""A tiny search through real Ray Tune (ASHA), real Ray Train + DeepSpeed per trial and a real MLflow store,
starting from the tiny pipeline run's cached experts; 4 trials run at once against one SQLite store."""

import mlflow
import pandas as pd
import pytest

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
    return tune_cfg, run_search(tune_cfg, log=lambda *_: None)


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
    cfg, result = search
    client, trials = trial_runs(cfg, result)
    spans = []
    for run in trials:
        history = client.get_metric_history(run.info.run_id, "val_loss")
        end = max(m.timestamp for m in history) / 1000
        spans.append((end - run.data.metrics["trial_seconds"], end))
    overlapping = sum(1 for a in spans for b in spans if a is not b and a[0] < b[1] and b[0] < a[1])
    assert overlapping > 0, spans


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
