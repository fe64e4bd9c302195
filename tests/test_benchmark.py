"""A miniature `moekd benchmark` (3 methods, 1 seed, tiny data) end to end on the session's Ray cluster, DeepSpeed
and an MLflow sqlite store, interrupted after its first student cell and resumed: the table's shape, every number in
it traced back to a logged MLflow run, the cells finished before the interruption reused."""

import json
import time

import mlflow
import numpy as np
import pandas as pd
import pytest

from conftest import TINY_ARCH


@pytest.fixture(scope="module")
def mini_benchmark(ray_cluster, tmp_path_factory):
    from moekd_ray.config import load_config
    from moekd_ray.recipes.benchmark import FaultInjected, run_benchmark

    tmp = tmp_path_factory.mktemp("benchmark")
    cfg = load_config(None, [
        "name=mini", f"output_dir={tmp / 'runs'}", "data.train_rows=200", "data.eval_rows=40",
        f"experts.model={json.dumps(TINY_ARCH)}", "experts.schedule.epochs=1", "experts.resources.cpus_per_worker=0.5",
        "router.epochs=5", f"distill.student_arch={json.dumps(TINY_ARCH)}", "distill.schedule.epochs=1",
        "distill.resources.num_workers=1", "attack.n=6", "attack.query_budget=8", "attack.workers=1",
        "benchmark.methods=[compressor, moekd, moekd-robust-adv]", "distill.augment_budget=8", "benchmark.seeds=[0]", "benchmark.attacks=[mhm]",
        "benchmark.latency_functions=3", "benchmark.bootstrap=200", f"mlflow.tracking_uri=sqlite:///{tmp / 'mlruns.db'}",
        "ray.fault_injection=benchmark:6",  # stops once after 6 cells: the 5 references and compressor
    ])
    with pytest.raises(FaultInjected):
        run_benchmark(cfg, log=lambda *_: None)
    interrupted_at = time.time()
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    before = {r.data.tags["moekd.bench.cell"]: (r.info.run_id, r.data.tags.get("moekd.bench.complete"))
              for r in client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
              if "moekd.bench.cell" in r.data.tags}
    lines = []
    result = run_benchmark(cfg, log=lines.append, resume="latest")
    return cfg, result, before, lines, interrupted_at


def test_table_has_one_row_per_method_and_reference(mini_benchmark):
    cfg, result, *_ = mini_benchmark
    assert [r["method"] for r in result.rows] == ["compressor", "moekd", "moekd-robust-adv", "teacher", "tfidf-lr",
                                                  "mixture", "expert_0", "expert_1"]
    students = [r for r in result.rows if r["role"] == "student"]
    assert all(r["seeds"] == 1 for r in students)
    for r in students + [next(r for r in result.rows if r["method"] in ("teacher", "tfidf-lr"))]:
        # The attack really ran on the sample: a model right on some function was queried for it (at most the
        # budget), and one seed's ASR is a count of flips over at most attack.n attacked functions.
        assert r["robust_accuracy_mhm_mean"] == 0 or 1 <= r["mean_queries_mhm_mean"] <= cfg.attack.query_budget, r
        assert any(abs(r["asr_mhm_mean"] * m - round(r["asr_mhm_mean"] * m)) < 1e-9
                   for m in range(1, cfg.attack.n + 1)), r
    report = result.bench_dir / "report"
    csv = pd.read_csv(report / "benchmark.csv")
    assert list(csv["method"]) == [r["method"] for r in result.rows]
    md = (report / "benchmark.md").read_text().splitlines()
    # table, gains, differences (accuracy, F1, ASR mhm against compressor)
    assert sum(line.startswith("| ") for line in md) == (1 + len(result.rows)) + (1 + 1) + (1 + 3)
    for name in ("accuracy_vs_size.png", "asr_vs_size_mhm.png", "confusion_compressor.png", "confusion_moekd.png",
                 "differences_ci.png"):
        assert (report / name).stat().st_size > 1000


def test_robust_adv_student_learned_from_attack_found_copies(mini_benchmark):
    import mlflow

    cfg, result, *_ = mini_benchmark
    row = next(r for r in result.rows if r["method"] == "moekd-robust-adv")
    run = mlflow.MlflowClient(cfg.mlflow.tracking_uri).get_run(row["run_ids"])
    assert run.data.params["augment_attack"] == cfg.benchmark.robust_adv_attack
    assert 0 < run.data.metrics["attack_found_copies"] <= run.data.metrics["renamed_copies"] <= 100


