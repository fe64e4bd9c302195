"""Stage: train the router on frozen experts' logits, then aggregate them into the soft-target file (the pipeline's
entry: `router_stage()`).

The file (safetensors, one tensor set per split) keeps the per-expert logits and the gate logits as well as the
aggregated targets, so another router or distillation temperature needs no expert forward pass.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from moekd_ray import progress
from moekd_ray.config import MoEKDConfig
from moekd_ray.partition import assign_parts
from moekd_ray.router import gate_logits, mixture_probs, route, train_router, uniform_weights
from moekd_ray.stages.context import RunContext
from moekd_ray.stages.experts import expert_logits


def router_stage(ctx: RunContext, checkpoints: list[list], enc_expert: list[dict], features: dict[str, sp.spmatrix],
                 parts: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Run the experts over every split, fit the router and aggregate the soft targets into the run folder's
    soft_targets.safetensors (or reuse that file on resume); then, every run, measure on validation whether the
    experts specialise and the router follows the parts. Returns the aggregated targets (`aggregate`'s dict)."""
    cfg, tracker = ctx.cfg, ctx.tracker
    with ctx.timer("router"), tracker.stage("router", cfg.router.model_dump(mode="json")):
        soft_path = ctx.run_dir / "soft_targets.safetensors"
        targets = cached_soft_targets(soft_path, cfg, ctx.log) if ctx.finished.resume else None
        if targets is None:
            logits = expert_logits(cfg, checkpoints, enc_expert)  # every expert over every split, once
            router_epochs = []
            gates = fit_gate(cfg, features, logits, ctx.labels, parts, log=ctx.log, history=router_epochs)
            tracker.log_epochs(router_epochs)
            targets = aggregate(cfg, logits, gates, ctx.labels)
            save_soft_targets(targets, soft_path, {"config_digest": cfg.digest()})
            tracker.log_artifact(soft_path)
        else:
            ctx.timer.reused("router")
        mean_w = targets["train"]["weights"].mean(0)
        tracker.log_metrics({f"train_mean_weight_{k}": float(w) for k, w in enumerate(mean_w)})
        log_specialisation(ctx, targets, features, parts)
    return targets


def log_specialisation(ctx: RunContext, targets: dict, features: dict[str, sp.spmatrix], parts: np.ndarray) -> None:
    """Do the experts specialise, and does the router follow the parts? On validation, into the stage's run."""
    data = ctx.data
    report_specialisation(ctx.cfg, ctx.tracker, ctx.log, (ctx.funcs["train"], list(data["train"]["project"])), parts,
                          (ctx.funcs["valid"], list(data["valid"]["project"])), features, targets["valid"])


def report_specialisation(cfg: MoEKDConfig, tracker, log, train: tuple[list, list], train_parts: np.ndarray,
                          valid: tuple[list, list], features: dict[str, sp.spmatrix], split: dict) -> dict:
    """The validation functions (`valid`: functions, projects) assigned to the parts as the training ones were split,
    then `specialisation` of `split` (the validation targets) printed, logged (specialisation.json and metrics) and
    returned. The pipeline's router stage and the benchmark's teachers both report through here."""
    valid_parts = assign_parts(cfg.partition.strategy.value, *train, train_parts, *valid, cfg.experts.k, cfg.seed,
                               cfg.partition.hash_features, (features["train"], features["valid"]))
    spec = specialisation(split, valid_parts, cfg.experts.k)
    for line in specialisation_lines(spec):
        log(line)
    tracker.log_dict(spec, "specialisation.json")
    tracker.log_metrics({"routing_entropy": spec["routing_entropy"], "experts_best_on_own_part": spec["own_best"],
                         **{f"part_{j}_own_expert_edge": e for j, e in enumerate(spec["own_edge"])},
                         **{f"expert_{i}_part_{j}_val_accuracy": a for i, row in enumerate(spec["accuracy"])
                            for j, a in enumerate(row)},
                         **{f"part_{j}_weight_{i}": w for j, row in enumerate(spec["weight"])
                            for i, w in enumerate(row)}})
    return spec


