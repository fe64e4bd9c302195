"""Stage: attack a trained model by identifier renaming or structural edits (attacks/workers.py samples, runs the
workers and summarises) and log the attack into a tracker's run. `moekd attack` (recipes/attack.py) runs it on any
model; the pipeline's entry, `attack_stage()`, on the student it has just distilled (with `attack.in_pipeline`).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from moekd_ray import ray_runtime, tracking
from moekd_ray.attacks.victim import load_victim
from moekd_ray.attacks.workers import asr_by_budget, attack_examples, format_summary, sample_examples, summarize
from moekd_ray.config import AttackConfig, MoEKDConfig
from moekd_ray.stages.context import RunContext


def attack_stage(ctx: RunContext, rows: list[dict]) -> dict:
    """Attack the run's student (`attack.method`) in a stage run of its own; its ASR and robust accuracy go into
    the student's row of `rows` and onto the parent run. Returns the attack's summary."""
    cfg, method = ctx.cfg, ctx.cfg.attack.method
    with ctx.timer("attack"), ctx.tracker.stage(f"attack_{method}"):
        attack_rows, summary = attack_model(cfg, ctx.run_dir.resolve(), "student", "student", ctx.log)
        ctx.log(format_summary(method, summary))
        log_attack(attack_rows, summary, cfg.attack, ctx.tracker, ctx.run_dir)
    student_row = next(r for r in rows if r["model"] == "student")
    student_row.update({f"{k}_{method}": summary[k] for k in ("asr", "robust_accuracy")})
    ctx.tracker.log_metrics({f"student_{k}_{method}": summary[k] for k in ("asr", "robust_accuracy")})
    return summary


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
