"""Stage: train the K experts, each in its own Ray Train TorchTrainer, all K at once; then their logits.

Worker side: `expert_worker(config)` is plain PyTorch around `train_epoch`/`predict_logits` (DDP through Ray when
an expert has several workers). Driver side: `train_experts()` builds one trainer per expert and fits them
concurrently; `expert_logits()` runs each trained expert over every split as a Ray task. The pipeline's entry is
`experts_stage()`, which trains only the models an interrupted run did not finish.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from moekd_ray import progress, ray_runtime
from moekd_ray.config import (GraphConfig, ModelSource, MoEKDConfig, NgramConfig, PretrainedConfig, Schedule,
                              dump_yaml, member_names)
from moekd_ray.errors import ConfigError
from moekd_ray.metrics import validation_metrics
from moekd_ray.models import build_model, load_model
from moekd_ray.stages.context import RunContext
from moekd_ray.tokenization import (NgramHasher, SyntaxGraphEncoder, encode, load_tokenizer, train_bpe,
                                   with_input_transform)
from moekd_ray.train_loop import (BestEpoch, classifier_logits, make_loader, predict_logits, scheduled, start_epoch,
                                  torch_step, train_epoch, weighted_ce)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def make_tokenizers(cfg: MoEKDConfig, train_funcs: list[str], run_dir: Path):
    """Experts: their checkpoint's tokenizer, the n-gram hasher, the syntax-graph encoder, else a BPE on the training
    code; student: a small BPE. All saved, each with `data.input_transform` (tokenization.CanonicalInput).
    Returns (one tokenizer per expert, student tokenizer); experts with the same spec share one object."""
    canonical = cfg.data.canonical
    by_spec = {}
    for spec in cfg.experts.specs():
        key = spec.model_dump_json()
        if key not in by_spec:
            if isinstance(spec, PretrainedConfig):
                by_spec[key] = with_input_transform(load_tokenizer(spec.name_or_path), canonical)
            elif isinstance(spec, NgramConfig):
                hasher = NgramHasher(spec.buckets, spec.ngram, spec.max_length, spec.units)
                by_spec[key] = with_input_transform(hasher, canonical)
            elif isinstance(spec, GraphConfig):
                by_spec[key] = with_input_transform(SyntaxGraphEncoder(spec.buckets, spec.max_length), canonical)
            else:
                by_spec[key] = train_bpe(train_funcs, spec.vocab_size, spec.max_length, canonical)
    expert_toks = [by_spec[spec.model_dump_json()] for spec in cfg.experts.specs()]
    for k, tok in enumerate(expert_toks):
        tok.save_pretrained(str(run_dir / "tokenizers" / f"expert_{k}"))
    arch = cfg.distill.arch()
    student_tok = train_bpe(train_funcs, arch.vocab_size, arch.max_length, canonical)
    student_tok.save_pretrained(str(run_dir / "tokenizers" / "student"))
    return expert_toks, student_tok


def encode_for_experts(cfg: MoEKDConfig, expert_toks: list, funcs: dict[str, list[str]]) -> list[dict]:
    """Expert k's encoded splits; experts sharing a tokenizer and length share one encoding."""
    encoded, out = {}, []
    for spec, tok in zip(cfg.experts.specs(), expert_toks):
        key = (id(tok), spec.max_length)
        if key not in encoded:
            encoded[key] = {s: encode(tok, texts, spec.max_length) for s, texts in funcs.items()}
        out.append(encoded[key])
    return out



class ExpertJob(ray_runtime.WorkerJob):
    model: ModelSource
    schedule: Schedule
    bf16: bool = False


def expert_forward(bf16: bool):
    """train_epoch's forward: float32 logits, computed under bf16 autocast on a GPU when `bf16` (a no-op on CPU,
    where autocast would only slow the experts down)."""
    def forward(model, batch, device):
        on_gpu = torch.device(device).type == "cuda"
        if bf16 and on_gpu and not torch.cuda.is_bf16_supported():
            raise ValueError(ray_runtime.bf16_problem("experts.bf16", torch.cuda.get_device_name(), False))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and on_gpu):
            return classifier_logits(model, batch, device).float()

    return forward