def test_every_number_comes_from_a_logged_run(mini_benchmark):
    import mlflow

    cfg, result, *_ = mini_benchmark
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    csv = pd.read_csv(result.bench_dir / "report" / "benchmark.csv")
    checked = 0
    for _, row in csv.iterrows():
        runs = [client.get_run(i) for i in row["run_ids"].split()]
        assert all(r.data.tags["mlflow.parentRunId"] == result.run_id for r in runs)
        assert {r.data.tags["moekd.bench.method"] for r in runs} == {row["method"]}
        for column in csv.columns:
            if column.endswith("_mean") and not pd.isna(row[column]):
                logged = [r.data.metrics[column.removesuffix("_mean")] for r in runs]
                assert row[column] == pytest.approx(np.mean(logged)), (row["method"], column)
                checked += 1
    assert checked >= 6 * 9  # every reference and student row carries at least its 9 model metrics
    # The report was logged to the benchmark's parent run.
    logged = {a.path for a in client.list_artifacts(result.run_id, "report")}
    assert {"report/benchmark.md", "report/benchmark.csv", "report/accuracy_vs_size.png"} <= logged


def test_logged_accuracy_is_the_students_real_accuracy(mini_benchmark):
    """The MLflow figure re-derived from the saved student folder and the test split."""
    import mlflow

    from moekd_ray.data import load_devign
    from moekd_ray.metrics import classification_metrics
    from moekd_ray.models import load_model
    from moekd_ray.tokenization import encode, load_tokenizer
    from moekd_ray.train_loop import predict_logits, probs1

    cfg, result, *_ = mini_benchmark
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    row = next(r for r in result.rows if r["method"] == "moekd")
    run = client.get_run(row["run_ids"])
    test = load_devign(cfg.data, cfg.seed)["test"]
    folder = run.data.tags["moekd.bench.student_dir"]
    enc = encode(load_tokenizer(f"{folder}/tokenizer"), list(test["func"]), TINY_ARCH["max_length"])
    probs = probs1(predict_logits(load_model(folder), enc, 64))
    acc = classification_metrics(np.asarray(test["target"]), probs)["accuracy"]
    assert run.data.metrics["test_accuracy"] == pytest.approx(acc)
    assert run.data.params["alpha"] == "0.0"  # students never see transfer-set labels


def test_teachers_are_trained_once_per_setting(mini_benchmark):
    from moekd_ray.data import load_devign
    from moekd_ray import tracking
    from moekd_ray.recipes.benchmark import split_transfer, teacher_parts, train_teachers

    cfg, result, *_ = mini_benchmark
    funcs, labels, projects = split_transfer(load_devign(cfg.data, cfg.seed), cfg.benchmark.labelled_fraction, cfg.seed)
    lines = []
    parts = teacher_parts(cfg, funcs, projects)
    teachers = train_teachers(cfg, funcs, labels, parts, tracking.Tracker(None), lines.append)  # reused: no writes
    assert teachers.info["reused"] == 1 and "reused" in lines[0]
    assert teachers.logits["experts"]["test"].shape == (40, 2, 2) and teachers.logits["teacher"]["test"].shape == (40, 1, 2)
    # Another teacher setting does not reuse them.
    other = cfg.with_values({"experts.schedule.lr": 1e-4})
    from moekd_ray.recipes.benchmark import teachers_digest

    assert teachers_digest(other) != teachers_digest(cfg)


