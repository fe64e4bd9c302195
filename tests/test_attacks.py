"""Attacks against designed victims (one that keys on an identifier's name, one that ignores identifiers), query
budgets, and `moekd attack` on the tiny pipeline run: real Ray actors, real MLflow, serial == parallel."""

import hashlib
import re

import mlflow
import numpy as np
import pytest

from moekd_ray.identifiers import Identifiers
from moekd_ray.attacks.methods import ATTACKS, RENAMING
from moekd_ray.attacks.victim import BudgetedVictim

CODE = """int copy(char *dst, const char *src, int len) {
    char buf[64];
    int i;
    for (i = 0; i < len; i++) buf[i] = src[i];
    memcpy(dst, buf, len);
    return len;
}"""
POOL = [f"name{i}" for i in range(200)] + ["tmp", "data", "size", "count", "ptr", "out"]


class KeysOnName:
    """Brittle: 'vulnerable' exactly when an identifier called `buf` is present."""

    def __call__(self, funcs):
        return np.array([0.9 if re.search(r"\bbuf\b", f) else 0.1 for f in funcs])

    def embed_names(self, names):  # a fixed pseudo-embedding per name (ALERT's substitute ranking needs one)
        return np.array([np.frombuffer(hashlib.sha256(n.encode()).digest()[:16], dtype=np.uint8) / 255.0
                         for n in names])


class IgnoresIdentifiers(KeysOnName):
    """Robust by construction: scores the code with every identifier renamed away."""

    def __call__(self, funcs):
        return np.array([0.2 + 0.6 * (f.count(";") > 3) for f in funcs])


class Counting:
    """The model under the victim, counting every function it is asked to score: the budget is checked here, where
    the model is called, not by the budget wrapper's own counter."""

    def __init__(self, model):
        self.model, self.scored = model, 0

    def __call__(self, funcs):
        self.scored += len(funcs)
        return self.model(funcs)


def run(method, model, budget=60, seed=0):
    ids = Identifiers(CODE)
    counted = Counting(model)
    victim = BudgetedVictim(counted, label=1, budget=budget)
    pool_vectors = model.embed_names(POOL)
    pool_vectors = pool_vectors / np.linalg.norm(pool_vectors, axis=1, keepdims=True)
    p0 = float(model([CODE])[0])  # the clean prediction, not charged (as in attacks/workers.py)
    out = ATTACKS[method](victim, ids, p0, POOL, np.random.default_rng(seed), candidates=8, population=6,
                          pool_vectors=pool_vectors, embed=model.embed_names)
    assert counted.scored == victim.queries  # the wrapper's count is what the model saw
    return out, counted


@pytest.mark.parametrize("method", sorted(RENAMING))
def test_attack_flips_a_model_that_keys_on_a_name(method):
    out, model = run(method, KeysOnName())
    assert out.success and out.p_true < 0.5
    assert "buf" in out.mapping and not re.search(r"\bbuf\b", out.code)
    assert 0 < model.scored <= 60
    assert Identifiers(out.code).names  # still parses into renamable identifiers


@pytest.mark.parametrize("method", sorted(RENAMING))
def test_attack_fails_on_a_model_that_ignores_identifiers(method):
    out, model = run(method, IgnoresIdentifiers(), budget=45)
    assert not out.success and out.p_true == pytest.approx(0.8)
    assert 0 < model.scored <= 45


def test_mhm_spends_exactly_its_budget_when_it_cannot_flip():
    for budget in (1, 7, 45):
        _, model = run("mhm", IgnoresIdentifiers(), budget=budget)
        assert model.scored == budget


def test_summary_table_is_aligned():
    from moekd_ray.attacks.workers import summary_table

    table = summary_table("mhm", {"functions": 200, "attacked": 87, "skipped_misclassified": 100,
                                  "skipped_no_identifiers": 13, "asr": 0.3448, "mean_queries": 123.45,
                                  "mean_renamed": 1.5, "clean_accuracy": 0.5, "robust_accuracy": 0.35,
                                  "seconds": 321.4, "attacks_per_s": 0.27})
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1  # values right-aligned to one column
    assert "ASR" in table and "34.5%" in table and "0.500 -> 0.350" in table and "skipped: misclassified" in table
    assert next(line for line in lines if line.startswith("attacked")).split() == ["attacked", "87"]


def test_budgeted_victim_never_answers_past_its_budget():
    victim = BudgetedVictim(KeysOnName(), label=0, budget=5)
    assert len(victim.query([CODE] * 3)) == 3
    p = victim.query([CODE] * 4)
    assert len(p) == 2 and victim.remaining == 0
    assert np.allclose(p, 0.1)  # label 0: P(true) = 1 - P(vulnerable)
    assert len(victim.query([CODE])) == 0 and victim.queries == 5


