"""What both searches share (`moekd tune`, recipes/tune.py, and `moekd search-student`, recipes/student_search.py):
the finished pipeline run they start from, and the trials-ended line on the console.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ray import tune

from moekd_ray import progress, tracking
from moekd_ray.config import MoEKDConfig, load_config
from moekd_ray.data import SPLITS, load_devign
from moekd_ray.errors import ConfigError
from moekd_ray.stages.aggregate import load_soft_targets


class TrialProgress(tune.Callback):
    """Trials ended, on the console's status line (Tune's own trial table goes to the log file)."""

    def __init__(self, total: int):
        self.total, self.ended = total, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended += 1
        best = [t.last_result.get("val_f1") for t in trials if t.last_result.get("val_f1") is not None]
        progress.report("trials", self.ended, self.total, "trials", f"best val F1 {max(best):.3f}" if best else "")

    on_trial_error = on_trial_complete


@dataclass
class SourceRun:
    """A finished pipeline run that searches start from: its folder, cached logits and targets, and its data."""

    run_dir: Path
    cache: dict  # soft_targets.safetensors by split
    data: dict
    labels: dict[str, np.ndarray]


def source_run(cfg: MoEKDConfig, from_run: str | None, option: str, log, run_pipeline=None) -> SourceRun:
    """The run given by `option` (an MLflow run id or run folder), trained now by `run_pipeline` when unset; its
    cache checked against the data found now. `run_pipeline` is the pipeline recipe's, handed in by the CLI:
    a stage never imports a recipe."""
    if from_run is None:
        if run_pipeline is None:
            raise ConfigError(f"{option} is unset: give the parent run id of a finished `moekd run`")
        log(f"{option} is unset: running the pipeline first")
        run_dir = run_pipeline(cfg, log=log).run_dir
    else:
        run = tracking.pipeline_run(from_run, option)
        if run is None:
            raise ConfigError(f"{option}={from_run}: neither an MLflow run id nor a pipeline run folder; "
                              "give the parent run id of a finished `moekd run`")
        run_dir = run[0]
    if not (run_dir / "soft_targets.safetensors").is_file():
        raise ConfigError(f"{option}={from_run}: its run folder {run_dir} has no soft_targets.safetensors;"
                          " give a pipeline run that finished its aggregate stage")
    run_cfg = load_config(run_dir / "config.yaml")  # the data subset the cached logits belong to
    try:
        cache = load_soft_targets(run_dir / "soft_targets.safetensors")
    except ValueError as exc:
        raise ConfigError(f"{run_dir / 'soft_targets.safetensors'}: {exc}; rerun that pipeline with --resume "
                          "to rebuild it") from None
    data = load_devign(run_cfg.data, run_cfg.seed)
    labels = {s: np.asarray(data[s]["target"], dtype=np.int64) for s in SPLITS}
    if not np.array_equal(labels["train"], cache["train"]["labels"]):
        raise ConfigError(f"{run_dir}: its cached logits do not match the data found now; point data.dir at the "
                          "data that run used")
    return SourceRun(run_dir, cache, data, labels)
