"""Learning is pinned where the answer is known: on synthetic C functions whose label is in the code (an unbounded
string copy vs a bounded one, tests/synthetic.py), every model the pipeline makes must learn it. Real Ray Train
(three expert families: the n-gram bag, the syntax graph and an encoder, cross-fitted in 2 folds), DeepSpeed ZeRO-2
and MLflow; the student is scored as a user would, through the registered pyfunc."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from synthetic import rows, write_dataset

GRAPH = {"source": "graph", "buckets": 4096, "dim": 16, "rounds": 3, "max_length": 256}
ENCODER = {"vocab_size": 400, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "ffn_size": 64, "max_length": 128}


@pytest.fixture(scope="module")
def learned(ray_cluster, tmp_path_factory):
    from moekd_ray.config import load_config
    from moekd_ray.recipes.pipeline import run_pipeline

    tmp = tmp_path_factory.mktemp("learning")
    data = write_dataset(tmp / "data", n_train=800, n_eval=120)
    cfg = load_config(None, [
        "name=learning", f"output_dir={tmp / 'runs'}", f"data.dir={data}",
        f"experts.models={json.dumps([{'source': 'ngram', 'buckets': 4096, 'max_length': 256}, GRAPH, ENCODER])}",
        "experts.k=3", "experts.folds=2", "experts.train_on=all_weighted", "experts.schedule.epochs=8",
        "experts.schedule.lr=5e-3", "experts.resources.cpus_per_worker=0.33",  # 6 fold models on 2 CPUs
        "router.epochs=30", f"distill.student_arch={json.dumps(ENCODER)}", "distill.schedule.epochs=8",
        "distill.schedule.lr=5e-3", "distill.schedule.batch_size=16", "distill.resources.num_workers=2",
        "distill.temperature=2", "distill.alpha=0.2",
        f"mlflow.tracking_uri=sqlite:///{tmp / 'mlruns.db'}", "mlflow.registered_model=learning-student",
    ])
    return cfg, run_pipeline(cfg, log=lambda *_: None)


def test_every_model_learns_the_known_rule(learned):
    _, result = learned
    by_model = {r["model"]: r for r in result.table}
    assert {"expert_0", "expert_1", "expert_2", "mixture", "student", "tfidf-lr"} <= set(by_model)
    print("\ntest accuracy:", {name: round(row["test_accuracy"], 3) for name, row in by_model.items()})
    for name in ("expert_0", "expert_1", "expert_2", "mixture", "student"):
        assert by_model[name]["test_accuracy"] >= 0.9, (name, by_model[name])
        assert not by_model[name]["degenerate"], (name, by_model[name]["degenerate"])


def test_registered_student_scores_as_the_table_says(learned):
    cfg, result = learned
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    model = mlflow.pyfunc.load_model(result.model_uri)
    test = rows(120, 2)  # the test split write_dataset wrote
    probs = model.predict(pd.DataFrame({"func": [r["func"] for r in test]}))["probability"].to_numpy()
    labels = np.array([r["target"] for r in test])
    accuracy = float(((probs >= 0.5) == labels).mean())
    assert accuracy >= 0.9
    student = next(r for r in result.table if r["model"] == "student")
    assert accuracy == pytest.approx(student["test_accuracy"], abs=1e-9)  # the threshold is in the weights


def test_cross_fitted_experts_and_best_epoch(learned):
    cfg, result = learned
    import ray.train

    from moekd_ray.stages.experts import by_expert, member_names
    from moekd_ray.stages.context import finished_members

    finished = finished_members(cfg, result.run_dir)
    experts = by_expert(cfg, [finished[m].checkpoint for names in member_names(cfg) for m in names])
    assert [len(m) for m in experts] == [2, 2, 2]  # two fold models per expert
    for members in experts:
        for checkpoint in members:
            history = json.loads((__import__("pathlib").Path(checkpoint.path) / "metrics_history.json").read_text())
            best = max(history, key=lambda r: r["val_auc"])  # keep_best_by auc: the first best epoch wins ties
            assert history[-1]["best_epoch"] == min(r["epoch"] for r in history if r["val_auc"] == best["val_auc"])
            assert isinstance(checkpoint, ray.train.Checkpoint)
