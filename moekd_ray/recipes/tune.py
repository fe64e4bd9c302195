"""`moekd tune`: Ray Tune search over router temperature / top-k, distillation temperature T, alpha and learning rate.

    moekd tune jobs/tune_quickstart.yaml [--resume]

Experts are trained once: the search starts from a finished pipeline run (`tune.from_run`, an MLflow run id; else
the pipeline runs first) and reuses its cached expert logits and gate logits. A trial re-weights them at its router
temperature (`stages.aggregate.expert_weights`), softens the mixture at its T, and distils one student in a Ray
Train TorchTrainer with DeepSpeed (`stages.distill.distill_trainer`), whose per-epoch metrics reach Tune through
`TuneReportCallback` (Train V2: the function trainable builds and fits the trainer). Trials are logged to MLflow
from the driver after the search, so concurrent trials never write to a SQLite store at once.

`tune.metric: robust_f1` also counts robustness: after its last epoch a trial attacks its student (`attack.method`,
`attack.query_budget`) on one seeded sample of `tune.attack_n` validation functions, the same for every trial, and
reports objective = val_f1 - `tune.robustness_weight` x ASR as its final result. ASHA cannot stop on a value that
exists only after the last epoch, so it stops on per-epoch val_f1 and the objective ranks the finished trials.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from ray import tune
from ray.tune import ResultGrid
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from moekd_ray import ray_runtime, tracking
from moekd_ray.config import ChoiceDist, LogUniformDist, MoEKDConfig
from moekd_ray.data import dataset_hash
from moekd_ray.decision import decide_folder, decision_tags
from moekd_ray.metrics import classification_metrics, scatter_figure
from moekd_ray.models import load_model, num_params, size_mb
from moekd_ray.stages.aggregate import soft_targets
from moekd_ray.attacks.workers import attack_trial_student, validation_sample
from moekd_ray.stages.distill import distill_trainer
from moekd_ray.stages.search import SourceRun, TrialProgress, source_run
from moekd_ray.tokenization import encode, train_bpe
from moekd_ray.train_loop import predict_logits, probs1


ROBUST = "robust_f1"


@dataclass
class SearchResult:
    best_values: dict
    best_metrics: dict
    model_uri: str | None
    parent_run_id: str


class ObjectiveLater(TuneReportCallback):
    """Per-epoch results with objective=NaN: Tune wants a search algorithm's metric (Optuna's) in every result,
    and the robust objective exists only in a trial's final result, after its student was attacked."""

    def after_report(self, run_context, metrics, checkpoint):
        super().after_report(run_context, [{**metrics[0], "objective": float("nan")}], checkpoint)


def run_trial(values: dict, base: dict, refs: dict) -> None:
    """Tune function trainable: one student distilled from the cached experts at this trial's values (with
    robust_f1, then attacked, and the objective reported as the trial's final result)."""
    cfg = MoEKDConfig.model_validate(base).with_values(values)
    robust = cfg.tune.metric == ROBUST
    cache = ray.get(refs["cache"])
    teacher = soft_targets(cfg, cache["expert_logits"], cache["gate_logits"])
    name = f"{refs['search_name']}-{tune.get_context().get_trial_id()}"
    trainer = distill_trainer(cfg, ray.get(refs["enc"]), ray.get(refs["labels"]), teacher, name, refs["storage"],
                              callbacks=[ObjectiveLater() if robust else TuneReportCallback()],
                              task=f"trial {tune.get_context().get_trial_id()}",
                              max_failures=ray_runtime.TRIAL_RUN_FAILURES)
    result = trainer.fit()
    if robust:
        last = ray_runtime.epoch_rows(result)[-1]
        s = attack_trial_student(result.checkpoint, Path(refs["trials_dir"]) / name / "student",
                                 ray.get(refs["tokenizer"]), cfg, refs["sample"], cfg.attack.method,
                                 cfg.attack.query_budget)
        tune.report({"val_f1": last["val_f1"], "val_accuracy": last["val_accuracy"], "asr": s["asr"],
                     "asr_attacked": s["attacked"], "asr_seconds": s["seconds"],
                     "objective": last["val_f1"] - cfg.tune.robustness_weight * s["asr"]})


