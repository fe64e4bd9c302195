"""The whole pipeline on a tiny Devign subset through real Ray Train (2 experts at once), real DeepSpeed ZeRO-2 on
2 workers and a real MLflow sqlite store; then the registered student is loaded back through mlflow.pyfunc, and
`moekd predict` with no --model scores a file with it, as the README's first scan does after the quickstart."""

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch

from moekd_ray.models import load_model
from moekd_ray.stages.aggregate import load_soft_targets
from moekd_ray.tokenization import load_tokenizer


@pytest.fixture(scope="module")
def tiny_run(tiny_pipeline):
    return tiny_pipeline


def child_runs(cfg, result):
    client = mlflow.tracking.MlflowClient(cfg.mlflow.tracking_uri)
    return client, client.search_runs(
        [client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'",
    )


def test_table_has_experts_mixture_and_student(tiny_run):
    cfg, result = tiny_run
    assert [r["model"] for r in result.table] == ["expert_0", "expert_1", "mixture", "student", "tfidf-lr"]
    for row in result.table:
        assert row["params"] > 0 and row["functions_per_s"] > 0 and 0 < row["threshold"] < 1
    # The student's row is what a user gets: the registered pyfunc on the same test rows gives its accuracy and F1.
    from moekd_ray.data import load_devign
    from moekd_ray.metrics import classification_metrics

    test = load_devign(cfg.data, cfg.seed)["test"]
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    probs = mlflow.pyfunc.load_model(result.model_uri).predict({"func": list(test["func"])})["probability"]
    want = classification_metrics(np.asarray(test["target"]), probs.to_numpy(), 0.5)
    student = next(r for r in result.table if r["model"] == "student")
    assert (student["test_accuracy"], student["test_f1"]) == pytest.approx((want["accuracy"], want["f1"]), abs=1e-9)


def test_experts_trained_concurrently(tiny_run):
    cfg, result = tiny_run
    _, children = child_runs(cfg, result)
    spans = {}
    for run in children:
        if run.info.run_name.startswith("expert_"):  # its MLflow run spans its Ray Train run
            spans[run.info.run_name] = (run.info.start_time, run.info.end_time)
    assert set(spans) == {"expert_0", "expert_1"}
    # Each expert's worker came up before the other expert's Ray Train run had finished: neither was queued
    # behind the other. (Tiny experts train in under a second, so compare whole worker lifetimes.)
    (s0, e0), (s1, e1) = spans.values()
    assert s0 < e1 and s1 < e0, f"expert runs did not overlap: {spans}"
    names = {r.info.run_name for r in children}
    assert {"tokenizers", "partition", "router", "distill", "evaluate"} <= names


def test_distillation_ran_deepspeed_zero2_on_two_workers(tiny_run):
    cfg, result = tiny_run
    client, children = child_runs(cfg, result)
    distill = next(r for r in children if r.info.run_name == "distill")
    assert distill.data.tags["moekd.zero_stage"] == "2" and distill.data.tags["moekd.world_size"] == "2"
    assert len(client.get_metric_history(distill.info.run_id, "train_loss")) == 2  # one per epoch
    # distill.augment_ratio 0.5: about half of the 256 transfer functions got a renamed copy (robust_transfer_set)
    assert 80 <= distill.data.metrics["renamed_copies"] <= 160 and distill.data.metrics["attack_found_copies"] == 0
    ds_config = json.loads((result.run_dir / "deepspeed_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == 2 and ds_config["train_batch_size"] == 16
    # Each rank's DeepSpeed state is in the Ray Train checkpoint (for resuming), not in the student folder that is
    # logged and registered.
    checkpoint = max(p for p in (result.run_dir / "ray").glob("*-student/checkpoint_*") if p.is_dir())
    assert len(list(checkpoint.glob("deepspeed/*/*optim_states.pt"))) == 2
    assert not list((result.run_dir / "student").rglob("*.pt"))


def test_soft_targets_file_is_consistent(tiny_run):
    cfg, result = tiny_run
    targets = load_soft_targets(result.run_dir / "soft_targets.safetensors")
    train = targets["train"]
    assert train["expert_logits"].shape == (256, 2, 2)
    np.testing.assert_allclose(train["weights"].sum(1), 1.0, atol=1e-5)
    # The soft targets are the router-weighted mixture of the experts' softmax at T.
    z = torch.from_numpy(train["expert_logits"])
    expected = (torch.from_numpy(train["weights"])[..., None] * torch.softmax(z / 2, -1)).sum(1).numpy()
    np.testing.assert_allclose(train["soft_targets"], expected, atol=1e-6)


def test_registered_student_matches_in_memory_student(tiny_run):
    cfg, result = tiny_run
    assert result.model_uri == "models:/moekd-student/1"
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    served = mlflow.pyfunc.load_model(result.model_uri)
    funcs = [
        "int f(char *s) { char b[8]; strcpy(b, s); return 0; }",
        "static void g(int *p, int n) { for (int i = 0; i < n; i++) p[i] = 0; }",
        "int main(void) { return 0; }",
    ]
    got = served.predict({"func": funcs})["probability"].to_numpy()
    student = load_model(result.run_dir / "student").eval()
    tok = load_tokenizer(result.run_dir / "tokenizers" / "student")
    with torch.no_grad():
        enc = tok(funcs, truncation=True, max_length=64, padding=True, return_tensors="pt")
        want = torch.softmax(student(**enc).logits, -1)[:, 1].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert ((got > 0) & (got < 1)).all()


def test_data_splits_are_the_runs_dataset_inputs(tiny_run):
    """The MLflow UI's Datasets section of the parent run says what trained, selected and tested the student: each
    split as a light dataset (its file, a digest of the rows used, row counts; not the rows) with its role."""
    cfg, result = tiny_run
    run = mlflow.MlflowClient(cfg.mlflow.tracking_uri).get_run(result.run_id)
    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
              for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["test", "training", "validation"]
    for context, split, rows in (("training", "train", 256), ("validation", "valid", 48), ("test", "test", 48)):
        dataset = inputs[context]
        assert dataset.name.endswith(f"-{split}") and dataset.source_type == "local"
        assert os.path.basename(json.loads(dataset.source)["uri"]).startswith(f"{split}.jsonl")
        assert json.loads(dataset.profile)["num_rows"] == rows
        assert [c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]][:2] == ["func", "target"]
        assert len(dataset.digest) == 16
    assert len({d.digest for d in inputs.values()}) == 3


def test_predict_without_model_scores_with_the_runs_student(tiny_run, tmp_path):
    """After a run, `moekd predict FILE` with no --model (models:/moekd-student@champion, the run's student that
    passed the gates: registry.promote_first) scores FILE, and says which version and run that is."""
    cfg, result = tiny_run
    func = "int copy(char *s) { char b[8]; strcpy(b, s); return 0; }"
    (tmp_path / "scan.c").write_text(func + "\n")
    proc = subprocess.run([sys.executable, "-m", "moekd_ray.cli", "predict", "scan.c", "--format", "json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(proc.stdout)
    version = result.model_uri.rsplit("/", 1)[1]
    assert f"moekd: model models:/moekd-student@champion: moekd-student version {version} (from MLflow run " \
        f"{result.run_id})" in proc.stderr, proc.stderr
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    expected = mlflow.pyfunc.load_model(result.model_uri).predict({"func": [func]})["probability"].to_numpy()
    assert row["function"] == "copy" and row["probability"] == pytest.approx(float(expected[0]), abs=1e-6)
