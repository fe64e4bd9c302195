"""`moekd attack`: identifier-renaming attacks (MHM, WIR-Random, ALERT-style) on a trained model.

    moekd attack jobs/quickstart.yaml --model <pipeline run id | run folder | models:/name/version> \
        [--target student|uniform|expert_0] [attack.method=mhm attack.n=200 ...]

The stage itself (sampling, parallel workers, summaries) is attacks/workers.py. Logged to a new MLflow run tagged
with the attacked model, with a CSV of every example (original and adversarial code) and an ASR-vs-query-budget
plot; a registered student's ASR becomes promotion evidence on its version.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from moekd_ray import ray_runtime, tracking
from moekd_ray.attacks.victim import load_victim, resolve_victim
from moekd_ray.attacks.workers import asr_by_budget, attack_examples, sample_examples, summarize, summary_table
from moekd_ray.config import AttackConfig, MoEKDConfig
from moekd_ray.registry import record_evidence, resolve_version

@dataclass
class AttackReport:
    summary: dict
    rows: list[dict]
    run_id: str | None


def attack_model(cfg: MoEKDConfig, folder: Path, target: str, name: str, log=print) -> tuple[list[dict], dict]:
    """Attack the model in `folder` (see attacks.victim.load_victim); return every example's row and the summary."""
    load_victim(folder, target)  # a model that cannot be loaded: one line here, not a dead actor's traceback
    examples, pool = sample_examples(cfg)
    log(f"attack {cfg.attack.method} on {name} ({target}): {len(examples)} functions of {cfg.attack.split}, "
        f"budget {cfg.attack.query_budget} queries, pool of {len(pool)} identifiers, {cfg.attack.workers} workers")
    if cfg.attack.workers > 1:
        ray_runtime.init_ray(cfg)
    start = time.perf_counter()
    rows = attack_examples(folder, target, cfg, examples, pool, log)
    return rows, summarize(rows, time.perf_counter() - start)


def log_attack(rows: list[dict], summary: dict, attack: AttackConfig, tracker: tracking.Tracker, folder: Path,
               prefix: str = "") -> None:
    """Into the tracker's run: the attack's params and metrics, the per-example CSV (written to `folder`) and the
    ASR-vs-budget plot."""
    from moekd_ray.metrics import line_figure

    tracker.log_params(tracking.flatten(attack.model_dump(mode="json"), "attack."))
    tracker.log_metrics({f"{prefix}{k}": float(v) for k, v in summary.items()})
    path = Path(folder) / f"attack_{attack.method}.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    tracker.log_artifact(path)
    budgets, asr = asr_by_budget(rows, attack.query_budget)
    tracker.log_figure(line_figure({attack.method: (budgets, asr)}, "query budget per function",
                                   "attack success rate", "ASR had the budget been smaller"),
                       f"asr_vs_budget_{attack.method}.png")


def run_attack(cfg: MoEKDConfig, model: str, target: str = "student", log=print) -> AttackReport:
    """`moekd attack`: one new MLflow run, tagged with the attacked model."""
    experiment_id = tracking.connect(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    with tempfile.TemporaryDirectory() as tmp:
        folder = resolve_victim(model, Path(tmp))
        rows, summary = attack_model(cfg, folder, target, model, log)
        tracker = tracking.Tracker(None, experiment_id, tracking_uri=cfg.mlflow.tracking_uri)  # no run folder to spool to: an outage is an error
        with tracker.run(None, f"attack-{cfg.attack.method}") as run_id:
            tracker.set_tags({"moekd.attack.model": model, "moekd.attack.target": target,
                              "moekd.attack.method": cfg.attack.method})
            log_attack(rows, summary, cfg.attack, tracker, Path(tmp))
    version = resolve_version(tracking.client(), model)
    if version is not None:  # a registered student: its ASR becomes promotion evidence on the version
        m = cfg.attack.method
        record_evidence(tracking.client(), *version, {
            f"metric.asr_{m}": f"{summary['asr']:.6g}", f"metric.robust_accuracy_{m}": f"{summary['robust_accuracy']:.6g}",
            f"moekd.attack_run_{m}": run_id})
    log(summary_table(cfg.attack.method, summary))
    return AttackReport(summary, rows, run_id)

