"""`moekd search-student`: a multi-objective search over the student's architecture.

    moekd search-student jobs/student_search.yaml [student_search.from_run=<pipeline run id>]

Ray Tune with Optuna's multi-objective TPE sampler samples layers, heads x head width, FFN, vocabulary and length
(`student_search`); each trial checks the constraints first (hidden = heads x head_dim holds by construction; a
student above `max_size_mb` is reported infeasible and never trained), then distils the student from the source
run's cached aggregated soft targets (one Ray Train + DeepSpeed run, `stages.distill.distill_trainer`) and
measures four objectives: validation F1 (max), size in MB (min), p50 latency of one function on one CPU thread
(min) and the attack success rate of `asr_attack` on a fixed seeded sample of validation functions (min).
The driver then computes the Pareto front over the feasible trials, logs every trial (nested MLflow runs), the
front as a table and a plot, and registers each Pareto-optimal student with its objectives as tags (plus test
metrics, so that `moekd registry promote` can gate it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import ray
from pydantic import ValidationError
from ray import tune
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from moekd_ray import ray_runtime, tracking
from moekd_ray.config import ArchConfig, MoEKDConfig, format_validation_error
from moekd_ray.data import SPLITS, dataset_hash
from moekd_ray.decision import decide_folder, decision_tags
from moekd_ray.metrics import axes, classification_metrics, finish
from moekd_ray.models import build_model, load_model, num_params, size_mb
from moekd_ray.attacks.workers import attack_trial_student, validation_sample
from moekd_ray.stages.distill import distill_trainer
from moekd_ray.stages.search import SourceRun, TrialProgress, source_run
from moekd_ray.tokenization import encode, train_bpe
from moekd_ray.train_loop import latency_p50_ms, predict_logits, probs1

# Objective -> direction. The Pareto front and Optuna's sampler use exactly these.
OBJECTIVES = {"val_f1": "max", "size_mb": "min", "latency_ms": "min", "asr": "min"}
SPACE_KEYS = ("num_layers", "num_heads", "head_dim", "ffn_size", "vocab_size", "max_length")


@dataclass
class StudentSearchResult:
    rows: list[dict]  # one per trial: its architecture, objectives, feasible, pareto
    parent_run_id: str
    model_uris: list[str]


def trial_arch(values: dict) -> ArchConfig:
    return ArchConfig(vocab_size=values["vocab_size"], hidden_size=values["num_heads"] * values["head_dim"],
                      num_layers=values["num_layers"], num_heads=values["num_heads"], ffn_size=values["ffn_size"],
                      max_length=values["max_length"])


def constraint_violation(arch: ArchConfig, max_size_mb: float | None) -> tuple[float, str | None]:
    """The student's size in MB, and why it may not be trained (None: it may)."""
    mb = size_mb(build_model(arch, 0))
    if max_size_mb is not None and mb > max_size_mb:
        return mb, f"{mb:.2f} MB > student_search.max_size_mb={max_size_mb}"
    return mb, None


def pareto_front(rows: list[dict], objectives: dict[str, str] = OBJECTIVES) -> list[bool]:
    """For each row: True if no other row is at least as good on every objective and better on one."""
    sign = {k: (1 if d == "max" else -1) for k, d in objectives.items()}
    scores = np.array([[sign[k] * r[k] for k in objectives] for r in rows], dtype=float).reshape(len(rows), -1)
    return [not any(np.all(other >= mine) and np.any(other > mine) for other in scores) for mine in scores]


def run_student_trial(values: dict, base: dict, refs: dict) -> None:
    """Tune function trainable: check the constraints, distil, measure the four objectives, report once."""
    cfg = MoEKDConfig.model_validate(base)
    s = cfg.student_search
    try:
        arch = trial_arch(values)
        mb, violation = constraint_violation(arch, s.max_size_mb)
    except ValidationError as err:  # e.g. heads x head_dim below the minimum width
        mb, violation = 0.0, format_validation_error(err, "student", ArchConfig)
    if violation:  # reported with the worst objective values, never trained
        tune.report({"feasible": 0, "violation": violation, "size_mb": mb, "val_f1": 0.0, "latency_ms": 1e9,
                     "asr": 1.0, "student_dir": ""})
        return
    tok = ray.get(refs["tokenizers"])[arch.vocab_size]
    funcs, labels = ray.get(refs["funcs"]), ray.get(refs["labels"])
    enc = {split: encode(tok, funcs[split], arch.max_length) for split in ("train", "valid")}
    tcfg = cfg.with_values({"distill.student_arch": arch.model_dump(), "distill.max_length": None})
    name = f"{refs['search_name']}-{tune.get_context().get_trial_id()}"
    result = distill_trainer(tcfg, enc, labels, ray.get(refs["teacher"]), name, refs["storage"],
                             task=f"trial {tune.get_context().get_trial_id()}",
                             max_failures=ray_runtime.TRIAL_RUN_FAILURES).fit()
    last = ray_runtime.epoch_rows(result)[-1]
    folder = Path(refs["trials_dir"]) / name / "student"
    outcome = attack_trial_student(result.checkpoint, folder, tok, cfg, refs["sample"], s.asr_attack, s.asr_budget)
    latency = latency_p50_ms(load_model(folder), enc["valid"], threads=1, n=50)
    tune.report({"feasible": 1, "violation": "", "size_mb": mb, "val_f1": float(last["val_f1"]),
                 "val_accuracy": float(last["val_accuracy"]), "latency_ms": latency, "asr": outcome["asr"],
                 "asr_attacked": outcome["attacked"], "params": num_params(load_model(folder)),
                 "student_dir": str(folder)})