def fit_gate(cfg: MoEKDConfig, features: dict[str, sp.spmatrix], logits: dict[str, np.ndarray],
             labels: dict[str, np.ndarray], parts: np.ndarray | None = None, log=print,
             history: list | None = None) -> dict[str, np.ndarray]:
    """Gate logits [N, K] per split: from the learned router, or zeros (= uniform weights) for `uniform`. `parts`:
    each training row's part (router.part_loss_weight). `history`, if given, receives the router's per-epoch rows
    (epoch, mixture_nll, balance, part_accuracy)."""
    if cfg.router.kind == "uniform":
        return {s: np.zeros((len(labels[s]), cfg.experts.k), dtype=np.float32) for s in logits}
    r = cfg.router
    rows = history if history is not None else []
    ticker = progress.Ticker("router", r.epochs, "epochs", every=1.0)

    def on_epoch(row: dict) -> None:
        rows.append(row)
        ticker(row["epoch"], f"mixture nll {row['mixture_nll']:.4f}")

    router = train_router(
        features["train"], logits["train"], labels["train"], hidden=r.hidden_size, temperature=r.temperature,
        top_k=r.top_k, balance_weight=r.balance_weight, epochs=r.epochs, lr=r.lr, seed=cfg.seed, parts=parts,
        part_weight=r.part_loss_weight, on_epoch=on_epoch,
    )
    first, last = rows[0], rows[-1]
    log(f"router: mixture nll {first['mixture_nll']:.4f} -> {last['mixture_nll']:.4f} in {last['epoch']} epochs, "
        f"balance {last['balance']:.3f}" + (f", gate = the row's part on {last['part_accuracy']:.1%} of training rows"
                                            if "part_accuracy" in last else ""))
    return {s: gate_logits(router, features[s]) for s in logits}


def expert_weights(cfg: MoEKDConfig, gates: np.ndarray) -> np.ndarray:
    g = torch.from_numpy(np.array(gates))  # a copy: arrays from the Ray object store are read-only
    if cfg.router.kind == "uniform":
        return uniform_weights(len(g), cfg.experts.k).numpy()
    return route(g, cfg.router.temperature, cfg.router.top_k).numpy()


def soft_targets(cfg: MoEKDConfig, expert_logits: np.ndarray, gates: np.ndarray,
                 temperature: float | None = None) -> np.ndarray:
    """The experts' distributions [N, K, 2] mixed by the router's weights for `gates` [N, K], softened at
    `temperature` (default: the distillation's T): [N, 2]. The one place soft targets are made."""
    z = torch.from_numpy(np.array(expert_logits)).float()  # a copy: arrays from the Ray object store are read-only
    w = torch.from_numpy(expert_weights(cfg, gates)).float()
    t = cfg.distill.temperature if temperature is None else temperature
    return mixture_probs(z, w, t).numpy()