def expert_worker(config: dict) -> None:
    """Ray Train worker: train one expert (or one fold model of it) with the schedule's warm-up, decay and gradient
    clipping; each epoch, validation metrics and a checkpoint whose top level is the best epoch's model (by
    `keep_best_by`) and whose latest/ folder is the training state (weights, optimizer). Early stopping after
    `patience` epochs without a better one. After a restart it resumes from the latest state."""
    # Wall clock when this worker came up, so that overlapping (concurrent) expert runs can be seen afterwards.
    started_at = time.time()
    job = ExpertJob.model_validate(config)
    spec, sched = job.model, job.schedule
    torch.set_num_threads(max(int(job.threads), 1))
    ctx = ray.train.get_context()
    train, valid = ray.get(job.train), ray.get(job.valid)

    restored, history = ray_runtime.restored_state()
    latest = restored / ray_runtime.LATEST_DIR if restored else None
    model = ray.train.torch.prepare_model(load_model(latest) if restored else build_model(spec, job.seed))
    best_state = load_model(restored).state_dict() if restored else None
    loader = ray.train.torch.prepare_data_loader(make_loader(train, sched.batch_size, shuffle=True, seed=job.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=sched.lr, weight_decay=sched.weight_decay)
    if restored:
        optimizer.load_state_dict(torch.load(latest / ray_runtime.OPTIMIZER_FILE, weights_only=True))
    name = job.name
    started_at = history[0]["started_at"] if history else started_at
    best = BestEpoch(sched.keep_best_by, sched.patience, history)

    def save(folder: str) -> None:
        unwrap(model).save_pretrained(folder, state_dict=dict(best_state))  # a copy: HF empties it
        unwrap(model).save_pretrained(Path(folder) / ray_runtime.LATEST_DIR)
        torch.save(optimizer.state_dict(), Path(folder) / ray_runtime.LATEST_DIR / ray_runtime.OPTIMIZER_FILE)

    resumed_from = len(history)  # epochs already done (0 on a fresh start)
    steps_done, total_steps = resumed_from * len(loader), sched.epochs * len(loader)
    step = scheduled(torch_step(optimizer, sched.grad_clip), optimizer.param_groups, sched, total_steps, steps_done)
    step = ray_runtime.inject_fault(job, step, steps_done)
    ticker = progress.Ticker(name, sched.epochs * len(loader), enabled=ctx.get_world_rank() == 0)
    for epoch in range(resumed_from + 1, sched.epochs + 1):
        if history and history[-1]["final"]:
            break  # stopped early before the restart
        start_epoch(loader, epoch, job.seed)
        stats = train_epoch(model, loader, weighted_ce, step, ticker.epoch(epoch, sched.epochs),
                            expert_forward(job.bf16))
        val = validation_metrics(valid["labels"], predict_logits(unwrap(model), valid, job.eval_batch_size))
        better, stop = best.decide(epoch, {f"val_{k}": v for k, v in val.items()}, ray.train.torch.get_device())
        if better:  # rank 0's decision on every rank (several workers: a rank that stopped alone hangs the rest)
            best_state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
        metrics = {"epoch": epoch, **stats, **{f"val_{k}": v for k, v in val.items()}, "best_epoch": best.epoch,
                   "final": int(stop or epoch == sched.epochs), "started_at": started_at,
                   "finished_at": time.time(), "resumed_from": resumed_from}
        print(f"[{name}] epoch {epoch}/{sched.epochs}: loss {stats['train_loss']:.4f}, "
              f"{stats['samples_per_s']:.1f} samples/s, val acc {val['accuracy']:.3f} f1 {val['f1']:.3f} "
              f"auc {val['auc']:.3f}, best epoch {best.epoch}" + (" (resumed)" if restored else "")
              + (f"; no better {sched.keep_best_by} for {sched.patience} epochs: stopping" if stop else ""))
        ray_runtime.report_epoch(metrics, history, save if ctx.get_world_rank() == 0 else None)
        if stop:
            break


def fold_of(n: int, folds: int, seed: int) -> np.ndarray:
    """Each training row's cross-fitting fold in [0, folds), seeded and balanced (all 0 when folds is 1)."""
    return np.random.default_rng(seed + 7).permutation(np.arange(n) % folds)


def part_arrays(enc: dict[str, np.ndarray], labels: np.ndarray, parts: np.ndarray, k: int, cfg: MoEKDConfig,
                keep: np.ndarray | None = None) -> dict:
    """The rows (and per-row loss weights) expert k trains on; `keep`: a mask of the rows its fold model may see."""
    if cfg.experts.train_on == "part":
        rows = parts == k if keep is None else (parts == k) & keep
        return {**{n: a[rows] for n, a in enc.items()}, "labels": labels[rows]}
    weight = np.where(parts == k, cfg.experts.part_weight, 1.0).astype(np.float32)
    arrays = {**enc, "labels": labels, "weight": weight}
    return arrays if keep is None else {n: a[keep] for n, a in arrays.items()}


@ray.remote(num_cpus=0)
def _load_here(spec: PretrainedConfig) -> str | None:
    """On one node: build the expert as its workers will (a hub checkpoint lands in this node's cache, once);
    the problem, if it cannot be."""
    try:
        build_model(spec, 0)
    except ValueError as exc:
        return str(exc)
    return None


def fetch_on_worker_nodes(cfg: MoEKDConfig) -> None:
    """Every pretrained expert loads on every alive node its workers may be placed on (GPU and custom resources as
    `experts.resources` asks), before any worker starts: a hub checkpoint is fetched once per node rather than by
    each worker, and a node without hub access or the folder fails here with one line naming the key, the node and
    the fix, not hours in. (Nodes an autoscaler has yet to add are not there to check: their workers fetch for
    themselves.)"""
    keys = {}  # name_or_path -> (its key, its spec), the first expert that names it
    for i, spec in enumerate(cfg.experts.specs()):
        if isinstance(spec, PretrainedConfig) and spec.name_or_path not in keys:
            key = f"experts.models[{i}]" if cfg.experts.models is not None else "experts.model"
            keys[spec.name_or_path] = (f"{key}.name_or_path", spec)
    checks = [(n["NodeManagerAddress"], key, _load_here.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(spec))
        for n in ray_runtime.worker_nodes(cfg.experts.resources) for key, spec in keys.values()]
    for (address, key, _), problem in zip(checks, ray.get([ref for _, _, ref in checks])):
        if problem:
            raise ConfigError(f"{key}: on node {address}, where expert workers may run: {problem}; every such node "
                              "must reach it (a folder: on storage all nodes mount; a hub name: hub access or HF_HOME "
                              "on a shared cache)")


def expert_trainers(cfg: MoEKDConfig, enc: list[dict], labels: dict, parts: np.ndarray, name: str,
                    storage: str, members: list[str] | None = None) -> list:
    """One TorchTrainer per expert and fold (not yet fitted), expert-major; `members`: only those (by name, see
    `member_names`). enc[k] holds expert k's encoded splits (its own tokenizer)."""
    fetch_on_worker_nodes(cfg)
    trainers, folds = [], fold_of(len(labels["train"]), cfg.experts.folds, cfg.seed)
    for k, spec in enumerate(cfg.experts.specs()):
        valid = ray.put({**enc[k]["valid"], "labels": labels["valid"]})
        for f, member in enumerate(member_names(cfg)[k]):
            if members is not None and member not in members:
                continue
            keep = folds != f if cfg.experts.folds > 1 else None
            job = ExpertJob(
                name=member, model=spec, schedule=cfg.experts.schedule_of(k), bf16=cfg.experts.bf16,
                threads=cfg.experts.resources.cpus_per_worker, eval_batch_size=cfg.eval.batch_size,
                seed=cfg.seed + k + 1000 * f,
                train=ray.put(part_arrays(enc[k]["train"], labels["train"], parts, k, cfg, keep)), valid=valid,
                fault_injection=cfg.ray.fault_injection,
                fault_marker=ray_runtime.storage_join(storage, f"{name}-{member}.fault_injected"),
            )
            trainers.append(ray_runtime.make_trainer(expert_worker, job.loop_config(), cfg.experts.resources,
                                                     f"{name}-{member}", storage, max_failures=cfg.ray.max_failures))
    return trainers


def train_experts(cfg: MoEKDConfig, enc: list[dict], labels: dict, parts: np.ndarray, run_dir: Path,
                  members: list[str] | None = None) -> tuple[list, list[float]]:
    """Fit every expert (every fold model; `members`: only those) concurrently; returns their Ray Train results
    (checkpoint + per-epoch metrics) and the wall-clock time each run finished, flat and expert-major (see
    `member_names`). A run that reported checkpoints before (an interrupted run, resumed) continues from its latest."""
    storage = ray_runtime.storage_path(cfg, run_dir)
    return ray_runtime.fit_all(expert_trainers(cfg, enc, labels, parts, run_dir.name, storage, members))


def experts_stage(ctx: RunContext, enc: list[dict], parts: np.ndarray) -> list[list]:
    """Train the expert models an interrupted run did not finish (all of them in a new run), then write one MLflow
    run per model; returns each expert's checkpoints (`by_expert`)."""
    cfg, log = ctx.cfg, ctx.log
    with ctx.timer("experts"):
        members = [m for names in member_names(cfg) for m in names]
        results = ctx.finished.members()
        todo = [m for m in members if m not in results]
        if todo:
            if results:
                log(f"experts: {', '.join(results)} finished before the interruption (reused); training "
                    f"{', '.join(todo)}, each from its latest reported checkpoint if it has one")
            fitted, finished_at = train_experts(cfg, enc, ctx.labels, parts, ctx.run_dir, todo)
            ended = {m: ray_runtime.epoch_rows(r)[-1]["finished_at"] for m, r in results.items()}
            results.update(zip(todo, fitted))
            ended.update(zip(todo, finished_at))
            log_members(ctx, members, results, ended)
        else:
            ctx.timer.reused("experts")
        return by_expert(cfg, [results[m].checkpoint for m in members])


def log_members(ctx: RunContext, members: list[str], results: dict, ended: dict[str, float]) -> None:
    """Every member's stage run (a killed driver logged none: they are logged once all have trained), spanning its
    training, with its epochs, its spec and a summary line."""
    specs = [spec for spec in ctx.cfg.experts.specs() for _ in range(ctx.cfg.experts.folds)]
    for member, spec in zip(members, specs):
        rows = ray_runtime.epoch_rows(results[member])
        ctx.log(epoch_summary(member, rows))
        span = (rows[0]["started_at"], ended[member])  # the MLflow run spans the training
        with ctx.tracker.stage(member, spec.model_dump(mode="json"), span=span):
            ctx.tracker.log_epochs(rows)
            ctx.tracker.log_text(dump_yaml(spec.model_dump(mode="json")), "config.yaml")
            ctx.tracker.log_dict(rows, "epochs.json")


def epoch_summary(name: str, rows: list[dict]) -> str:
    """One line for a trained model: its kept epoch's validation figures."""
    best = next((r for r in rows if r["epoch"] == rows[-1]["best_epoch"]), rows[-1])
    return (f"{name}: epoch {best['epoch']} of {len(rows)} kept, val acc {best['val_accuracy']:.3f} "
            f"f1 {best['val_f1']:.3f} auc {best['val_auc']:.3f}")


def by_expert(cfg: MoEKDConfig, flat: list) -> list[list]:
    """A flat expert-major list (one item per fold model) as one list per expert."""
    f = cfg.experts.folds
    return [flat[k * f:(k + 1) * f] for k in range(cfg.experts.k)]


@ray.remote
def _expert_logits_task(checkpoint: ray.train.Checkpoint, splits: dict, batch_size: int, threads: int) -> dict:
    torch.set_num_threads(max(threads, 1))
    with checkpoint.as_directory() as folder:
        model = load_model(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    return {name: predict_logits(model, ray.get(ref), batch_size) for name, ref in splits.items()}


def expert_logits(cfg: MoEKDConfig, checkpoints: list[list], enc: list[dict]) -> dict[str, np.ndarray]:
    """Per split, the logits of every expert: [N, K, 2]. checkpoints[k]: expert k's models (one, or one per fold).
    When cross-fitting, a "train" row gets the logits of the fold model that did not train on it, and every other
    split the log of the fold models' mean probabilities. One Ray task per model, all at once."""
    res = cfg.experts.resources
    task = _expert_logits_task.options(num_cpus=res.cpus_per_worker, num_gpus=1 if res.use_gpu else 0,
                                       resources=res.custom)
    folds = fold_of(len(enc[0]["train"]["input_ids"]), cfg.experts.folds, cfg.seed) if "train" in enc[0] else None

    def rows(split: str, enc_split: dict, f: int, n_models: int) -> dict:
        return {n: a[folds == f] for n, a in enc_split.items()} if split == "train" and n_models > 1 else enc_split

    refs = [[task.remote(c, {s: ray.put(rows(s, a, f, len(members))) for s, a in enc_k.items()},
                         cfg.eval.batch_size, int(res.cpus_per_worker)) for f, c in enumerate(members)]
            for members, enc_k in zip(checkpoints, enc)]
    flat = [r for members in refs for r in members]
    ticker, pending = progress.Ticker("expert outputs", len(flat), "models", every=1.0), flat
    while pending:  # only to show progress: the results are gathered below
        _, pending = ray.wait(pending, num_returns=1)
        ticker(len(flat) - len(pending))
    outputs = [ray.get(members) for members in refs]
    out = {}
    for split in enc[0]:
        per_expert = []
        for members in outputs:
            logits = [o[split] for o in members]
            if len(logits) == 1:
                per_expert.append(logits[0])
            elif split == "train":  # out of fold
                z = np.zeros((len(folds), 2), dtype=np.float32)
                for f, zf in enumerate(logits):
                    z[folds == f] = zf
                per_expert.append(z)
            else:
                probs = np.mean([torch.softmax(torch.from_numpy(z).float(), -1).numpy() for z in logits], axis=0)
                per_expert.append(np.log(np.clip(probs, 1e-7, 1.0)).astype(np.float32))
        out[split] = np.stack(per_expert, axis=1)
    return out