def run_student_search(cfg: MoEKDConfig, log=print, run_pipeline=None) -> StudentSearchResult:
    """The architecture search from a finished pipeline run's soft targets: every trial logged, the Pareto front
    reported and registered. `run_pipeline` makes that run first when `student_search.from_run` is unset."""
    s = cfg.student_search
    experiment_id = tracking.connect(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    tracker = tracking.Tracker(None, experiment_id, log, cfg.mlflow.tracking_uri)  # no run folder: no spool
    ray_runtime.init_ray(cfg)
    ray_runtime.check_bf16(cfg, ("distill",))
    ray_runtime.check_trial_fits(cfg, cfg.distill.resources, "distill.resources")
    src = source_run(cfg, s.from_run, "student_search.from_run", log, run_pipeline)
    funcs = {split: list(src.data[split]["func"]) for split in SPLITS}
    tokenizers = {v: train_bpe(funcs["train"], v, max(s.max_length)) for v in s.vocab_size}
    name = f"student-search-{cfg.name}-{cfg.digest()}"
    storage = ray_runtime.storage_path(cfg, Path(cfg.output_dir), "student_search")
    tuner = student_tuner(cfg, student_refs(cfg, src, funcs, tokenizers, name, storage), name, storage)
    start = time.perf_counter()
    grid = tuner.fit()
    log(f"{len(grid)} trials in {time.perf_counter() - start:.0f} s")
    rows = trial_rows(grid)
    feasible = [r for r in rows if r["feasible"]]

    model_uris = []
    with tracker.run(None, name) as run_id:
        tracker.set_tags({"moekd.source_run_dir": str(src.run_dir), "moekd.student_search": name})
        tracker.log_config(cfg.model_dump(mode="json"))
        for r in rows:
            with tracker.stage(f"trial_{r['trial']}", {k: r[k] for k in SPACE_KEYS}):
                tracker.set_tags({"moekd.pareto": str(r["pareto"]), "moekd.violation": r["violation"]})
                tracker.log_metrics({k: float(r[k]) for k in ("feasible", "size_mb", "val_f1", "latency_ms", "asr")})
                if r["pareto"] and s.register_pareto and cfg.mlflow.registered_model:
                    model_uris.append(register(tracker, cfg, r, funcs["test"], src))
        table = log_report(tracker, cfg, name, rows, feasible)
    log(markdown(table[table["pareto"] == 1]))
    for uri in model_uris:
        log(f"registered {uri}")
    return StudentSearchResult(rows, run_id, model_uris)


def student_refs(cfg: MoEKDConfig, src: SourceRun, funcs: dict, tokenizers: dict, name: str, storage: str) -> dict:
    """What every trial reads: tokenizers, functions, labels and soft targets put into Ray's object store once, the
    validation sample every trial attacks, and where the trials write."""
    return {
        "tokenizers": ray.put(tokenizers),
        "funcs": ray.put({split: funcs[split] for split in ("train", "valid")}),
        "labels": ray.put({split: src.labels[split] for split in ("train", "valid")}),
        "teacher": ray.put(src.cache["train"]["soft_targets"]),
        "sample": validation_sample(cfg, funcs, src.labels["valid"], cfg.student_search.asr_n),
        "search_name": name, "storage": storage,
        "trials_dir": str((Path(cfg.output_dir) / name / "trials").resolve()),  # local files (storage may be s3://)
    }


def student_tuner(cfg: MoEKDConfig, refs: dict, name: str, storage: str) -> tune.Tuner:
    """Optuna's multi-objective sampler over the architecture space, one trial per sample."""
    s = cfg.student_search
    space = {key: tune.choice(getattr(s, key)) for key in SPACE_KEYS}
    search = OptunaSearch(metric=list(OBJECTIVES), mode=list(OBJECTIVES.values()), seed=cfg.seed)
    trainable = tune.with_resources(tune.with_parameters(run_student_trial, base=cfg.model_dump(mode="json"),
                                                         refs=refs), {"cpu": ray_runtime.TRIAL_CPU})
    return tune.Tuner(trainable, param_space=space,
                      run_config=ray_runtime.trial_run_config(cfg, name, storage, [TrialProgress(s.num_samples)]),
                      tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(search, s.max_concurrent),
                                                  num_samples=s.num_samples))