def test_interrupted_benchmark_resumes_reusing_finished_cells(mini_benchmark):
    cfg, result, before, lines, interrupted_at = mini_benchmark
    complete = {key for key, (_, done) in before.items() if done == "1"}
    students = {"compressor/seed0", "moekd/seed0", "moekd-robust-adv/seed0"}
    # The references, then the first student to finish (each is scored as soon as its distillation ends).
    assert complete - students == {"expert_0", "expert_1", "mixture", "teacher", "tfidf-lr"}
    assert len(complete & students) == 1
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    runs = client.search_runs([client.get_run(result.run_id).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{result.run_id}'")
    cells = {}
    for run in runs:
        if "moekd.bench.cell" in run.data.tags:  # (the teachers' training has a run too)
            cells.setdefault(run.data.tags["moekd.bench.cell"], []).append(run)
    assert all(len(group) == 1 for group in cells.values())  # one run per cell, none duplicated by the resume
    assert all(group[0].data.tags["moekd.bench.complete"] == "1" for group in cells.values())
    for key in complete:  # reused as they were
        assert cells[key][0].info.run_id == before[key][0]
        assert f"{key}: reused" in "\n".join(lines) or key in students
    # The first session's other students ended their distillation before it stopped (it waits for running fits);
    # the resume restores them from their finished Ray Train runs instead of distilling them again.
    resumed = next(line for line in lines if line.startswith("== students, seed 0:"))
    for key in students - complete:
        assert key.split("/")[0] in resumed
        run_folder = result.bench_dir / "ray" / f"{result.bench_dir.name}-{key.split('/')[0]}-s0"
        checkpoints = list(run_folder.glob("checkpoint_*"))  # Ray Train's: the one kept was written before the stop
        assert checkpoints and all(c.stat().st_mtime < interrupted_at for c in checkpoints), checkpoints
    sessions = json.loads((result.bench_dir / "sessions.json").read_text())
    parent = client.get_run(result.run_id)
    assert len(sessions) == 2 and parent.data.metrics["sessions"] == 2
    assert parent.data.metrics["wall_seconds"] == pytest.approx(sum(sessions))


def test_moekd_differences_come_with_bootstrap_intervals(mini_benchmark):
    cfg, result, *_ = mini_benchmark
    by = {r["method"]: r for r in result.rows}
    found = {(d["against"], d["metric"]): d for d in result.differences}
    assert set(found) == {("compressor", m) for m in ("test_accuracy", "test_f1", "asr_mhm")}
    accuracy = found[("compressor", "test_accuracy")]
    assert accuracy["difference"] == pytest.approx(
        by["moekd"]["test_accuracy_mean"] - by["compressor"]["test_accuracy_mean"], abs=1e-9)
    asr = found[("compressor", "asr_mhm")]
    assert asr["difference"] == pytest.approx(by["moekd"]["asr_mhm_mean"] - by["compressor"]["asr_mhm_mean"], abs=1e-9)
    for d in result.differences:
        assert -1 <= d["low"] <= d["difference"] <= d["high"] <= 1


def test_benchmark_scores_as_predict_and_the_attacks_do(mini_benchmark):
    """The per-function probabilities the benchmark logged (its table and bootstrap read them) are the ones the one
    scorer gives for the same student folder: the scorer `moekd predict`, the pyfunc and the attacks use."""
    from moekd_ray.attacks.victim import load_victim
    from moekd_ray.data import load_devign

    cfg, result, *_ = mini_benchmark
    test = list(load_devign(cfg.data, cfg.seed)["test"]["func"])
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    for method in ("compressor", "moekd", "tfidf-lr"):
        run = client.get_run(next(r for r in result.rows if r["method"] == method)["run_ids"])
        logged = np.asarray(mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/predictions/test.json")["p_vulnerable"])
        folder = run.data.tags.get("moekd.bench.student_dir") or result.bench_dir / "references" / "tfidf-lr"
        np.testing.assert_allclose(logged, load_victim(folder)(test), rtol=0, atol=2e-6)


def test_moekd_benchmark_as_typed_reuses_the_finished_benchmark(mini_benchmark, ray_cluster, tmp_path):
    """`moekd benchmark CONFIG --resume` in a fresh process, as a user types it, on the finished benchmark: every
    cell is reused (nothing is trained or attacked again) and the same table is printed and written."""
    import subprocess
    import sys

    import yaml

    cfg, result, *_ = mini_benchmark
    tree = cfg.model_dump(mode="json")
    tree["ray"]["address"] = ray_cluster.get_runtime_context().gcs_address  # the driver joins this test's cluster
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(tree))
    csv = result.bench_dir / "report" / "benchmark.csv"
    table = csv.read_text()
    done = subprocess.run([sys.executable, "-m", "moekd_ray.cli", "benchmark", str(path), "--resume"],
                          capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert f"== resuming benchmark {result.bench_dir}" in out, out[-4000:]
    assert "== references:" in out and "== students, seed 0: all reused" in out, out[-4000:]
    assert "distilled concurrently" not in out and "teachers trained in" not in out, out[-4000:]
    assert csv.read_text() == table
