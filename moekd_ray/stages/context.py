"""What every stage of `moekd run` is handed: the run (config, data, run folder, MLflow tracker, timer, log) and
what an interrupted run already left in its folder (`Finished`), so each stage's entry function can check for its
own reusable output, write its own MLflow run and return plain values to the driver (recipes/pipeline.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moekd_ray import console, progress, ray_runtime
from moekd_ray.config import MoEKDConfig, member_names
from moekd_ray.data import SPLITS
from moekd_ray.tokenization import load_tokenizer

if TYPE_CHECKING:  # a type only: the Ray workers that import the stage modules need no MLflow
    from moekd_ray.tracking import Tracker


class StageTimer:
    """`with timer("name"):` keeps each stage's wall time and status (ran, or reused on resume); the console's
    status line names the stage while it runs, and one line says how it ended."""

    def __init__(self, log, stages: list[str]):
        self.log, self.stages, self.seconds, self.status = log, stages, {}, {}

    @contextlib.contextmanager
    def __call__(self, name):
        place = f"{self.stages.index(name) + 1}/{len(self.stages)}"
        progress.stage(name, self.stages.index(name) + 1, len(self.stages))
        self.status.setdefault(name, "ran")
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        progress.stage(None)
        self.log(f"[{place}] {name} {self.status[name]} in {console.duration(self.seconds[name])}")

    def reused(self, name):
        self.status[name] = "reused"


class Finished:
    """What the run folder already holds, for `--resume`: each stage asks here first and makes only what is
    missing. A new run's folder holds nothing. (The soft-target file's check, `cached_soft_targets`, is in
    stages/aggregate.py beside its reader, which imports this module.)"""

    def __init__(self, cfg: MoEKDConfig, run_dir: Path, resume: bool):
        self.cfg, self.run_dir, self.resume = cfg, run_dir, resume

    def tokenizers(self):
        """(expert tokenizers, student tokenizer) as saved, or (None, None)."""
        return saved_tokenizers(self.cfg, self.run_dir) if self.resume else (None, None)

    def members(self) -> dict:
        """The Ray Train results of the expert models that finished training (`finished_members`)."""
        return finished_members(self.cfg, self.run_dir) if self.resume else {}

    def student(self, folder: Path) -> bool:
        """Whether the student was distilled and saved (the folder appears complete or not at all)."""
        return self.resume and (folder / "model.safetensors").is_file()


def saved_tokenizers(cfg: MoEKDConfig, run_dir: Path):
    folder = run_dir / "tokenizers"
    names = [f"expert_{k}" for k in range(cfg.experts.k)] + ["student"]
    if not all((folder / n / "tokenizer.json").is_file() for n in names):
        return None, None
    toks = {n: load_tokenizer(folder / n) for n in names}
    return [toks[n] for n in names[:-1]], toks["student"]


def finished_members(cfg: MoEKDConfig, run_dir: Path) -> dict:
    """The Ray Train results, by member name (`member_names`), of the expert models whose run finished (all its
    epochs, or stopped early), as Ray recorded them in the run's storage."""
    done = {}
    for member in (m for names in member_names(cfg) for m in names):
        result = ray_runtime.saved_result(ray_runtime.run_storage(cfg, run_dir, member))
        if result is not None and ray_runtime.epoch_rows(result)[-1]["final"]:
            done[member] = result
    return done


@dataclass
class RunContext:
    """One pipeline run as its stages see it. `funcs`/`labels`: each split's C functions and 0/1 targets (from
    `data`, the Devign splits as loaded); every MLflow write goes through `tracker`."""
    cfg: MoEKDConfig
    data: dict
    funcs: dict[str, list[str]]
    labels: dict[str, np.ndarray]
    run_dir: Path
    tracker: Tracker
    timer: StageTimer
    finished: Finished
    log: Callable[[str], None] = print

    @classmethod
    def start(cls, cfg: MoEKDConfig, data: dict, run_dir: Path, tracker: Tracker, resume: bool,
              log=print) -> RunContext:
        """The context of a new run (`resume` False: nothing is reused) or of an interrupted one continued."""
        labels = {s: np.asarray(data[s]["target"], dtype=np.int64) for s in SPLITS}
        funcs = {s: list(data[s]["func"]) for s in SPLITS}
        timer = StageTimer(log, ["tokenizers", "partition", "experts", "router", "distill", "evaluate",
                                 *(["attack"] if cfg.attack.in_pipeline else []), "register"])
        finished = Finished(cfg, run_dir, resume)  # what an interrupted run left (nothing for a new run)
        return cls(cfg, data, funcs, labels, run_dir, tracker, timer, finished, log)