def trial_rows(grid) -> list[dict]:
    """A row per trial that reported: its architecture and objectives, and whether it is on the Pareto front of the
    feasible trials (pareto 1) or not (0; every infeasible trial)."""
    rows = []
    for r in grid:
        if r.metrics and "feasible" in r.metrics:
            c = r.config
            rows.append({"trial": r.metrics["trial_id"], **{k: c[k] for k in SPACE_KEYS},
                         "hidden_size": c["num_heads"] * c["head_dim"],
                         **{k: r.metrics[k] for k in ("feasible", "violation", "size_mb", "val_f1", "latency_ms",
                                                      "asr", "student_dir")},
                         "asr_attacked": int(r.metrics.get("asr_attacked", 0))})  # the functions ASR is over
    feasible = [r for r in rows if r["feasible"]]
    for r, on_front in zip(feasible, pareto_front(feasible)):
        r["pareto"] = int(on_front)
    for r in rows:
        r.setdefault("pareto", 0)
    return rows


def log_report(tracker: tracking.Tracker, cfg: MoEKDConfig, name: str, rows: list[dict],
               feasible: list[dict]) -> pd.DataFrame:
    """The trials as a CSV, the Pareto front as a markdown table and a plot, into the search's folder and its
    MLflow run, with the counts; returns the trials' table."""
    table = pd.DataFrame(rows).drop(columns=["student_dir"])
    report = Path(cfg.output_dir) / name
    report.mkdir(parents=True, exist_ok=True)
    table.to_csv(report / "trials.csv", index=False)
    (report / "pareto.md").write_text(markdown(table[table["pareto"] == 1]) + "\n")
    fig = pareto_figure(feasible)
    fig.savefig(report / "pareto.png", dpi=120)
    tracker.log_figure(fig, "pareto.png")
    tracker.log_artifact(report, "report")
    tracker.log_metrics({"trials": len(rows), "feasible": len(feasible), "pareto": sum(r["pareto"] for r in rows)})
    return table


def register(tracker: tracking.Tracker, cfg: MoEKDConfig, row: dict, test_funcs: list[str], src: SourceRun) -> str:
    """A Pareto-optimal student into the registry: objectives as tags, test metrics as evidence."""
    from moekd_ray.tokenization import load_tokenizer

    folder = Path(row["student_dir"])
    tokenizer = load_tokenizer(folder / "tokenizer")
    valid = encode(tokenizer, list(src.data["valid"]["func"]), row["max_length"])
    decision = decide_folder(cfg.eval, folder, valid, src.labels["valid"])  # threshold into its weights
    model = load_model(folder)
    enc = encode(tokenizer, test_funcs, row["max_length"])
    test = classification_metrics(src.labels["test"], probs1(predict_logits(model, enc, cfg.eval.batch_size)))
    arch = {k: row[k] for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size", "max_length")}
    tcfg = cfg.with_values({"distill.student_arch": arch, "distill.max_length": None})
    objectives = {f"moekd.objective.{k}": f"{row[k]:.6g}" for k in OBJECTIVES}
    return tracker.log_student_model(
        folder, folder / "tokenizer", tcfg.model_dump(mode="json"), cfg.mlflow.registered_model,
        {**{f"test_{k}": v for k, v in test.items()}, "size_mb": row["size_mb"]},
        tags={**objectives, "moekd.pareto": "1", "moekd.data_hash": dataset_hash(src.data), **decision_tags(decision)},
    )


def markdown(table: pd.DataFrame) -> str:
    cols = ["trial", "num_layers", "hidden_size", "num_heads", "ffn_size", "vocab_size", "max_length", "val_f1",
            "size_mb", "latency_ms", "asr"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def pareto_figure(rows: list[dict]):
    fig, ax = axes((5, 3.6))
    front = [r for r in rows if r.get("pareto")]
    points = ax.scatter([r["size_mb"] for r in rows], [r["val_f1"] for r in rows], c=[r["asr"] for r in rows],
                        cmap="viridis_r", vmin=0, vmax=1, s=[20 + 2 * r["latency_ms"] for r in rows])
    ax.scatter([r["size_mb"] for r in front], [r["val_f1"] for r in front], facecolors="none", edgecolors="red",
               s=120, label="Pareto-optimal")
    fig.colorbar(points, ax=ax, label="ASR")
    return finish(fig, ax, "size (MB)", "validation F1", "students searched (marker size ~ latency)", legend=7)