def search_space(cfg: MoEKDConfig) -> dict:
    space = {}
    for key, dist in cfg.tune.space.items():
        if isinstance(dist, ChoiceDist):
            space[key] = tune.choice(dist.values)
        elif isinstance(dist, LogUniformDist):
            space[key] = tune.loguniform(dist.low, dist.high)
        else:
            space[key] = tune.uniform(dist.low, dist.high)
    return space


def objective(cfg: MoEKDConfig) -> tuple[str, str]:
    """The key of a trial's result that ranks trials, and its direction."""
    if cfg.tune.metric == ROBUST:
        return "objective", "max"
    return cfg.tune.metric, "min" if cfg.tune.metric == "val_loss" else "max"


def make_tuner(cfg: MoEKDConfig, trainable, name: str, storage: str) -> tune.Tuner:
    t = cfg.tune
    epochs = cfg.distill.schedule.epochs
    metric, mode = objective(cfg)
    asha = {"time_attr": "training_iteration", "grace_period": t.grace_period, "reduction_factor": t.reduction_factor}
    if t.metric != ROBUST:
        scheduler = ASHAScheduler(max_t=epochs, **asha) if t.scheduler == "asha" else FIFOScheduler()
        by_tune, by_search = {"metric": metric, "mode": mode}, {}
    else:
        # The objective exists only in the final result: ASHA stops on per-epoch val_f1, at the rungs below the
        # last epoch (those it uses with max_t=epochs, whose rung at max_t never fires: it stops there first) and
        # never at the last epoch (stop_last_trials=False), so every trial that reaches it gets attacked.
        scheduler = FIFOScheduler()  # also for ASHA with grace_period >= epochs: it could stop nobody
        if t.scheduler == "asha" and t.grace_period < epochs:
            scheduler = ASHAScheduler(metric="val_f1", mode="max", max_t=epochs - 1, stop_last_trials=False, **asha)
        by_tune, by_search = {}, {"metric": metric, "mode": mode}  # Optuna learns from the final objective
    if t.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search = ConcurrencyLimiter(OptunaSearch(seed=cfg.seed, **by_search), max_concurrent=t.max_concurrent)
    else:
        search = BasicVariantGenerator(random_state=cfg.seed, max_concurrent=t.max_concurrent)
    return tune.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(scheduler=scheduler, search_alg=search, num_samples=t.num_samples, **by_tune),
        run_config=ray_runtime.trial_run_config(cfg, name, storage, [TrialProgress(t.num_samples)]),
    )


