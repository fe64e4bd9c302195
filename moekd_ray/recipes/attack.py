"""`moekd attack`: renaming attacks (MHM, WIR-Random, ALERT-style) and the structural attack on a trained model.

    moekd attack jobs/quickstart.yaml --model <pipeline run id | run folder | models:/name/version> \
        [--target student|uniform|expert_0] [attack.method=mhm attack.n=200 ...]

The attack itself is stages/attack.py (`attack_model`, `log_attack`), over attacks/workers.py (sampling, parallel
workers, summaries). Logged to a new MLflow run tagged with the attacked model, with a CSV of every example
(original and adversarial code) and an ASR-vs-query-budget plot; a registered student's ASR becomes promotion
evidence on its version.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from moekd_ray import tracking
from moekd_ray.attacks.victim import resolve_victim
from moekd_ray.attacks.workers import summary_table
from moekd_ray.config import MoEKDConfig
from moekd_ray.registry import record_evidence, resolve_version
from moekd_ray.stages.attack import attack_model, log_attack


@dataclass
class AttackReport:
    summary: dict
    rows: list[dict]
    run_id: str | None


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

