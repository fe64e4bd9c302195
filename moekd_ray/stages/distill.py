"""Stage: distil the student from the aggregated soft targets, in a Ray Train TorchTrainer running DeepSpeed ZeRO.

The ZeRO config is generated from `DistillConfig` (`deepspeed_config()`), written into the run folder, and used by
every worker. At the end of each epoch rank 0 saves the consolidated weights (gathered under ZeRO-3) as an HF
model in safetensors: that folder, less its deepspeed/ training state (for resuming), is the student. The
pipeline's entry is `distill_stage()`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from pydantic import Field

from moekd_ray import progress, ray_runtime
from moekd_ray.attacks.workers import substitute_pool
from moekd_ray.augment import adversarial_renamings, robust_transfer_set
from moekd_ray.config import MoEKDConfig
from moekd_ray.deepspeed_engine import (DEEPSPEED_TAG, DeepSpeedJob, deepspeed_config, deepspeed_step, gathered_state,
                                      save_deepspeed, start_deepspeed)
from moekd_ray.decision import decide_folder, decision_tags, load_decision
from moekd_ray.losses import consistency_loss, kd_loss
from moekd_ray.metrics import validation_metrics
from moekd_ray.models import build_model, load_model, num_params, size_mb
from moekd_ray.stages.context import RunContext
from moekd_ray.stages.tokenise import Encoded
from moekd_ray.train_loop import (BestEpoch, classifier_logits, make_loader, predict_logits, start_epoch,
                                  train_epoch)


class DistillJob(DeepSpeedJob):
    temperature: float = Field(gt=0)
    alpha: float = Field(ge=0, le=1)
    consistency_weight: float = Field(0.0, ge=0)
    task: str = Field(description="Its name on the console's status line.")


def distill_worker(config: dict) -> None:
    """Ray Train worker: DeepSpeed engine over the student, KD loss against the aggregated targets, the schedule's
    warm-up and decay. Each epoch's checkpoint holds the best epoch's student so far (rank 0, safetensors; by
    `keep_best_by` on validation) and DeepSpeed's latest state (every rank its ZeRO shard of the optimizer); after a
    restart the workers resume from that state. Early stopping after `patience` epochs without a better one."""
    job = DistillJob.model_validate(config)
    deepspeed = start_deepspeed(job)
    arch, sched = job.arch, job.schedule
    temperature, alpha, epochs = job.temperature, job.alpha, sched.epochs
    ctx = ray.train.get_context()
    train, valid = ray.get(job.train), ray.get(job.valid)

    restored, history = ray_runtime.restored_state()
    model = build_model(arch, job.seed)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=job.ds_config)
    if restored:  # weights (fp32 master copies under ZeRO) and optimizer state
        engine.load_checkpoint(str(restored / ray_runtime.DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    best_state = load_model(restored).state_dict() if restored and ctx.get_world_rank() == 0 else None
    best = BestEpoch(sched.keep_best_by, sched.patience, history)
    loader = ray.train.torch.prepare_data_loader(
        make_loader(train, job.ds_config["train_micro_batch_size_per_gpu"], shuffle=True, seed=job.seed)
    )

    def forward(model, batch, device):
        """The rows' logits; with consistency on, also their originals' (no gradient), stacked after them."""
        logits = classifier_logits(model, batch, device)
        if not job.consistency_weight or "has_pair" not in batch:  # (a transfer set without copies: KD only)
            return logits
        copies = batch["has_pair"].bool()
        if not copies.any():
            return logits
        with torch.no_grad():
            originals = model(input_ids=batch["pair_input_ids"][copies].long(),
                              attention_mask=batch["pair_attention_mask"][copies].long()).logits
        return torch.cat([logits, originals])

    def loss_fn(logits, batch):
        n = len(batch["input_ids"])
        loss = kd_loss(logits[:n].float(), batch["teacher"].float(), batch["labels"].long(), temperature, alpha)
        if job.consistency_weight and "has_pair" in batch:
            copies = batch["has_pair"].bool()
            loss = loss + job.consistency_weight * consistency_loss(logits[:n][copies].float(), logits[n:].float(),
                                                                    temperature)
        return loss

    resumed_from = len(history)
    step = deepspeed_step(engine, job, sched, len(loader), resumed_from)
    ticker = progress.Ticker(job.task, epochs * len(loader), enabled=ctx.get_world_rank() == 0)
    for epoch in range(resumed_from + 1, epochs + 1):
        if history and history[-1]["final"]:
            break  # stopped early before the restart
        start_epoch(loader, epoch, job.seed)
        stats = train_epoch(engine, loader, loss_fn, step, ticker.epoch(epoch, epochs), forward)
        val = validation_metrics(valid["labels"], predict_logits(engine, valid, job.eval_batch_size))
        better, stop = best.decide(epoch, {f"val_{k}": v for k, v in val.items()}, engine.device)  # rank 0's
        if better:
            best_state = gathered_state(engine, ctx.get_world_rank())
        metrics = {"epoch": epoch, **stats, **{f"val_{k}": v for k, v in val.items()}, "best_epoch": best.epoch,
                   "final": int(stop or epoch == epochs), "world_size": ctx.get_world_size(),
                   "zero_stage": engine.zero_optimization_stage(), "resumed_from": resumed_from}
        if ctx.get_world_rank() == 0:
            print(f"[student] epoch {epoch}/{epochs}: kd loss {stats['train_loss']:.4f}, "
                  f"{stats['samples_per_s']:.1f} samples/s/worker, val acc {val['accuracy']:.3f} f1 {val['f1']:.3f} "
                  f"auc {val['auc']:.3f}, best epoch {best.epoch}"
                  + (f"; no better {sched.keep_best_by} for {sched.patience} epochs: stopping" if stop else ""))
        ray_runtime.report_epoch(metrics, history,
                                 lambda folder: save_deepspeed(engine, folder, ctx.get_world_rank(), best_state))
        if stop:
            break


def distill_trainer(cfg: MoEKDConfig, enc: dict, labels: dict, teacher_probs: np.ndarray, name: str, storage: str,
                    callbacks: list | None = None, task: str = "student", max_failures: int | None = None):
    """The student's TorchTrainer (not yet fitted) on the transfer set (train split) with `teacher_probs` [N, 2]
    softened at T. `enc`/`labels` values may be arrays or Ray ObjectRefs of them (Tune trials pass refs). `task`:
    its name on the console's status line. `max_failures`: worker-group restarts (default `ray.max_failures`; a Tune
    trial's run takes ray_runtime.TRIAL_RUN_FAILURES)."""
    train = {**enc["train"], "labels": labels["train"], "teacher": teacher_probs.astype(np.float32)}
    job = DistillJob(
        name="student", task=task, arch=cfg.distill.arch(), schedule=cfg.distill.schedule,
        ds_config=deepspeed_config(cfg.distill), temperature=cfg.distill.temperature, alpha=cfg.distill.alpha,
        consistency_weight=cfg.distill.consistency_weight,
        eval_batch_size=cfg.eval.batch_size, threads=cfg.distill.resources.cpus_per_worker,
        cpu_shm_comm=cfg.distill.cpu_shm_comm, seed=cfg.seed, train=ray.put(train),
        valid=ray.put({**enc["valid"], "labels": labels["valid"]}), fault_injection=cfg.ray.fault_injection,
        fault_marker=ray_runtime.storage_join(storage, f"{name}.fault_injected"),
    )
    return ray_runtime.make_trainer(distill_worker, job.loop_config(), cfg.distill.resources, name, storage, callbacks,
                                    max_failures=cfg.ray.max_failures if max_failures is None else max_failures)