def aggregate(cfg: MoEKDConfig, logits: dict[str, np.ndarray], gates: dict[str, np.ndarray],
              labels: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Per split: expert_logits [N,K,2], gate_logits [N,K], weights [N,K], mixture_probs (T=1) and
    soft_targets (at the distillation temperature) [N,2], labels [N]."""
    out = {}
    for split in logits:
        out[split] = {
            "expert_logits": logits[split].astype(np.float32),
            "gate_logits": gates[split].astype(np.float32),
            "weights": torch.from_numpy(expert_weights(cfg, gates[split])).float().numpy(),
            "mixture_probs": soft_targets(cfg, logits[split], gates[split], 1.0),
            "soft_targets": soft_targets(cfg, logits[split], gates[split]),
            "labels": labels[split].astype(np.int64),
        }
    return out


def _checksum(flat: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(flat):
        h.update(key.encode())
        h.update(np.ascontiguousarray(flat[key]).tobytes())
    return h.hexdigest()


def save_soft_targets(targets: dict[str, dict[str, np.ndarray]], path: Path, metadata: dict[str, str]) -> None:
    flat = {f"{split}/{name}": np.ascontiguousarray(a) for split, d in targets.items() for name, a in d.items()}
    tmp = path.with_suffix(".tmp")
    save_file(flat, str(tmp), metadata={**metadata, "sha256": _checksum(flat)})
    tmp.replace(path)  # atomic: a crash never leaves a half-written file under the final name


def load_soft_targets(path: Path, expect_digest: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """The file's arrays by split; ValueError if it is truncated, its checksum fails or (with `expect_digest`) it
    belongs to another config."""
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            flat = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a truncated or garbled file
        raise ValueError(f"not a readable safetensors file ({str(exc)[:120]})") from None
    if "sha256" in metadata and metadata["sha256"] != _checksum(flat):
        raise ValueError("checksum mismatch: the file was changed or damaged after it was written")
    if expect_digest is not None and metadata.get("config_digest") != expect_digest:
        raise ValueError(f"written for config {metadata.get('config_digest')}, not {expect_digest}")
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in flat.items():
        split, name = key.split("/", 1)
        out.setdefault(split, {})[name] = arr
    return out


def cached_soft_targets(path: Path, cfg: MoEKDConfig, log) -> dict | None:
    """The soft-target file if it is intact and of this config; else None (it is rebuilt), with a warning."""
    if not path.is_file():
        return None
    try:
        return load_soft_targets(path, expect_digest=cfg.digest())
    except ValueError as exc:
        log(f"warning: {path} is unusable ({exc}); rebuilding it")
        return None


def specialisation(split: dict[str, np.ndarray], parts: np.ndarray, k: int) -> dict:
    """Whether the experts specialise and the router routes by part, on one split's aggregated targets
    (`aggregate`'s dict) with each row's part: accuracy[i][j] of expert i on part j's rows, weight[j][i] the
    router's mean weight of expert i on part j, the mean routing entropy (nats; log K is a plain mean), own_edge[j]:
    expert j's accuracy on part j minus the best other expert's there, and own_best: on how many parts that is > 0."""
    labels, weights = split["labels"], split["weights"]
    correct = split["expert_logits"].argmax(-1) == labels[:, None]  # [N, K]
    accuracy = [[float(correct[parts == j, i].mean()) if (parts == j).any() else float("nan") for j in range(k)]
                for i in range(k)]
    weight = [[float(weights[parts == j, i].mean()) if (parts == j).any() else float("nan") for i in range(k)]
              for j in range(k)]
    entropy = float(-(weights * np.log(np.clip(weights, 1e-12, None))).sum(1).mean())
    # expert j trained on part j (train_on: part) or weighted it up (all_weighted): by how much is it the best there?
    # (a count alone misleads: random parts make each expert "best" on its own part by a point or so)
    own_edge = [accuracy[j][j] - max(accuracy[i][j] for i in range(k) if i != j) for j in range(k)] if k > 1 else []
    return {"accuracy": accuracy, "weight": weight, "routing_entropy": entropy, "max_entropy": float(np.log(k)),
            "rows": [int((parts == j).sum()) for j in range(k)], "own_edge": own_edge,
            "own_best": sum(int(e > 0) for e in own_edge)}


def specialisation_lines(spec: dict) -> list[str]:
    """The specialisation as console lines: a K x K accuracy table, then the router's weights per part."""
    k = len(spec["rows"])
    head = "expert \\ part " + "".join(f"{j:>8}" for j in range(k))
    lines = [head] + [f"{'expert ' + str(i):<14}" + "".join(f"{a:>8.3f}" for a in row)
                      for i, row in enumerate(spec["accuracy"])]
    lines.append(f"{'rows':<14}" + "".join(f"{n:>8}" for n in spec["rows"]))
    for j, row in enumerate(spec["weight"]):
        lines.append(f"router weights on part {j}: " + " ".join(f"{w:.2f}" for w in row))
    lines.append(f"routing entropy {spec['routing_entropy']:.3f} nats (a plain mean: {spec['max_entropy']:.3f})")
    edges = ", ".join(f"{100 * e:+.1f}" for e in spec["own_edge"])
    lines.append(f"experts best on their own part: {spec['own_best']} of {k} parts (own expert minus the best other, "
                 f"points: {edges})")
    return lines
