"""Stage: distil the student from the aggregated soft targets, in a Ray Train TorchTrainer running DeepSpeed ZeRO.

The ZeRO config is generated from `DistillConfig` (`deepspeed_config()`), written into the run folder, and used by
every worker. At the end of each epoch rank 0 saves the consolidated weights (gathered under ZeRO-3) as an HF
model in safetensors: that folder, less its deepspeed/ training state (for resuming), is the student.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F

from moekd_ray import ray_runtime
from moekd_ray.config import ArchConfig, DistillConfig, MoEKDConfig
from moekd_ray.losses import kd_loss
from moekd_ray.metrics import classification_metrics
from moekd_ray.models import build_model
from moekd_ray.train_loop import make_loader, predict_logits, probs1, start_epoch, train_epoch


DEEPSPEED_TAG = "state"  # DeepSpeed's subfolder name in each checkpoint's deepspeed/ folder


def deepspeed_config(cfg: DistillConfig) -> dict:
    """The DeepSpeed config for the distillation stage (one place: workers read exactly this)."""
    res, sched = cfg.resources, cfg.schedule
    return {
        "train_micro_batch_size_per_gpu": sched.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": sched.batch_size * res.num_workers,
        "optimizer": {
            "type": "AdamW",
            # On CPU, DeepSpeed's CPUAdam/FusedAdam are C++ builds that take ~2 min to compile on first use.
            "params": {"lr": sched.lr, "weight_decay": sched.weight_decay, "torch_adam": not res.use_gpu},
        },
        "zero_optimization": {"stage": cfg.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "gradient_clipping": 1.0,
        "bf16": {"enabled": cfg.bf16},
        "steps_per_print": 10**9,
    }


def _skip_cpu_shm_build() -> None:
    # DeepSpeed compiles a shared-memory allreduce op (~70 s) at every fresh init on CPU; gloo alone is correct.
    import deepspeed.comm  # noqa: F401  (loads the module object patched below)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def _weights_only_loads() -> None:
    """DeepSpeed's checkpoint loader calls torch.load(weights_only=False), which would unpickle anything: force
    weights-only loads in this worker, allowing the three DeepSpeed types its optimizer state holds."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    torch.serialization.add_safe_globals([LossScaler, ZeroStageEnum, fragment_address])


def distill_worker(config: dict) -> None:
    """Ray Train worker: DeepSpeed engine over the student, KD loss against the aggregated targets. Each epoch's
    checkpoint holds the student (rank 0, safetensors) and DeepSpeed's state (every rank its ZeRO shard of the
    optimizer); after a restart the workers resume from its epoch, weights and optimizer state."""
    if not config["cpu_shm_comm"] and not torch.cuda.is_available():
        _skip_cpu_shm_build()
    import deepspeed

    _weights_only_loads()
    torch.set_num_threads(max(int(config["threads"]), 1))
    arch = ArchConfig.model_validate(config["arch"])
    temperature, alpha, epochs = config["temperature"], config["alpha"], config["epochs"]
    ctx = ray.train.get_context()
    train, valid = ray.get(config["train"]), ray.get(config["valid"])

    restored, history = ray_runtime.restored_state()
    model = build_model(arch, config["seed"])
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config["ds_config"])
    if restored:  # weights (fp32 master copies under ZeRO) and optimizer state
        engine.load_checkpoint(str(restored / ray_runtime.DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    loader = ray.train.torch.prepare_data_loader(
        make_loader(train, config["ds_config"]["train_micro_batch_size_per_gpu"], shuffle=True, seed=config["seed"])
    )

    def loss_fn(logits, batch):
        return kd_loss(logits.float(), batch["teacher"].float(), batch["labels"].long(), temperature, alpha)

    def step(loss):
        engine.backward(loss)
        engine.step()

    def save(folder: str) -> None:
        engine.save_checkpoint(str(Path(folder) / ray_runtime.DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)
        # The gather is a collective under ZeRO-3 (every rank takes part) and a no-op for stages 0-2.
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            if ctx.get_world_rank() == 0:
                engine.module.save_pretrained(folder)

    resumed_from = len(history)
    step = ray_runtime.inject_fault(config, step, resumed_from * len(loader))
    for epoch in range(resumed_from + 1, epochs + 1):
        start_epoch(loader, epoch, config["seed"])
        stats = train_epoch(engine, loader, loss_fn, step)
        val_logits = predict_logits(engine, valid, 64)
        val = classification_metrics(valid["labels"], probs1(val_logits))
        labels = torch.from_numpy(np.array(valid["labels"])).long()  # a copy: object-store arrays are read-only
        val["loss"] = float(F.cross_entropy(torch.from_numpy(val_logits), labels))
        metrics = {"epoch": epoch, **stats, **{f"val_{k}": v for k, v in val.items()},
                   "world_size": ctx.get_world_size(), "zero_stage": engine.zero_optimization_stage(),
                   "resumed_from": resumed_from}
        print(f"[student] epoch {epoch}/{epochs}: kd loss {stats['train_loss']:.4f}, "
              f"{stats['samples_per_s']:.1f} samples/s/worker, val acc {val['accuracy']:.3f} f1 {val['f1']:.3f}")
        ray_runtime.report_epoch(metrics, history, save)


def distill_trainer(cfg: MoEKDConfig, enc: dict, labels: dict, teacher_probs: np.ndarray, name: str, storage: str,
                    callbacks: list | None = None):
    """The student's TorchTrainer (not yet fitted) on the transfer set (train split) with `teacher_probs` [N, 2]
    softened at T. `enc`/`labels` values may be arrays or Ray ObjectRefs of them (Tune trials pass refs)."""
    train = {**enc["train"], "labels": labels["train"], "teacher": teacher_probs.astype(np.float32)}
    loop_config = {
        "arch": cfg.distill.arch().model_dump(),
        "ds_config": deepspeed_config(cfg.distill),
        "temperature": cfg.distill.temperature,
        "alpha": cfg.distill.alpha,
        "epochs": cfg.distill.schedule.epochs,
        "threads": cfg.distill.resources.cpus_per_worker,
        "cpu_shm_comm": cfg.distill.cpu_shm_comm,
        "seed": cfg.seed,
        "train": ray.put(train),
        "valid": ray.put({**enc["valid"], "labels": labels["valid"]}),
        "name": "student",
        "fault_injection": cfg.ray.fault_injection,
        "fault_marker": str(Path(storage) / f"{name}.fault_injected"),
    }
    return ray_runtime.make_trainer(distill_worker, loop_config, cfg.distill.resources, name, storage, callbacks,
                                    max_failures=cfg.ray.max_failures)


def distill_student(cfg: MoEKDConfig, enc: dict, labels: dict, teacher_probs: np.ndarray, run_dir: Path):
    """Fit the student; the DeepSpeed config is written into the run folder. Returns the Ray result."""
    (run_dir / "deepspeed_config.json").write_text(json.dumps(deepspeed_config(cfg.distill), indent=1))
    storage = ray_runtime.storage_path(cfg, run_dir)
    return distill_trainer(cfg, enc, labels, teacher_probs, f"{run_dir.name}-student", storage).fit()