def distill_student(cfg: MoEKDConfig, enc: dict, labels: dict, teacher_probs: np.ndarray, run_dir: Path):
    """Fit the student; the DeepSpeed config is written into the run folder. Returns the Ray result."""
    (run_dir / "deepspeed_config.json").write_text(json.dumps(deepspeed_config(cfg.distill), indent=1))
    storage = ray_runtime.storage_path(cfg, run_dir)
    return distill_trainer(cfg, enc, labels, teacher_probs, f"{run_dir.name}-student", storage).fit()


def distill_stage(ctx: RunContext, enc: Encoded, targets: dict) -> tuple[torch.nn.Module, dict]:
    """Distil the student from the training split's soft targets (on resume: reuse the saved student) into the run
    folder's student/, with its decision threshold moved into its weights.
    Returns (the student, its decision: threshold and how it was chosen)."""
    cfg, run_dir, tracker = ctx.cfg, ctx.run_dir, ctx.tracker
    with ctx.timer("distill"), tracker.stage("distill", cfg.distill.model_dump(mode="json")):
        student_dir = run_dir / "student"
        if ctx.finished.student(student_dir):
            ctx.timer.reused("distill")
        else:
            result = fit_student(ctx, enc, targets["train"]["soft_targets"])
            tracker.log_epochs(ray_runtime.epoch_rows(result))
            tracker.log_artifact(run_dir / "deepspeed_config.json")
            # The decision threshold, chosen on validation, goes into the student's weights (models.shift_decision)
            # as the folder is written: a student folder is always one with its threshold applied.
            decision = ray_runtime.copy_atomically(result.checkpoint, student_dir, lambda folder: decide_folder(
                cfg.eval, folder, enc.student["valid"], ctx.labels["valid"]))
            ctx.log(f"student: decision threshold {decision['threshold']:.3f} (by validation {cfg.eval.threshold}), "
                    "moved into its weights")
        student = load_model(student_dir)
        decision = load_decision(student_dir)
        tracker.set_tags(decision_tags(decision))
        ctx.log(f"student: {num_params(student):,} parameters, {size_mb(student):.2f} MB (float32)")
    return student, decision


def fit_student(ctx: RunContext, enc: Encoded, soft: np.ndarray):
    """The Ray result of distilling on the transfer set: the training split, with renamed copies when
    `distill.augment_ratio` asks for them (augment.robust_transfer_set; their counts go to the stage's run)."""
    cfg, funcs, log = ctx.cfg, ctx.funcs, ctx.log
    pool = substitute_pool(cfg, funcs["train"]) if cfg.distill.augment_ratio else []
    enc_train, train_labels, teacher, copies = robust_transfer_set(
        cfg.distill, enc.student["train"], ctx.labels["train"], soft, funcs["train"], enc.student_tok,
        enc.student_max, pool, cfg.seed,
        lambda: adversarial_renamings(cfg, ctx.run_dir, "uniform", funcs["train"], soft, pool, log), log)
    if copies:
        ctx.tracker.log_metrics(copies)
    return distill_student(cfg, {**enc.student, "train": enc_train}, {**ctx.labels, "train": train_labels}, teacher,
                           ctx.run_dir)
