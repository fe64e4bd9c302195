"""Stage: Ray Tune search over router temperature / top-k, distillation temperature T, alpha and learning rate.

    moekd tune jobs/tune_quickstart.yaml [--resume]

Experts are trained once: the search starts from a finished pipeline run (`tune.from_run`, an MLflow run id; else
the pipeline runs first) and reuses its cached expert logits and gate logits. A trial re-weights them at its router
temperature (`recipes.aggregate.expert_weights`), softens the mixture at its T, and distils one student in a Ray
Train TorchTrainer with DeepSpeed (`recipes.distill.distill_trainer`), whose per-epoch metrics reach Tune through
`TuneReportCallback` (Train V2: the function trainable builds and fits the trainer). Trials are logged to MLflow
from the driver after the search, so concurrent trials never write to a SQLite store at once.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import ray
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from moekd_ray import ray_runtime, tracking
from moekd_ray.config import ChoiceDist, LogUniformDist, MoEKDConfig, load_config
from moekd_ray.data import dataset_hash, load_devign
from moekd_ray.errors import ConfigError
from moekd_ray.metrics import classification_metrics, scatter_figure
from moekd_ray.models import load_model, num_params, size_mb
from moekd_ray.recipes.aggregate import expert_weights, load_soft_targets
from moekd_ray.recipes.distill import distill_trainer
from moekd_ray.router import mixture_probs
from moekd_ray.tokenization import encode, train_bpe
from moekd_ray.train_loop import predict_logits, probs1


@dataclass
class SearchResult:
    best_values: dict
    best_metrics: dict
    model_uri: str | None
    parent_run_id: str


def run_trial(values: dict, base: dict, refs: dict) -> None:
    """Tune function trainable: one student distilled from the cached experts at this trial's values."""
    cfg = MoEKDConfig.model_validate(base).with_values(values)
    cache = ray.get(refs["cache"])
    weights = torch.from_numpy(expert_weights(cfg, cache["gate_logits"]))
    teacher = mixture_probs(torch.from_numpy(np.array(cache["expert_logits"])), weights, cfg.distill.temperature).numpy()
    name = f"{refs['search_name']}-{tune.get_context().get_trial_id()}"
    trainer = distill_trainer(cfg, ray.get(refs["enc"]), ray.get(refs["labels"]), teacher, name, refs["storage"],
                              callbacks=[TuneReportCallback()])
    trainer.fit()


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


def make_tuner(cfg: MoEKDConfig, trainable, name: str, storage: str) -> tune.Tuner:
    t = cfg.tune
    mode = "min" if t.metric == "val_loss" else "max"
    if t.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.distill.schedule.epochs,
                                  grace_period=t.grace_period, reduction_factor=t.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    if t.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search = ConcurrencyLimiter(OptunaSearch(seed=cfg.seed), max_concurrent=t.max_concurrent)
    else:
        search = BasicVariantGenerator(random_state=cfg.seed, max_concurrent=t.max_concurrent)
    return tune.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(metric=t.metric, mode=mode, scheduler=scheduler, search_alg=search,
                                    num_samples=t.num_samples),
        run_config=tune.RunConfig(name=name, storage_path=storage),
    )


@dataclass
class SourceRun:
    """A finished pipeline run that searches start from: its folder, cached logits and targets, and its data."""

    run_dir: Path
    cache: dict  # soft_targets.safetensors by split
    data: dict
    labels: dict[str, np.ndarray]


def source_run(cfg: MoEKDConfig, from_run: str | None, option: str, log) -> SourceRun:
    """The run given by `option` (an MLflow run id or run folder), trained now when unset; its cache checked
    against the data found now."""
    if from_run is None:
        from moekd_ray.recipes.pipeline import run_pipeline

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
    labels = {s: np.asarray(data[s]["target"], dtype=np.int64) for s in ("train", "valid", "test")}
    if not np.array_equal(labels["train"], cache["train"]["labels"]):
        raise ConfigError(f"{run_dir}: its cached logits do not match the data found now; point data.dir at the "
                          "data that run used")
    return SourceRun(run_dir, cache, data, labels)


