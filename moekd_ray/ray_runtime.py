"""Every Ray call outside the worker functions: start or join a cluster, build trainers, run fits concurrently."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pydantic import BaseModel, ConfigDict, Field

from moekd_ray.config import MoEKDConfig, ResourcesConfig
from moekd_ray.errors import ConfigError
from moekd_ray.process_group import LOOPBACK, environment, free_port

if TYPE_CHECKING:
    from ray import tune


def init_ray(cfg: MoEKDConfig) -> None:
    """Join the configured cluster (config, then $RAY_ADDRESS) or start a local one with its dashboard on 127.0.0.1."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        joined = ray.get_runtime_context().gcs_address
        if cfg.ray.address and cfg.ray.address not in (joined, "auto"):
            raise ConfigError(f"ray.address={cfg.ray.address}, but this process is already connected to the Ray "
                              f"cluster at {joined}; set ray.address={joined} or run in a new process")
        return
    # Train V2 polls workers every 2 s by default; on a small local run that is most of the fixed overhead. Read by
    # the processes a local Ray starts from here (a cluster's own settings stay as its operator made them).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    quiet = {"log_to_driver": True, "configure_logging": True, "logging_level": "WARNING"}
    if address:
        ray.init(address=address, **quiet)
        return
    # Processes of this local cluster find its dashboard (the state API) by this address instead of searching the
    # machine: Ray Train's placement-group cleaner, which frees a stopped run's CPUs (a trial ASHA stopped, a killed
    # driver), otherwise dies on "Found multiple active Ray instances" when another Ray runs here, or on a stale
    # address file, and the CPUs stay held until the driver exits. Set only while ray.init starts the processes
    # (they keep it; workers inherit it from the raylet), so this process's own environment is unchanged.
    dashboard_port = free_port()
    with environment(RAY_API_SERVER_ADDRESS=f"http://{LOOPBACK}:{dashboard_port}"):
        ray.init(num_cpus=cfg.ray.num_cpus, dashboard_host=LOOPBACK, dashboard_port=dashboard_port, **quiet)


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


TRIAL_CPU = 0.01  # a Tune trial's own actor only waits; its Ray Train workers hold the CPUs
# The Ray Train run inside a Tune trial never restarts its own workers; Tune reruns the trial instead
# (trial_run_config). Tune stops a trial (ASHA) by ending its actor, and the run's workers die with it: a controller
# that restarts them in that moment places a new placement group that nothing removes (ray-project/ray#62753), so
# its CPUs stay held until the driver exits (seen in this suite: 0.45 CPU, and the next 2-worker run never placed).
TRIAL_RUN_FAILURES = 0


def trial_run_config(cfg: MoEKDConfig, name: str, storage: str, callbacks: list) -> tune.RunConfig:
    """A search's Tune RunConfig: a failed trial is rerun up to `ray.max_failures` times (see TRIAL_RUN_FAILURES)."""
    from ray import tune

    return tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks,
                          failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures))