def run_search(cfg: MoEKDConfig, resume: bool = False, log=print, run_pipeline=None) -> SearchResult:
    """The search from a finished pipeline run's experts: every trial logged to MLflow, the best student registered.
    `run_pipeline` makes that run first when `tune.from_run` is unset (the CLI hands in the pipeline recipe's)."""
    experiment_id = tracking.connect(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    tracker = tracking.Tracker(None, experiment_id, log, cfg.mlflow.tracking_uri)  # no run folder: no spool
    ray_runtime.init_ray(cfg)
    ray_runtime.check_bf16(cfg, ("distill",))
    ray_runtime.check_trial_fits(cfg, cfg.distill.resources, "distill.resources")
    source = source_run(cfg, cfg.tune.from_run, "tune.from_run", log, run_pipeline)
    tokenizer, funcs, enc = student_inputs(cfg, source)
    name = f"tune-{cfg.name}-{cfg.digest()}"
    storage = ray_runtime.storage_path(cfg, Path(cfg.output_dir), "tune")
    refs = trial_refs(cfg, source, tokenizer, funcs, enc, name, storage)
    grid, search_seconds = fit_search(cfg, refs, name, storage, resume, log)

    metric, mode = objective(cfg)
    best = grid.get_best_result(metric, mode, scope="last")  # NaN (a robust trial ASHA stopped) never wins
    trials = [r for r in grid if r.metrics]
    source_runs = tracking.find_runs(cfg.mlflow.experiment, f"tags.`moekd.run_dir` = '{source.run_dir}'")
    with tracker.run(None, name) as run_id:
        tracker.set_tags({"moekd.source_run_dir": str(source.run_dir), "moekd.search": name})
        tracker.log_config(cfg.model_dump(mode="json"))
        for result in trials:
            log_trial(tracker, result, robust=cfg.tune.metric == ROBUST)
        log_temperature_figure(tracker, cfg, trials, metric)
        log_search_cost(tracker, trials, search_seconds, source_runs, log)

        best_values = {k: best.config[k] for k in cfg.tune.space}
        student_dir, decision, best_metrics = best_student(cfg, best, name, storage, enc, source.labels)
        tracker.log_metrics({f"best.{k}": v for k, v in best_metrics.items()})
        tracker.log_params({f"best.{k}": v for k, v in best_values.items()})
        model_uri = None
        if cfg.tune.register_best and cfg.mlflow.registered_model:
            tags = {"moekd.search_run_id": run_id, "moekd.data_hash": dataset_hash(source.data),
                    **decision_tags(decision)}
            model_uri = register_best(tracker, cfg, name, student_dir, tokenizer, best_values, best_metrics, tags)
    log(f"best trial: {best_values} -> " + ", ".join(f"{k} {v:.3f}" for k, v in best_metrics.items()))
    log(f"student model: {model_uri}")
    return SearchResult(best_values, best_metrics, model_uri, run_id)


def student_inputs(cfg: MoEKDConfig, source: SourceRun) -> tuple[object, dict, dict]:
    """The student's tokenizer (trained on the source run's training functions), and the functions and their
    encodings by split."""
    arch = cfg.distill.arch()
    funcs = {s: list(source.data[s]["func"]) for s in source.labels}
    tokenizer = train_bpe(funcs["train"], arch.vocab_size, arch.max_length)
    enc = {s: encode(tokenizer, funcs[s], arch.max_length) for s in source.labels}
    return tokenizer, funcs, enc


def trial_refs(cfg: MoEKDConfig, source: SourceRun, tokenizer, funcs: dict, enc: dict, name: str,
               storage: str) -> dict:
    """What every trial reads: the cached logits, encodings and labels put into Ray's object store once, and where
    the trials write; with robust_f1 also the tokenizer and the validation sample every trial attacks."""
    refs = {
        "cache": ray.put({k: source.cache["train"][k] for k in ("expert_logits", "gate_logits")}),
        "enc": ray.put({s: enc[s] for s in ("train", "valid")}),
        "labels": ray.put({s: source.labels[s] for s in ("train", "valid")}),
        "search_name": name, "storage": storage,
        "trials_dir": str((Path(cfg.output_dir) / name / "trials").resolve()),  # local files (storage may be s3://)
    }
    if cfg.tune.metric == ROBUST:
        refs["tokenizer"] = ray.put(tokenizer)
        refs["sample"] = validation_sample(cfg, funcs, source.labels["valid"], cfg.tune.attack_n)
    return refs


def fit_search(cfg: MoEKDConfig, refs: dict, name: str, storage: str, resume: bool, log) -> tuple[ResultGrid, float]:
    """The search run to its end, continuing Tune's saved state with `resume` when there is one: its results and
    its wall seconds."""
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=cfg.model_dump(mode="json"), refs=refs),
                                    {"cpu": ray_runtime.TRIAL_CPU})
    start = time.perf_counter()
    path = ray_runtime.storage_join(storage, name)
    if resume and tune.Tuner.can_restore(path):
        log(f"resuming search {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = make_tuner(cfg, trainable, name, storage)
    grid = tuner.fit()
    return grid, time.perf_counter() - start


def log_trial(tracker: tracking.Tracker, result, robust: bool) -> None:
    """One trial as a nested MLflow run: its values, per-epoch metrics and time, and its attack when it was attacked."""
    with tracker.stage(f"trial_{result.metrics['trial_id']}", result.config):
        rows = result.metrics_dataframe.to_dict("records")
        epochs = [r for r in rows if not math.isnan(r.get("epoch", math.nan))]  # not the robust final row
        # Stamped with the time Tune got each report (not now), so the history shows when trials ran.
        tracker.log_epochs([{k: v for k, v in r.items() if k.startswith(("val_", "train_loss"))} |
                             {"epoch": r["epoch"]} for r in epochs],
                            timestamps=[int(r["timestamp"]) * 1000 for r in epochs])
        tracker.log_metrics({"trial_seconds": float(rows[-1]["time_total_s"])})
        final = rows[-1]
        if robust and not math.isnan(final.get("objective", math.nan)):  # attacked (not stopped by ASHA)
            tracker.log_metrics({k: float(final[k]) for k in ("asr", "asr_attacked", "asr_seconds", "objective")},
                                 timestamp=int(final["timestamp"]) * 1000)


def log_temperature_figure(tracker: tracking.Tracker, cfg: MoEKDConfig, trials: list, metric: str) -> None:
    """The objective against the distillation temperature T, a point per trial that has one."""
    robust = cfg.tune.metric == ROBUST
    ranked = [r for r in trials if math.isfinite(r.metrics.get(metric, math.nan))]
    tracker.log_figure(scatter_figure(
        [r.config.get("distill.temperature", cfg.distill.temperature) for r in ranked],
        [r.metrics[metric] for r in ranked], "distillation temperature T", metric,
        "each point a trial " + ("that ran every epoch" if robust else "(last reported epoch)")),
        "search_T_vs_metric.png")


def log_search_cost(tracker: tracking.Tracker, trials: list, search_seconds: float, source_runs: list, log) -> None:
    """The search's wall time and mean trial time, and what a trial would cost if it retrained the experts too."""
    trial_cost = float(np.mean([r.metrics["time_total_s"] for r in trials]))
    metrics = {"search_seconds": search_seconds, "mean_trial_seconds": trial_cost, "trials": len(trials)}
    if source_runs:
        # What a trial would cost if it retrained the experts and router as well.
        sm = source_runs[0].metrics
        metrics["retrain_experts_trial_seconds"] = trial_cost + sm.get("seconds_experts", 0) + sm.get(
            "seconds_router", 0) + sm.get("seconds_tokenizers", 0) + sm.get("seconds_partition", 0)
    tracker.log_metrics(metrics)
    log(f"{len(trials)} trials in {search_seconds:.0f} s; mean trial {trial_cost:.0f} s"
        + (f" (retraining experts per trial: {metrics['retrain_experts_trial_seconds']:.0f} s)" if source_runs else ""))


def best_student(cfg: MoEKDConfig, best, name: str, storage: str, enc: dict,
                 labels: dict[str, np.ndarray]) -> tuple[Path, dict, dict]:
    """The best trial's student copied into the search's folder with its threshold chosen on valid: its folder,
    that decision, and its metrics (the trial's ranking metrics, the student's test metrics and size)."""
    student_dir = Path(cfg.output_dir) / name / "best_student"
    # The best trial's student as its Ray Train run last reported it (a folder or a URI: read through Ray).
    trial_run = ray_runtime.saved_result(ray_runtime.storage_join(storage, f"{name}-{best.metrics['trial_id']}"))
    decision = ray_runtime.copy_atomically(  # the threshold into its weights
        trial_run.checkpoint, student_dir,
        lambda folder: decide_folder(cfg.eval, folder, enc["valid"], labels["valid"]))
    student = load_model(student_dir)
    test = classification_metrics(labels["test"], probs1(predict_logits(student, enc["test"], cfg.eval.batch_size)))
    ranking = ("val_accuracy", "val_f1") + (("asr", "objective") if cfg.tune.metric == ROBUST else ())
    best_metrics = {**{k: float(best.metrics[k]) for k in ranking},
                    **{f"test_{k}": v for k, v in test.items()}, "size_mb": size_mb(student),
                    "params": float(num_params(student))}
    return student_dir, decision, best_metrics


def register_best(tracker: tracking.Tracker, cfg: MoEKDConfig, name: str, student_dir: Path, tokenizer,
                  best_values: dict, best_metrics: dict, tags: dict) -> str:
    """The best student with its tokenizer logged as an MLflow model, registered under `mlflow.registered_model`."""
    tok_dir = Path(cfg.output_dir) / name / "student_tokenizer"
    tokenizer.save_pretrained(str(tok_dir))
    return tracker.log_student_model(student_dir, tok_dir, cfg.with_values(best_values).model_dump(mode="json"),
                                     cfg.mlflow.registered_model, best_metrics, tags=tags)
