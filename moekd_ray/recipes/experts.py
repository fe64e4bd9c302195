"""Stage: train the K experts, each in its own Ray Train TorchTrainer, all K at once; then their logits.

Worker side: `expert_worker(config)` is plain PyTorch around `train_epoch`/`predict_logits` (DDP through Ray when
an expert has several workers). Driver side: `train_experts()` builds one trainer per expert and fits them
concurrently; `expert_logits()` runs each trained expert over every split as a Ray task.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from pydantic import TypeAdapter

from moekd_ray import ray_runtime
from moekd_ray.config import ModelSource, MoEKDConfig, Schedule
from moekd_ray.metrics import classification_metrics
from moekd_ray.models import build_model, load_model
from moekd_ray.train_loop import (make_loader, predict_logits, probs1, start_epoch, torch_step, train_epoch,
                                  weighted_ce)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def expert_worker(config: dict) -> None:
    """Ray Train worker: train one expert, report val metrics and an HF checkpoint (safetensors, plus the optimizer
    state) every epoch. After a restart it resumes from the latest checkpoint's epoch, weights and optimizer."""
    # Wall clock when this worker came up, so that overlapping (concurrent) expert runs can be seen afterwards.
    started_at = time.time()
    spec = TypeAdapter(ModelSource).validate_python(config["model"])
    sched = Schedule.model_validate(config["schedule"])
    torch.set_num_threads(max(int(config["threads"]), 1))
    ctx = ray.train.get_context()
    train, valid = ray.get(config["train"]), ray.get(config["valid"])

    restored, history = ray_runtime.restored_state()
    model = ray.train.torch.prepare_model(load_model(restored) if restored else build_model(spec, config["seed"]))
    loader = ray.train.torch.prepare_data_loader(make_loader(train, sched.batch_size, shuffle=True, seed=config["seed"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=sched.lr, weight_decay=sched.weight_decay)
    if restored:
        optimizer.load_state_dict(torch.load(restored / ray_runtime.OPTIMIZER_FILE, weights_only=True))
    name = config["name"]
    started_at = history[0]["started_at"] if history else started_at

    def save(folder: str) -> None:
        unwrap(model).save_pretrained(folder)
        torch.save(optimizer.state_dict(), Path(folder) / ray_runtime.OPTIMIZER_FILE)

    resumed_from = len(history)  # epochs already done (0 on a fresh start)
    step = ray_runtime.inject_fault(config, torch_step(optimizer), resumed_from * len(loader))
    for epoch in range(resumed_from + 1, sched.epochs + 1):
        start_epoch(loader, epoch, config["seed"])
        stats = train_epoch(model, loader, weighted_ce, step)
        val = classification_metrics(valid["labels"], probs1(predict_logits(unwrap(model), valid, 64)))
        metrics = {"epoch": epoch, **stats, **{f"val_{k}": v for k, v in val.items()},
                   "started_at": started_at, "finished_at": time.time(), "resumed_from": resumed_from}
        print(f"[{name}] epoch {epoch}/{sched.epochs}: loss {stats['train_loss']:.4f}, "
              f"{stats['samples_per_s']:.1f} samples/s, val acc {val['accuracy']:.3f} f1 {val['f1']:.3f}"
              + (f" (resumed after epoch {resumed_from})" if restored else ""))
        ray_runtime.report_epoch(metrics, history, save if ctx.get_world_rank() == 0 else None)


def part_arrays(enc: dict[str, np.ndarray], labels: np.ndarray, parts: np.ndarray, k: int, cfg: MoEKDConfig) -> dict:
    """The rows (and per-row loss weights) expert k trains on."""
    if cfg.experts.train_on == "part":
        rows = parts == k
        return {**{n: a[rows] for n, a in enc.items()}, "labels": labels[rows]}
    weight = np.where(parts == k, cfg.experts.part_weight, 1.0).astype(np.float32)
    return {**enc, "labels": labels, "weight": weight}


def expert_trainers(cfg: MoEKDConfig, enc: list[dict], labels: dict, parts: np.ndarray, name: str,
                    storage: str) -> list:
    """One TorchTrainer per expert (not yet fitted). enc[k] holds expert k's encoded splits (its own tokenizer)."""
    trainers = []
    for k, spec in enumerate(cfg.experts.specs()):
        loop_config = {
            "name": f"expert_{k}",
            "model": spec.model_dump(),
            "schedule": cfg.experts.schedule.model_dump(),
            "threads": cfg.experts.resources.cpus_per_worker,
            "seed": cfg.seed + k,
            "train": ray.put(part_arrays(enc[k]["train"], labels["train"], parts, k, cfg)),
            "valid": ray.put({**enc[k]["valid"], "labels": labels["valid"]}),
            "fault_injection": cfg.ray.fault_injection,
            "fault_marker": str(Path(storage) / f"{name}-expert_{k}.fault_injected"),
        }
        trainers.append(ray_runtime.make_trainer(expert_worker, loop_config, cfg.experts.resources,
                                                 f"{name}-expert_{k}", storage, max_failures=cfg.ray.max_failures))
    return trainers


def train_experts(cfg: MoEKDConfig, enc: list[dict], labels: dict, parts: np.ndarray,
                  run_dir: Path) -> tuple[list, list[float]]:
    """Fit the K experts concurrently; returns their Ray Train results (checkpoint + per-epoch metrics) and the
    wall-clock time each run finished."""
    storage = ray_runtime.storage_path(cfg, run_dir)
    return ray_runtime.fit_all(expert_trainers(cfg, enc, labels, parts, run_dir.name, storage))


@ray.remote
def _expert_logits_task(checkpoint: ray.train.Checkpoint, splits: dict, batch_size: int, threads: int) -> dict:
    torch.set_num_threads(max(threads, 1))
    with checkpoint.as_directory() as folder:
        model = load_model(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    return {name: predict_logits(model, ray.get(ref), batch_size) for name, ref in splits.items()}


def expert_logits(cfg: MoEKDConfig, checkpoints: list, enc: list[dict]) -> dict[str, np.ndarray]:
    """Per split, the logits of every expert: [N, K, 2]. One Ray task per expert, all at once."""
    res = cfg.experts.resources
    task = _expert_logits_task.options(num_cpus=res.cpus_per_worker, num_gpus=1 if res.use_gpu else 0,
                                       resources=res.custom)
    refs = [task.remote(c, {name: ray.put(a) for name, a in enc_k.items()}, cfg.eval.batch_size,
                        int(res.cpus_per_worker)) for c, enc_k in zip(checkpoints, enc)]
    outs = ray.get(refs)
    return {name: np.stack([o[name] for o in outs], axis=1) for name in enc[0]}