def check_trial_fits(cfg: MoEKDConfig, resources: ResourcesConfig, option: str) -> None:
    """On a local cluster (nothing autoscales), refuse a Tune trial whose Train workers can never be placed: Ray
    Train would otherwise retry their start every 60 s forever."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return
    total = ray.cluster_resources()
    need = {"CPU": resources.num_workers * resources.cpus_per_worker + TRIAL_CPU,
            **({"GPU": resources.num_workers} if resources.use_gpu else {}),
            **{k: v * resources.num_workers for k, v in resources.custom.items()}}
    short = [f"{v:g} {k} of {total.get(k, 0):g}" for k, v in need.items() if v > total.get(k, 0) + 1e-9]
    if short:
        raise ConfigError(f"{option}: a trial needs {', '.join(short)} on this cluster ({resources.num_workers} workers "
                          f"x {resources.cpus_per_worker:g} CPUs + {TRIAL_CPU} for the trial); lower "
                          f"{option}.num_workers or {option}.cpus_per_worker (e.g. 0.95)")


def storage_path(cfg: MoEKDConfig, folder: Path, default: str = "ray") -> str:
    """Where the Ray Train runs of the run (search, benchmark) in `folder` are stored: `ray.storage_path` (shared
    storage on a cluster: a folder or a URI such as s3://bucket/moekd) if set, else <folder>/<default>. Every
    reader and writer of checkpoints asks here. A URI is a string, never a Path (Path("s3://b/x") is "s3:/b/x"):
    join it with `storage_join`, read it through Ray (`saved_result`, ray.train.Checkpoint)."""
    return cfg.ray.storage_path or str((folder / default).resolve())


def is_uri(storage: str) -> bool:
    return "://" in storage


def storage_join(storage: str, *names: str) -> str:
    """storage/names, for a folder or a URI (a URI's ?query stays at its end)."""
    if not is_uri(storage):
        return str(Path(storage).joinpath(*names))
    base, sep, query = storage.partition("?")
    return "/".join([base.rstrip("/"), *names]) + sep + query


def run_storage(cfg: MoEKDConfig, run_dir: Path, member: str) -> str:
    """Where the pipeline run in `run_dir` stored its Ray Train run `member` (expert_<k>, expert_<k>_fold_<f>,
    student): each is named <run folder name>-<member> (experts.train_experts, distill.distill_student)."""
    return storage_join(storage_path(cfg, run_dir), f"{run_dir.name}-{member}")


def local_folder(checkpoint: ray.train.Checkpoint) -> Path:
    """A local folder holding `checkpoint`: its own folder on a local (or shared, mounted) filesystem, else a copy
    downloaded to a temporary folder (s3:// and other remote storage)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path)
    return Path(checkpoint.to_directory())


def worker_nodes(resources: ResourcesConfig) -> list[dict]:
    """The alive nodes (ray.nodes() rows) that can hold one worker of `resources` (its CPUs, a GPU with use_gpu,
    its custom resources): where that stage's workers may be placed."""
    need = {**({"GPU": 1} if resources.use_gpu else {}), "CPU": resources.cpus_per_worker, **resources.custom}
    return [n for n in ray.nodes()
            if n["Alive"] and all(n["Resources"].get(key, 0) >= amount for key, amount in need.items())]


def bf16_problem(key: str, gpu: str, supported: bool) -> str | None:
    """The one line refusing `key` (a stage's bf16) on a GPU without bf16 (torch.cuda.is_bf16_supported(): compute
    capability 8.0 or newer), or None where it has bf16."""
    if supported:
        return None
    return (f"{key}: {gpu} has no bf16 (it needs compute capability 8.0+: A100, A10, L4, H100, ...); set {key}=false "
            "or run that stage on such GPUs")


@ray.remote(num_cpus=0)
def _gpu_here() -> tuple[str, bool] | None:
    """On one node: its GPU's name and whether it has bf16; None if this process sees no GPU (a zero-GPU task sees
    the node's GPUs unless RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO is set)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(), torch.cuda.is_bf16_supported()


def check_bf16(cfg: MoEKDConfig, stages: tuple[str, ...], timeout_s: float = 120, probe=_gpu_here) -> None:
    """Before any training: every GPU node that the workers of `stages` (experts, distill, pretrain) with bf16 on
    and use_gpu may use has bf16; else one line naming `<stage>.bf16` (ConfigError). A node that does not answer
    within `timeout_s` is not checked (the experts' workers refuse at their first step instead). `probe`: the
    remote function asked on each node (tests)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    keys = {f"{s}.bf16": getattr(cfg, s).resources for s in stages
            if getattr(cfg, s).bf16 and getattr(cfg, s).resources.use_gpu}
    nodes = {n["NodeID"]: n for res in keys.values() for n in worker_nodes(res)}
    probes = {node_id: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
              .remote() for node_id in nodes}
    ready, late = ray.wait(list(probes.values()), num_returns=len(probes), timeout=timeout_s) if probes else ([], [])
    for ref in late:
        ray.cancel(ref)
    for node_id, ref in probes.items():
        if ref not in ready or (found := ray.get(ref)) is None:
            continue
        for key, res in keys.items():
            problem = bf16_problem(key, f"{found[0]} on node {nodes[node_id]['NodeManagerAddress']}", found[1])
            if problem and node_id in {n["NodeID"] for n in worker_nodes(res)}:
                raise ConfigError(problem)


class WorkerJob(BaseModel):
    """What a Ray Train worker receives, validated where it runs: a config the driver got wrong (or one from
    another version of moekd) fails at once, naming the field, instead of deep inside training. Each stage's
    worker has its own (stages.experts.ExpertJob, stages.distill.DistillJob, stages.pretrain.PretrainJob)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    name: str = Field(description="The run's name in logs, progress and fault injection.")
    seed: int
    threads: float = Field(gt=0, description="CPU threads per worker (torch.set_num_threads, at least 1).")
    eval_batch_size: int = Field(ge=1)
    train: Any = Field(description="A Ray ObjectRef of the training arrays (or the arrays).")
    valid: Any = Field(description="A Ray ObjectRef of the validation arrays (or the arrays).")
    fault_injection: str | None = None
    fault_marker: str

    def loop_config(self) -> dict:
        """The dict Ray Train hands the worker (ObjectRefs as they are)."""
        return {name: getattr(self, name) for name in type(self).model_fields}


def make_trainer(train_func: Callable[[dict], None], loop_config: dict, resources: ResourcesConfig, name: str,
                 storage: str, callbacks: list | None = None, max_failures: int = 0) -> TorchTrainer:
    """One Ray Train run: `resources.num_workers` workers, each with its CPUs (and a GPU when use_gpu).
    `callbacks`: e.g. Tune's TuneReportCallback, when the trainer runs inside a Tune trial. After a worker dies,
    Ray restarts the group up to `max_failures` times and the workers resume from the latest checkpoint
    (`restored_state`)."""
    per_worker = {"CPU": resources.cpus_per_worker, **resources.custom}
    if resources.use_gpu:
        per_worker["GPU"] = 1
    return TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers, use_gpu=resources.use_gpu, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),  # workers print their own per-epoch lines
            callbacks=callbacks,
        ),
    )


def fit_as_completed(trainers: dict) -> Iterator[tuple]:
    """fit() every trainer of {key: trainer} at once, one driver thread each (Ray queues the ones the cluster cannot
    place yet); yields (key, result) as each one ends, so the caller can use a result while the others go on."""
    with ThreadPoolExecutor(max_workers=max(len(trainers), 1)) as pool:
        futures = {pool.submit(trainer.fit): key for key, trainer in trainers.items()}
        for future in as_completed(futures):
            yield futures[future], future.result()


def fit_all(trainers: list[TorchTrainer]) -> tuple[list, list[float]]:
    """fit() every trainer at once (fit_as_completed). Returns the results in order and, per trainer, the wall-clock
    time its fit() returned (so concurrency can be checked)."""
    done = {i: (result, time.time()) for i, result in fit_as_completed(dict(enumerate(trainers)))}
    return [done[i][0] for i in range(len(trainers))], [done[i][1] for i in range(len(trainers))]


HISTORY_FILE = "metrics_history.json"
OPTIMIZER_FILE = "optimizer.pt"
# An expert checkpoint's top level is the best epoch's model (what every consumer loads); its latest/ folder is the
# latest epoch's weights and optimizer state, from which a restarted run continues.
LATEST_DIR = "latest"
# A student checkpoint's DeepSpeed state (each rank's ZeRO shard of the optimizer): training state, not the model.
DEEPSPEED_DIR = "deepspeed"


def restored_state() -> tuple[Path | None, list[dict]]:
    """Worker side, at start: the latest checkpoint (copied to a local folder) and the epochs it holds, when Ray
    restarted this run after a failure; (None, []) on a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, []
    folder = Path(tempfile.mkdtemp(prefix="moekd-restore-"))
    checkpoint.to_directory(str(folder))
    return folder, json.loads((folder / HISTORY_FILE).read_text())


def inject_fault(job: WorkerJob, step: Callable, steps_done: int) -> Callable:
    """Testing (ray.fault_injection = "<run>:<step>"): `step` (backward + optimizer step) wrapped so that rank 0 of
    that run exits hard, once, on reaching that optimizer step (counted over the whole run, from 1): mid-epoch, as a
    killed worker process would, before that epoch's checkpoint exists. `steps_done`: the steps of the epochs a
    restart resumes after. The marker file makes "once" survive the restart."""
    run, _, at = (job.fault_injection or "").rpartition(":")
    marker = Path(job.fault_marker)
    if run != job.name or ray.train.get_context().get_world_rank() != 0 or marker.exists():
        return step
    done = steps_done

    def step_or_exit(loss) -> None:
        nonlocal done
        done += 1
        if done == int(at):
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"killed at step {done}")
            _wait_until_last_checkpoint_registered()
            os._exit(1)
        step(loss)

    return step_or_exit


def _wait_until_last_checkpoint_registered(timeout_s: float = 60) -> None:
    """The controller takes a report when it next polls the worker, then saves its state next to the checkpoints; a
    worker that dies before that loses the report. A real mid-epoch failure comes long after: wait until the saved
    state names this worker's last checkpoint (local storage, as in the tests)."""
    last = ray.train.get_checkpoint()
    if last is None:
        return
    state = Path(last.path).parent / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout_s
    while not (state.is_file() and Path(last.path).name in state.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)


def report_epoch(metrics: dict, history: list[dict], save: Callable[[str], None] | None) -> None:
    """Worker side: `ray.train.report` this epoch's metrics with a checkpoint from each rank that passes `save` (it
    writes that rank's files into a folder; Ray merges the ranks' folders). Rank 0's part also holds every epoch's
    metrics so far, so the history survives Ray keeping only the latest checkpoint (like HF Trainer's
    trainer_state.json)."""
    history.append(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if save is not None:
            save(tmp)
            if ray.train.get_context().get_world_rank() == 0:
                (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def saved_result(folder: str | Path):
    """Driver side: the Ray Train run stored in `folder` (a path or URI, see `run_storage`) as Ray recorded it, or
    None if it reported no checkpoint. Its checkpoint is the latest one *reported*: a folder that a killed worker
    wrote but never reported is not taken (it may be partly written; it is what a restart of that run redoes)."""
    try:
        result = ray.train.Result.from_path(str(folder))
    except RuntimeError:  # no such folder, or nothing reported yet
        return None
    return result if result.checkpoint is not None else None


def epoch_rows(result) -> list[dict]:
    """Driver side: the per-epoch metrics of a finished Ray Train run, from its latest checkpoint."""
    with result.checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / HISTORY_FILE).read_text())


def copy_atomically(checkpoint, folder: Path, finish=None):
    """The checkpoint's model into `folder`, which appears complete or not at all; without its training state (a
    student's DeepSpeed state, an expert's latest/ weights and optimizer: for resuming training only).
    `finish(folder)`, if given, runs on the copy before it appears (decision.decide_folder: the threshold into its
    weights); what it returns is returned."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.to_directory(str(tmp))
    for state in (DEEPSPEED_DIR, LATEST_DIR):
        shutil.rmtree(tmp / state, ignore_errors=True)
    result = finish(tmp) if finish is not None else None
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return result
