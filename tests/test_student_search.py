"""`moekd search-student`: constraints, the Pareto front, and a tiny multi-objective search end to end (Ray Tune +
Optuna, Ray Train + DeepSpeed per trial, MLflow registry) from the session's tiny pipeline run."""

import pytest

from moekd_ray.recipes.student_search import OBJECTIVES, constraint_violation, pareto_front, trial_arch


def test_pareto_front_keeps_exactly_the_non_dominated():
    rows = [
        {"val_f1": 0.6, "size_mb": 1.0, "latency_ms": 2.0, "asr": 0.2},  # best F1
        {"val_f1": 0.5, "size_mb": 0.5, "latency_ms": 1.0, "asr": 0.2},  # smaller and faster
        {"val_f1": 0.5, "size_mb": 1.0, "latency_ms": 2.0, "asr": 0.3},  # dominated by both above
        {"val_f1": 0.4, "size_mb": 2.0, "latency_ms": 3.0, "asr": 0.0},  # most robust
        {"val_f1": 0.4, "size_mb": 2.0, "latency_ms": 3.0, "asr": 0.0},  # a tie does not dominate
    ]
    assert pareto_front(rows) == [True, True, False, True, True]
    assert pareto_front(rows[:1]) == [True]


def test_constraints_hold_before_training():
    arch = trial_arch({"num_layers": 2, "num_heads": 4, "head_dim": 12, "ffn_size": 64, "vocab_size": 500,
                       "max_length": 64})
    assert arch.hidden_size == 48 and arch.hidden_size % arch.num_heads == 0  # divisible by construction
    mb, why = constraint_violation(arch, max_size_mb=10.0)
    assert why is None and 0 < mb < 1
    mb_big, why = constraint_violation(arch.model_copy(update={"vocab_size": 20000}), max_size_mb=1.0)
    assert mb_big > 1.0 and "max_size_mb=1.0" in why


@pytest.fixture(scope="module")
def search(tiny_pipeline):
    from moekd_ray.config import load_config
    from moekd_ray.recipes.student_search import run_student_search

    cfg0, result = tiny_pipeline
    cfg = load_config(None, [
        "name=tiny-search", f"output_dir={result.run_dir.parent}", f"mlflow.tracking_uri={cfg0.mlflow.tracking_uri}",
        "mlflow.registered_model=tiny-pareto", f"student_search.from_run={result.run_id}",
        "student_search.num_layers=[1, 2]", "student_search.num_heads=[2]", "student_search.head_dim=[16]",
        "student_search.ffn_size=[64]", "student_search.vocab_size=[400, 4000]", "student_search.max_length=[32]",
        "student_search.max_size_mb=0.3", "student_search.num_samples=4", "student_search.asr_n=4",
        "student_search.asr_budget=8", "distill.schedule.epochs=1", "distill.resources.num_workers=1",
        "distill.schedule.batch_size=16",
    ])
    return cfg, run_student_search(cfg, log=lambda *_: None)


def test_search_trains_only_feasible_students_and_registers_the_front(search):
    import mlflow

    cfg, out = search
    assert len(out.rows) == 4
    feasible = [r for r in out.rows if r["feasible"]]
    infeasible = [r for r in out.rows if not r["feasible"]]
    assert feasible and infeasible  # the seeded sampler draws both vocabularies
    for r in infeasible:  # never trained: no student, the violated bound named
        assert r["size_mb"] > 0.3 and r["student_dir"] == "" and "max_size_mb" in r["violation"]
    for r in feasible:
        assert r["size_mb"] <= 0.3 and r["latency_ms"] > 0
        # ASR is flips over the functions the trial's student got right in the fixed sample of asr_n
        assert 1 <= r["asr_attacked"] <= cfg.student_search.asr_n or r["asr"] == 0, r
        assert r["asr"] * r["asr_attacked"] == pytest.approx(round(r["asr"] * r["asr_attacked"])), r
    # The front is exactly the non-dominated feasible set (checked by brute force here).
    for r in feasible:
        dominated = any(all((o[k] >= r[k]) if d == "max" else (o[k] <= r[k]) for k, d in OBJECTIVES.items())
                        and any((o[k] > r[k]) if d == "max" else (o[k] < r[k]) for k, d in OBJECTIVES.items())
                        for o in feasible)
        assert r["pareto"] == (not dominated)
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    versions = client.search_model_versions("name='tiny-pareto'")
    assert len(versions) == sum(r["pareto"] for r in out.rows) == len(out.model_uris)
    for v in versions:
        assert v.tags["moekd.pareto"] == "1" and float(v.tags["moekd.objective.size_mb"]) <= 0.3
        assert "metric.test_f1" in v.tags  # evidence for `moekd registry promote`
    logged = {a.path for a in client.list_artifacts(out.parent_run_id, "report")}
    assert {"report/pareto.md", "report/trials.csv", "report/pareto.png"} <= logged


def test_trial_that_cannot_be_placed_is_refused(ray_cluster):
    """On the local 2-CPU cluster, 2 workers x 1 CPU + the trial's own 0.01 never fit: one line, not endless retries."""
    from moekd_ray.config import load_config
    from moekd_ray.errors import ConfigError
    from moekd_ray.ray_runtime import check_trial_fits

    cfg = load_config(None, ["distill.resources.num_workers=2", "distill.resources.cpus_per_worker=1"])
    with pytest.raises(ConfigError, match=r"a trial needs 2.01 CPU of 2 .*cpus_per_worker"):
        check_trial_fits(cfg, cfg.distill.resources, "distill.resources")
    cfg = load_config(None, ["distill.resources.num_workers=2", "distill.resources.cpus_per_worker=0.95"])
    check_trial_fits(cfg, cfg.distill.resources, "distill.resources")
