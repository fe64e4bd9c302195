"""Stage: the student logged as an MLflow pyfunc model and registered under `mlflow.registered_model`, tagged with
its decision threshold, degenerate verdict, data hash and comparison with the reference; the first version that
passes the registry's gates becomes @champion. While the tracking server is down it is spooled, not registered.
"""

from __future__ import annotations

from moekd_ray.data import dataset_hash
from moekd_ray.decision import decision_tags
from moekd_ray.registry import promote_first
from moekd_ray.stages.context import RunContext
from moekd_ray.stages.evaluate import reference_tags


def register_stage(ctx: RunContext, decision: dict, rows: list[dict]) -> tuple[str | None, str]:
    """Log and register the run's student (its folder student/, its tokenizer, the resolved config, its row's
    figures). Returns its model URI (None while the writes are spooled) and what promotion did, as " (...)" for the
    run's last line ("" when nothing was registered)."""
    cfg, run_dir, tracker = ctx.cfg, ctx.run_dir, ctx.tracker
    student_row = next(r for r in rows if r["model"] == "student")
    with ctx.timer("register"):
        # The student's degenerate verdict is its row's (after the threshold in its weights).
        student_tags = decision_tags({**decision, "degenerate": student_row["degenerate"]})
        model_uri = tracker.log_student_model(
            run_dir / "student", run_dir / "tokenizers" / "student", cfg.model_dump(mode="json"),
            cfg.mlflow.registered_model, {k: v for k, v in student_row.items() if isinstance(v, float)},
            tags={"moekd.data_hash": dataset_hash(ctx.data), **student_tags, **reference_tags(rows)},
        )
        tracker.set_tags(student_tags)
        champion = ""  # registered (not spooled): the first student that passes the gates becomes @champion
        if model_uri and cfg.mlflow.registered_model:
            registered, version = cfg.mlflow.registered_model, model_uri.rsplit("/", 1)[1]
            champion = f" ({promote_first(tracker.client, registered, version, cfg.registry.gates)})"
    return model_uri, champion