def run_search(cfg: MoEKDConfig, resume: bool = False, log=print) -> SearchResult:
    tracking.connect(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    ray_runtime.init_ray(cfg)
    source = source_run(cfg, cfg.tune.from_run, "tune.from_run", log)
    run_dir, cache, data, labels = source.run_dir, source.cache, source.data, source.labels
    arch = cfg.distill.arch()
    funcs = {s: list(data[s]["func"]) for s in labels}
    tokenizer = train_bpe(funcs["train"], arch.vocab_size, arch.max_length)
    enc = {s: encode(tokenizer, funcs[s], arch.max_length) for s in labels}

    name = f"tune-{cfg.name}-{cfg.digest()}"
    storage = cfg.ray.storage_path or str((Path(cfg.output_dir) / "tune").resolve())
    refs = {
        "cache": ray.put({k: cache["train"][k] for k in ("expert_logits", "gate_logits")}),
        "enc": ray.put({s: enc[s] for s in ("train", "valid")}),
        "labels": ray.put({s: labels[s] for s in ("train", "valid")}),
        "search_name": name, "storage": storage,
    }
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=cfg.model_dump(mode="json"), refs=refs),
                                    {"cpu": 0.01})  # the trainable only waits; its Train workers hold the CPUs
    start = time.perf_counter()
    path = str(Path(storage) / name)
    if resume and tune.Tuner.can_restore(path):
        log(f"resuming search {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = make_tuner(cfg, trainable, name, storage)
    grid = tuner.fit()
    search_seconds = time.perf_counter() - start

    mode = "min" if cfg.tune.metric == "val_loss" else "max"
    best = grid.get_best_result(cfg.tune.metric, mode, scope="last")
    trials = [r for r in grid if r.metrics]
    source_runs = mlflow.tracking.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name(cfg.mlflow.experiment).experiment_id],
        filter_string=f"tags.`moekd.run_dir` = '{run_dir}'", max_results=1)
    with mlflow.start_run(run_name=name) as parent:
        mlflow.set_tags({"moekd.source_run_dir": str(run_dir), "moekd.search": name})
        tracking.log_config(cfg.model_dump(mode="json"))
        for result in trials:
            with tracking.stage_run(f"trial_{result.metrics['trial_id']}", result.config):
                rows = result.metrics_dataframe.to_dict("records")
                tracking.log_epochs([{k: v for k, v in r.items() if k.startswith(("val_", "train_loss"))} |
                                     {"epoch": r["epoch"]} for r in rows])
                mlflow.log_metric("trial_seconds", float(rows[-1]["time_total_s"]))
        tracking.log_figure(scatter_figure(
            [r.config.get("distill.temperature", cfg.distill.temperature) for r in trials],
            [r.metrics[cfg.tune.metric] for r in trials], "distillation temperature T", cfg.tune.metric,
            "each point a trial (last reported epoch)"), "search_T_vs_metric.png")
        trial_cost = float(np.mean([r.metrics["time_total_s"] for r in trials]))
        metrics = {"search_seconds": search_seconds, "mean_trial_seconds": trial_cost, "trials": len(trials)}
        if source_runs:
            # What a trial would cost if it retrained the experts and router as well.
            sm = source_runs[0].data.metrics
            metrics["retrain_experts_trial_seconds"] = trial_cost + sm.get("seconds_experts", 0) + sm.get(
                "seconds_router", 0) + sm.get("seconds_tokenizers", 0) + sm.get("seconds_partition", 0)
        mlflow.log_metrics(metrics)
        log(f"{len(trials)} trials in {search_seconds:.0f} s; mean trial {trial_cost:.0f} s"
            + (f" (retraining experts per trial: {metrics['retrain_experts_trial_seconds']:.0f} s)" if source_runs else ""))

        best_values = {k: best.config[k] for k in cfg.tune.space}
        student_dir = Path(cfg.output_dir) / name / "best_student"
        trial_storage = Path(storage) / f"{name}-{best.metrics['trial_id']}"
        checkpoints = sorted(p for p in trial_storage.glob("checkpoint_*") if p.is_dir())
        shutil.rmtree(student_dir, ignore_errors=True)
        shutil.copytree(checkpoints[-1], student_dir, ignore=shutil.ignore_patterns(ray_runtime.DEEPSPEED_DIR))
        student = load_model(student_dir)
        test = classification_metrics(labels["test"], probs1(predict_logits(student, enc["test"], cfg.eval.batch_size)))
        best_metrics = {**{k: float(best.metrics[k]) for k in ("val_accuracy", "val_f1")},
                        **{f"test_{k}": v for k, v in test.items()}, "size_mb": size_mb(student),
                        "params": float(num_params(student))}
        mlflow.log_metrics({f"best.{k}": v for k, v in best_metrics.items()})
        mlflow.log_params({f"best.{k}": v for k, v in best_values.items()})
        model_uri = None
        if cfg.tune.register_best and cfg.mlflow.registered_model:
            tok_dir = Path(cfg.output_dir) / name / "student_tokenizer"
            tokenizer.save_pretrained(str(tok_dir))
            model_uri = tracking.log_student_model(
                student_dir, tok_dir, cfg.with_values(best_values).model_dump(mode="json"),
                cfg.mlflow.registered_model, best_metrics, tags={"moekd.search_run_id": parent.info.run_id,
                                                              "moekd.data_hash": dataset_hash(data)},
            )
    log(f"best trial: {best_values} -> " + ", ".join(f"{k} {v:.3f}" for k, v in best_metrics.items()))
    log(f"student model: {model_uri}")
    return SearchResult(best_values, best_metrics, model_uri, parent.info.run_id)
