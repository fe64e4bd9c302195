"""`moekd quantize`: an int8 copy of a finished run's student for deployment, measured beside its float version and
registered as its own version.

    moekd quantize <run folder | MLflow run id> [key=value overrides of the run's config]

Reads the run's own config (its data splits, eval settings, registered model name). The int8 student (int8.py:
int8 weights with a scale per row, embeddings included, run in float32) gets its own threshold, chosen on
validation from its own scores by eval.threshold and moved into its float32 decision bias, so the pyfunc, `moekd
predict` and the attacks cut it at 0.5 like any student. Both students are scored on valid and test (the pipeline's
row, `stages.evaluate.model_row`), their speed measured alike; the int8 one is written to <run>/student_int8,
logged to a new MLflow run and registered with the tag moekd.quantized=int8.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moekd_ray import tracking
from moekd_ray.config import MoEKDConfig, load_config
from moekd_ray.data import dataset_hash, load_devign
from moekd_ray.decision import decision_tags, pick_threshold, save_decision
from moekd_ray.errors import ConfigError
from moekd_ray.int8 import int8_model, quantize_weights, save_int8
from moekd_ray.metrics import degenerate
from moekd_ray.models import load_model, num_params, shift_decision, size_mb
from moekd_ray.scoring import max_input_length
from moekd_ray.stages.evaluate import model_row
from moekd_ray.tokenization import encode, load_tokenizer
from moekd_ray.train_loop import predict_logits, probs1, throughput

SPLITS = ("valid", "test")


@dataclass
class QuantizeResult:
    folder: Path  # the int8 student's folder
    rows: list[dict]  # the float student's row, then the int8 one's
    model_uri: str | None
    run_id: str


def run_quantize(run: str, overrides: list[str] = (), log=print) -> QuantizeResult:
    folder, source_run_id, cfg = source(run, overrides)
    student = load_model(folder / "student")
    if not hasattr(student, "config"):
        raise ConfigError(f"{folder / 'student'}: an n-gram bag student cannot be quantised to int8; set "
                          "distill.student_arch to a transformer (the default) and run again")
    data = load_devign(cfg.data, cfg.seed)
    labels = {s: np.asarray(data[s]["target"]) for s in SPLITS}
    tokenizer = load_tokenizer(folder / "tokenizers" / "student")
    enc = {s: encode(tokenizer, list(data[s]["func"]), max_input_length(student)) for s in SPLITS}

    out = folder / "student_int8"
    decision = quantize_student(cfg, student, out, enc["valid"], labels["valid"])
    log(f"int8 student: threshold {decision['threshold']:.3f} chosen on valid, saved to {out}")
    int8 = load_model(out)
    params = num_params(student)
    rows = [student_row(cfg, name, model, path, params, enc, labels)
            for name, model, path in (("student", student, folder / "student"), ("student-int8", int8, out))]
    for row in rows:
        log(f"{row['model']}: test acc {row['test_accuracy']:.4f} f1 {row['test_f1']:.3f}, "
            f"{row['disk_mb']:.3f} MB on disk, {row['functions_per_s']:.0f} functions/s")

    tracker = tracking.Tracker(None, tracking.connect(cfg.mlflow.tracking_uri, cfg.mlflow.experiment), log,
                               cfg.mlflow.tracking_uri)  # no run folder: no spool
    with tracker.run(None, f"quantize-{folder.name}") as run_id:
        tracker.set_tags({"moekd.source_run_dir": str(folder), "moekd.quantized": "int8",
                          **({"moekd.source_run_id": source_run_id} if source_run_id else {})})
        tracker.log_dict(rows, "results.json")
        for row in rows:
            tracker.log_metrics({f"{row['model']}.{k}": v for k, v in row.items() if isinstance(v, float)})
        model_uri = tracker.log_student_model(
            out, folder / "tokenizers" / "student", cfg.model_dump(mode="json"), cfg.mlflow.registered_model,
            {k: v for k, v in rows[1].items() if isinstance(v, float)},
            tags={"moekd.quantized": "int8", "moekd.data_hash": dataset_hash(data), **decision_tags(decision)})
    log(f"student model: {model_uri}")
    return QuantizeResult(out, rows, model_uri, run_id)


def source(run: str, overrides: list[str]) -> tuple[Path, str | None, MoEKDConfig]:
    """The finished run (its folder, its MLflow run id when known) and its config with the overrides."""
    given = Path(run, "config.yaml")  # a run folder's own config says where its MLflow store is
    tracking.connect(load_config(given if given.is_file() else None, overrides).mlflow.tracking_uri)
    found = tracking.pipeline_run(run, "moekd quantize")
    if found is None:
        raise ConfigError(f"moekd quantize {run}: neither a run folder nor an MLflow run id; give the folder or run "
                          "id `moekd run` printed")
    folder, run_id = found
    if not (folder / "student" / "model.safetensors").is_file():
        raise ConfigError(f"{folder}: no student/ (the run did not finish); finish it with moekd run "
                          f"{folder / 'config.yaml'} --resume {folder}")
    return folder, run_id, load_config(folder / "config.yaml", overrides)


def quantize_student(cfg: MoEKDConfig, student, out: Path, enc_valid: dict, valid_labels: np.ndarray) -> dict:
    """The student saved as int8 into `out` with its own threshold: chosen on the int8 model's validation scores and
    moved into the decision bias, which int8 keeps in float32 (so the shift is exact). Returns the decision."""
    int8 = int8_model(student.config, quantize_weights(student.state_dict()))
    probs = probs1(predict_logits(int8, enc_valid, cfg.eval.batch_size))
    threshold = pick_threshold(cfg.eval, valid_labels, probs)
    shifted = copy.deepcopy(student)  # the run's own student keeps its weights
    shift_decision(shifted, threshold)
    save_int8(shifted, out)
    decision = {"threshold": threshold, "degenerate": degenerate(valid_labels, probs, cfg.eval.degenerate_share,
                                                                 cfg.eval.min_val_f1, threshold)}
    save_decision(out, decision)
    return decision


def student_row(cfg: MoEKDConfig, name: str, model, folder: Path, params: int, enc: dict, labels: dict) -> dict:
    """`model_row` at 0.5 (the threshold is in the weights), with the float32 parameter count, the weights' MB on
    disk and, for the float student, its float32 MB; functions/s at eval.threads threads, the best of 3 passes over
    up to 1,024 test functions (the two students measured alike)."""
    probs = {s: probs1(predict_logits(model, enc[s], cfg.eval.batch_size)) for s in SPLITS}
    disk = os.path.getsize(folder / "model.safetensors") / 1e6
    rate = max(throughput(model, enc["test"], cfg.eval.batch_size, cfg.eval.threads, n=1024) for _ in range(3))
    cost = {"params": params, "disk_mb": disk,
            "size_mb": disk if name.endswith("int8") else size_mb(model), "functions_per_s": rate}
    return model_row(cfg, name, probs, labels, cost, threshold=0.5)
