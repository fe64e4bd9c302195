"""The MoEKD pipeline, top to bottom: data -> tokenizers -> partition -> experts -> router + aggregate -> distil ->
evaluate -> register. One MLflow parent run, a nested run per stage and per expert. Each stage is one call into
stages/, which reuses what an interrupted run finished and writes the stage's MLflow run itself.

    moekd run jobs/quickstart.yaml
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from moekd_ray import console, ray_runtime, tracking
from moekd_ray.config import MoEKDConfig, PretrainedConfig, dump_yaml, load_config
from moekd_ray.data import describe, load_devign, split_records
from moekd_ray.errors import ConfigError
from moekd_ray.metrics import size_accuracy_figure
from moekd_ray.models import build_model
from moekd_ray.stages.aggregate import router_stage
from moekd_ray.stages.attack import attack_stage
from moekd_ray.stages.context import RunContext
from moekd_ray.stages.distill import distill_stage
from moekd_ray.stages.evaluate import degenerate_models, evaluate_stage, format_table, markdown_table
from moekd_ray.stages.experts import experts_stage
from moekd_ray.stages.partition_stage import partition_stage
from moekd_ray.stages.pretrain import with_pretrained_encoder
from moekd_ray.stages.register import register_stage
from moekd_ray.stages.tokenise import tokenizers_stage
from moekd_ray.tokenization import load_tokenizer


@dataclass
class PipelineResult:
    run_dir: Path
    run_id: str
    model_uri: str | None
    table: list[dict] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)


def run_pipeline(cfg: MoEKDConfig, log=print, resume: str | None = None) -> PipelineResult:
    """The whole pipeline; `resume` (a run folder or MLflow run id of this config) continues an interrupted run:
    finished stages are reused from its folder, an unfinished Ray Train run resumes from its latest checkpoint."""
    # Every check before anything is written (not even the tracking store): every data row, then any model that
    # cannot be had (offline, misspelt, weights not safetensors; loading it once in the driver costs seconds).
    data = load_devign(cfg.data, cfg.seed)
    for spec in {s.name_or_path: s for s in cfg.experts.specs() if isinstance(s, PretrainedConfig)}.values():
        load_tokenizer(spec.name_or_path)
        build_model(spec, cfg.seed)
    experiment_id = tracking.connect(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)  # an unreachable server: here
    cfg = with_pretrained_encoder(cfg, log, data)  # experts with `source: pretrain`: its folder (pretrained, or reused)
    run_dir, parent_id = resume_target(cfg, resume, log) if resume else (
        Path(cfg.output_dir) / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}-{cfg.digest()}", None)
    log(f"data: {describe(data)}")
    if not resume:
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg.model_dump(mode="json")))
    console.attach_log(run_dir / console.LOG_FILE)  # with `moekd run`: Ray's, DeepSpeed's, the libraries' lines there
    ray_runtime.init_ray(cfg)
    ray_runtime.check_bf16(cfg, ("experts", "distill"))  # a GPU without bf16: one line before any training

    # Every MLflow write goes through the tracker: if the server stops answering, they are spooled in the run
    # folder and training goes on (`moekd sync <run folder>` completes the MLflow run).
    tracker = tracking.Tracker(run_dir, experiment_id, log, cfg.mlflow.tracking_uri)
    ctx = RunContext.start(cfg, data, run_dir, tracker, bool(resume), log)
    with tracker.run(parent_id, cfg.name) as run_id:
        log(f"run folder {run_dir}, MLflow run {run_id}" + (" (resumed)" if resume else ""))
        log(f"full log: {run_dir / console.LOG_FILE}")
        if parent_id is None:  # a new MLflow run (also when the resumed folder's run is not in this store)
            tracker.set_tags({"moekd.config_digest": cfg.digest(), "moekd.run_dir": str(run_dir.resolve())})
            tracker.log_config(cfg.model_dump(mode="json"))
            tracker.log_inputs(split_records(cfg.data, data))  # the UI's Datasets: what trained and tested it

        enc = tokenizers_stage(ctx)
        features, parts = partition_stage(ctx)
        checkpoints = experts_stage(ctx, enc.experts, parts)
        targets = router_stage(ctx, checkpoints, enc.experts, features, parts)
        student, decision = distill_stage(ctx, enc, targets)
        rows = evaluate_stage(ctx, checkpoints, targets, student, enc)
        if cfg.attack.in_pipeline:
            attack_stage(ctx, rows)
        model_uri, champion = register_stage(ctx, decision, rows)
        summarise(ctx, rows, model_uri, champion)
        return PipelineResult(run_dir, run_id, model_uri, rows, ctx.timer.seconds)


def summarise(ctx: RunContext, rows: list[dict], model_uri: str | None, champion: str) -> None:
    """The parent run's last writes (each stage's seconds and status; what the MLflow UI shows first: the final table
    as the run's description, and accuracy against size, with the attack success rate where it was measured) and
    the console's last lines (the table, the degenerate warnings again, the student model)."""
    cfg, tracker, timer, log = ctx.cfg, ctx.tracker, ctx.timer, ctx.log
    tracker.log_metrics({f"seconds_{k}": v for k, v in timer.seconds.items()})
    tracker.set_tags({f"moekd.stage.{k}": v for k, v in timer.status.items()})
    asr_key = f"asr_{cfg.attack.method}" if cfg.attack.in_pipeline else None
    tracker.set_tags({"mlflow.note.content": markdown_table(rows, asr_key)})
    tracker.log_figure(size_accuracy_figure(rows, f"{cfg.name}: test accuracy against size", asr_key),
                       "accuracy_vs_size.png")
    log(format_table(rows))
    for name, why in degenerate_models(rows).items():
        log(f"warning: {name} is degenerate: it {why}")
    log(f"student model: {model_uri or 'registered by `moekd sync` (the tracking server is unreachable)'}"
        + champion)


def resume_target(cfg: MoEKDConfig, spec: str, log=print) -> tuple[Path, str | None]:
    """The run folder and MLflow run to continue; the run must have been made with this very config. MLflow writes
    spooled during a tracking outage are replayed first (as `moekd sync` would)."""
    run = tracking.pipeline_run(spec, "--resume")
    if run is None:
        raise ConfigError(f"--resume {spec}: neither a run folder (with config.yaml) nor an MLflow run id")
    folder, run_id = run
    saved = load_config(folder / "config.yaml")
    if saved.digest() != cfg.digest():
        raise ConfigError(f"--resume {spec}: that run used config {saved.digest()}, this config is {cfg.digest()}; "
                          f"resume with the run's own config: moekd run {folder / 'config.yaml'} --resume {spec}")
    replayed = tracking.replay_spool(folder, cfg.mlflow.tracking_uri)
    if replayed:
        run_id = replayed[0]
        log(f"replayed {replayed[1]} MLflow writes spooled during a tracking outage onto MLflow run {run_id}")
    return folder, run_id