@pytest.mark.parametrize("method", sorted(ATTACKS))
def test_same_seed_same_adversarial_example(method):
    a, _ = run(method, KeysOnName(), seed=3)
    b, _ = run(method, KeysOnName(), seed=3)
    assert a.code == b.code and a.mapping == b.mapping


# --------------------------------------------------------------------- on the tiny pipeline's student (real stack)
@pytest.fixture(scope="module")
def attack_cfg(tiny_pipeline):
    cfg, result = tiny_pipeline
    return cfg.with_values({"attack.n": 12, "attack.query_budget": 20, "attack.candidates": 4,
                            "attack.vocab_rows": 200}), result


def test_parallel_attack_equals_serial_and_is_logged(attack_cfg, tmp_path):
    from moekd_ray.attacks.workers import summary_table
    from moekd_ray.recipes.attack import run_attack

    cfg, result = attack_cfg
    serial = run_attack(cfg.with_values({"attack.workers": 1}), result.run_id, log=lambda *_: None)
    lines = []
    parallel = run_attack(cfg.with_values({"attack.workers": 2}), result.run_id, log=lines.append)
    keys = ("index", "status", "queries", "renamed", "adversarial")
    assert [tuple(r[k] for k in keys) for r in serial.rows] == [tuple(r[k] for k in keys) for r in parallel.rows]
    s = serial.summary
    assert s["attacked"] >= 1, s  # else the equality above compares only skipped functions
    assert lines[-1] == summary_table("mhm", parallel.summary)  # `moekd attack` ends with the table
    assert s["functions"] == 12
    assert s["attacked"] + s["skipped_misclassified"] + s["skipped_no_identifiers"] == 12
    assert all(r["queries"] <= 20 for r in serial.rows)

    client = mlflow.tracking.MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(parallel.run_id)
    assert run.data.tags["moekd.attack.model"] == result.run_id
    assert run.data.metrics["asr"] == pytest.approx(parallel.summary["asr"])
    names = {a.path for a in client.list_artifacts(parallel.run_id)}
    assert {"attack_mhm.csv", "asr_vs_budget_mhm.png"} <= names


def test_attack_workers_that_cannot_be_placed_do_not_hold_work(attack_cfg, ray_cluster):
    """With one of the cluster's 2 CPUs held (as a distillation holds it in the benchmark), a 2-worker attack runs on
    the one worker Ray can place and finishes, with the serial attack's outcomes; before, the unplaced worker kept
    its first chunk until the CPU was released (here: never, so the attack would not end)."""
    import threading

    from moekd_ray.attacks.workers import attack_examples, sample_examples

    cfg, result = attack_cfg
    examples, pool = sample_examples(cfg)

    @ray_cluster.remote(num_cpus=1)
    class Holder:
        def ready(self):
            return True

    holder = Holder.remote()
    ray_cluster.get(holder.ready.remote())
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(rows=attack_examples(
        result.run_dir, "student", cfg.with_values({"attack.workers": 2}), examples, pool, log=lambda *_: None)),
        daemon=True)
    thread.start()
    thread.join(timeout=300)  # seconds of work for 12 functions at 20 queries
    ended_while_held = not thread.is_alive()
    ray_cluster.kill(holder)
    thread.join(timeout=600)  # without the fix, the held chunk finishes now: let it end before the next test
    serial = attack_examples(result.run_dir, "student", cfg.with_values({"attack.workers": 1}), examples, pool)
    assert ended_while_held, "the attack did not end while a CPU was held"
    keys = ("index", "status", "queries", "renamed", "adversarial")  # all but the time each took
    assert [tuple(r[k] for k in keys) for r in outcome["rows"]] == [tuple(r[k] for k in keys) for r in serial]


def test_attack_a_registered_student_by_uri(attack_cfg):
    from moekd_ray.recipes.attack import run_attack

    cfg, result = attack_cfg
    by_uri = run_attack(cfg.with_values({"attack.workers": 1, "attack.method": "wir-random"}), result.model_uri,
                        log=lambda *_: None)
    by_run = run_attack(cfg.with_values({"attack.workers": 1, "attack.method": "wir-random"}), result.run_id,
                        log=lambda *_: None)
    assert [r["p_true"] for r in by_uri.rows] == pytest.approx([r["p_true"] for r in by_run.rows], abs=1e-5)
    # and the attack itself ran the same on both: the same outcome, queries and adversarial text per function
    keys = ("index", "status", "queries", "renamed", "adversarial")
    assert [tuple(r[k] for k in keys) for r in by_uri.rows] == [tuple(r[k] for k in keys) for r in by_run.rows]
    timing = ("seconds", "attacks_per_s")
    assert {k: v for k, v in by_uri.summary.items() if k not in timing} == \
        {k: v for k, v in by_run.summary.items() if k not in timing}
