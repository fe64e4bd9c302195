"""The decision a registered model makes: its threshold on P(vulnerable), chosen on validation and moved into its
weights, and whether it is degenerate (useless). One place for the pipeline, the search and the student search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moekd_ray.config import EvalConfig
from moekd_ray.metrics import choose_threshold, degenerate
from moekd_ray.models import load_model, shift_decision
from moekd_ray.train_loop import predict_logits, probs1

THRESHOLD_FILE = "moekd_threshold.json"  # in a student folder: the threshold moved into its weights


def pick_threshold(cfg: EvalConfig, valid_labels: np.ndarray, valid_probs: np.ndarray) -> float:
    """eval.threshold: a fixed cut, or the one that maximises a validation metric."""
    t = cfg.threshold
    return float(t) if isinstance(t, float) else choose_threshold(valid_labels, valid_probs, t)


def decide(cfg: EvalConfig, model, enc_valid: dict, valid_labels: np.ndarray) -> dict:
    """Choose `model`'s threshold on validation, move it into its weights (models.shift_decision) and judge it.
    Returns {"threshold": t, "degenerate": reason or None}, what `save_decision` records."""
    probs = probs1(predict_logits(model, enc_valid, cfg.batch_size))
    threshold = pick_threshold(cfg, valid_labels, probs)
    shift_decision(model, threshold)
    return {"threshold": threshold,
            "degenerate": degenerate(valid_labels, probs, cfg.degenerate_share, cfg.min_val_f1, threshold)}


def save_decision(folder: Path, decision: dict) -> None:
    (Path(folder) / THRESHOLD_FILE).write_text(json.dumps(decision))


def load_decision(folder: Path) -> dict:
    """What `decide` recorded for a model folder ({"threshold": 0.5, "degenerate": None} for a folder without it)."""
    path = Path(folder) / THRESHOLD_FILE
    return json.loads(path.read_text()) if path.is_file() else {"threshold": 0.5, "degenerate": None}


def decision_tags(decision: dict) -> dict[str, str]:
    """Registry/run tags: moekd.threshold, and moekd.degenerate(_reason) for a useless model (promote refuses it)."""
    tags = {"moekd.threshold": f"{decision['threshold']:.6f}"}
    if decision.get("degenerate"):
        tags.update({"moekd.degenerate": "true", "moekd.degenerate_reason": decision["degenerate"]})
    return tags


def decide_folder(cfg: EvalConfig, folder: Path, enc_valid: dict, valid_labels: np.ndarray) -> dict:
    """`decide` for a saved model folder: its weights are rewritten with the threshold in them, and the decision is
    recorded beside them. Returns the decision."""
    model = load_model(folder)
    decision = decide(cfg, model, enc_valid, valid_labels)
    model.save_pretrained(str(folder))
    save_decision(folder, decision)
    return decision
