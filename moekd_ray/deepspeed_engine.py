"""DeepSpeed in a Ray Train worker: the ZeRO config a stage's workers share, the engine's setup on this machine, its
learning-rate schedule, and checkpoints that hold both DeepSpeed's state (for resuming) and the consolidated float32
weights (gathered under ZeRO-3). Used by the distillation and the pretraining stages.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from pydantic import Field

from moekd_ray import ray_runtime
from moekd_ray.config import ArchConfig, DistillConfig, PretrainConfig, Schedule
from moekd_ray.models import save_float32
from moekd_ray.train_loop import scheduled


DEEPSPEED_TAG = "state"  # DeepSpeed's subfolder name in each checkpoint's deepspeed/ folder


def deepspeed_config(cfg: DistillConfig | PretrainConfig) -> dict:
    """The DeepSpeed config of the distillation (or pretraining) stage (one place: workers read exactly this)."""
    res, sched = cfg.resources, cfg.schedule
    return {
        "train_micro_batch_size_per_gpu": sched.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": sched.batch_size * res.num_workers,
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW on CPU and GPU alike: DeepSpeed's FusedAdam/CPUAdam are C++/CUDA ops compiled on first
            # use (~2 min on CPU; on a GPU node it needs nvcc, ninja and a matching CUDA_HOME, which a pip install
            # with DS_BUILD_OPS=0 does not bring), for no gain worth it on students of a few MB.
            "params": {"lr": sched.lr, "weight_decay": sched.weight_decay, "torch_adam": True},
        },
        "zero_optimization": {"stage": cfg.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "gradient_clipping": sched.grad_clip or 0.0,  # 0: off
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


class DeepSpeedJob(ray_runtime.WorkerJob):
    arch: ArchConfig
    schedule: Schedule
    ds_config: dict = Field(description="deepspeed_config() of the stage: ZeRO stage, micro-batch, clipping.")
    cpu_shm_comm: bool


def start_deepspeed(job: DeepSpeedJob):
    """In a worker: the deepspeed module, set up for this machine (no shm op build on CPU; weights-only loads)."""
    if not job.cpu_shm_comm and not torch.cuda.is_available():
        _skip_cpu_shm_build()
    import deepspeed

    _weights_only_loads()
    torch.set_num_threads(max(int(job.threads), 1))
    return deepspeed


def master_weights(engine) -> dict[int, torch.Tensor]:
    """Each parameter's full fp32 master copy, by id(parameter) (a collective under ZeRO: every rank takes part);
    absent where the optimizer keeps none (fp32 without ZeRO: the module's weights are the master)."""
    from deepspeed.utils import safe_get_full_fp32_param

    opt = engine.optimizer
    # bf16 without ZeRO (DeepSpeed's unfused wrapper around a torch optimizer): parallel lists of bf16 and fp32 params
    master = {id(lp): hp for lps, hps in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []))
              for lp, hp in zip(lps, hps)}
    for p in engine.module.parameters():
        if id(p) not in master:
            full = safe_get_full_fp32_param(p)  # ZeRO 1-3 and DeepSpeed's BF16_Optimizer
            if full is not None:
                master[id(p)] = full
    return master


def gathered_state(engine, rank: int) -> dict | None:
    """The full model weights on rank 0, in float32 on the CPU (a collective: every rank takes part).

    Under bf16 the module holds bf16 copies; the weights kept are the optimizer's fp32 master weights, so the saved
    student is the float32 model that was trained (its size, its folded threshold and every scorer's arithmetic)."""
    import deepspeed

    master = master_weights(engine)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        if rank == 0:
            state = {}
            for k, v in engine.module.state_dict(keep_vars=True).items():  # by identity: tied weights share a master
                v = master.get(id(v), v)
                state[k] = v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype, copy=True)
            return state
    return None


def deepspeed_step(engine, job: DeepSpeedJob, sched: Schedule, steps_per_epoch: int, epochs_done: int):
    """`step(loss)` (backward + optimizer step) for a DeepSpeed engine, on the schedule's learning-rate curve from
    where a restarted run resumes, with the tests' fault injection."""
    def step(loss):
        engine.backward(loss)
        engine.step()

    steps_done = epochs_done * steps_per_epoch
    step = scheduled(step, engine.optimizer.param_groups, sched, sched.epochs * steps_per_epoch, steps_done)
    return ray_runtime.inject_fault(job, step, steps_done)


def save_deepspeed(engine, folder: str, rank: int, best_state: dict | None) -> None:
    """A checkpoint: every rank's DeepSpeed state (for resuming) and, from rank 0, the best weights as an HF model."""
    engine.save_checkpoint(str(Path(folder) / ray_runtime.DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)
    if rank == 0:
        save_float32(engine.module, folder, best_state)
