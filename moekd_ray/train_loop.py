"""Plain PyTorch training and inference: the same functions run inside Ray Train workers and without Ray."""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class ArrayDataset(Dataset):
    """Rows of equally long numpy arrays (input_ids, attention_mask, labels, ...), as dicts of tensors."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        # A copy: arrays from the Ray object store are read-only views.
        self.arrays = {k: torch.tensor(np.asarray(v)) for k, v in arrays.items()}
        self.n = len(next(iter(arrays.values())))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.arrays.items()}


def make_loader(arrays: dict[str, np.ndarray], batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ArrayDataset(arrays), batch_size=batch_size, shuffle=shuffle, generator=gen)


def start_epoch(loader: DataLoader, epoch: int, seed: int) -> None:
    """Shuffle order and dropout as functions of (seed, epoch) only, so a run resumed at epoch e computes what an
    uninterrupted run would (DistributedSampler when Ray added one, else the loader's own generator)."""
    torch.manual_seed(seed * 100_003 + epoch)  # dropout masks
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    elif getattr(sampler, "generator", None) is not None:
        sampler.generator.manual_seed(seed * 100_003 + epoch)


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut the columns that are padding in every row: most functions are far shorter than max_length. Every
    per-token tensor (shaped like input_ids: the mask, masked-LM labels, a paired original's tokens) is cut alike,
    to the widest of the masks."""
    width = max(int(v.sum(1).max()) for k, v in batch.items() if k.endswith("attention_mask"))
    shape = batch["input_ids"].shape
    return {k: (v[:, :width] if v.shape == shape else v) for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return {k: batch[k].long().to(device) for k in ("input_ids", "attention_mask")}


def model_device(model) -> torch.device:
    return next(model.parameters()).device


LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]  # (logits, batch) -> loss


def classifier_logits(model, batch: dict[str, torch.Tensor], device) -> torch.Tensor:
    return model(**model_inputs(batch, device)).logits


def train_epoch(model, loader: DataLoader, loss_fn: LossFn, step: Callable[[torch.Tensor], None],
                on_step: Callable[[int], None] | None = None, forward=classifier_logits) -> dict[str, float]:
    """One pass; `step(loss)` does backward + optimizer step (plain torch or a DeepSpeed engine); `on_step(i)`
    after the i-th batch (e.g. a progress.Ticker); `forward(model, batch, device)` gives the logits loss_fn takes."""
    model.train()
    device = model_device(model)
    total, seen, start = 0.0, 0, time.perf_counter()
    for i, batch in enumerate(loader, 1):
        batch = {k: v.to(device) for k, v in trim_padding(batch).items()}  # no-op where Ray already moved it
        loss = loss_fn(forward(model, batch, device), batch)
        step(loss)
        n = len(batch["input_ids"])
        total += loss.item() * n
        seen += n
        if on_step:
            on_step(i)
    elapsed = time.perf_counter() - start
    return {"train_loss": total / max(seen, 1), "samples_per_s": seen / max(elapsed, 1e-9), "train_seconds": elapsed}


def torch_step(optimizer: torch.optim.Optimizer, grad_clip: float | None = None) -> Callable[[torch.Tensor], None]:
    def step(loss):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
        optimizer.step()

    return step


def lr_at(step: int, total: int, peak: float, warmup_ratio: float, decay: str) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`: linear warm-up to `peak` over the first
    warmup_ratio of the steps, then linear or cosine decay to 0 at the last step, or constant (decay "none")."""
    warm = int(warmup_ratio * total)
    if step < warm:
        return peak * (step + 1) / warm
    if decay == "none":
        return peak
    progress = min((step - warm) / max(total - warm, 1), 1.0)
    return peak * ((1.0 - progress) if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress)))


def scheduled(step: Callable[[torch.Tensor], None], param_groups, sched, total: int,
              done: int) -> Callable[[torch.Tensor], None]:
    """`step` with the learning rate of `sched` (a config.Schedule) set before each optimizer step. The rate is a
    function of the global step only (`done` steps already taken, e.g. before a restart), so a resumed run follows
    the same curve as an uninterrupted one. `param_groups`: the optimizer's (a DeepSpeed engine's optimizer too)."""
    count = done

    def run(loss: torch.Tensor) -> None:
        nonlocal count
        lr = lr_at(count, total, sched.lr, sched.warmup_ratio, sched.decay)
        for group in param_groups:
            group["lr"] = lr
        step(loss)
        count += 1

    return run


class BestEpoch:
    """Which epoch's weights to keep: the best so far by a validation metric (`keep_best_by`; loss is minimised),
    or the last one; and whether early stopping's patience has run out."""

    def __init__(self, metric: str, patience: int | None, history: list[dict] = ()):
        self.metric, self.patience = metric, patience
        self.epoch, self.value = 0, None
        for row in history:  # a restarted worker replays what the epochs before the restart saw
            self.update(row["epoch"], row)

    def update(self, epoch: int, metrics: dict) -> bool:
        """Record an epoch's metrics (with val_<metric>); True if this epoch is now the best."""
        if self.metric == "last":
            self.epoch = epoch
            return True
        value = metrics[f"val_{self.metric}"]
        better = self.value is None or (value < self.value if self.metric == "loss" else value > self.value)
        if better:
            self.epoch, self.value = epoch, value
        return better

    def stop(self, epoch: int) -> bool:
        return self.patience is not None and epoch - self.epoch >= self.patience

    def decide(self, epoch: int, metrics: dict, device: torch.device | str = "cpu") -> tuple[bool, bool]:
        """(this epoch is now the best, stop now), as rank 0 of the process group decides them, broadcast so that
        every rank acts alike: each rank computes its own validation figures, which may differ in their last bits,
        and ranks that disagreed on saving (a collective gather under ZeRO-3) or on stopping would wait for each
        other forever. Every rank's state becomes rank 0's. Without a process group (or alone): update + stop.
        `device`: where the group's backend takes tensors (NCCL: the rank's GPU)."""
        better, stop = self.update(epoch, metrics), self.stop(epoch)
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return better, stop
        value = math.nan if self.value is None else float(self.value)
        decision = torch.tensor([better, stop, self.epoch, value], dtype=torch.float64, device=device)
        dist.broadcast(decision, src=0)
        better, stop, best_epoch, value = decision.tolist()
        self.epoch, self.value = int(best_epoch), None if math.isnan(value) else value
        return bool(better), bool(stop)


def weighted_ce(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy on hard labels, each row weighted by batch['weight'] when present (expert up-weighting)."""
    ce = torch.nn.functional.cross_entropy(logits, batch["labels"].long(), reduction="none")
    if "weight" in batch:
        w = batch["weight"].float()
        return (ce * w).sum() / w.sum()
    return ce.mean()


@torch.no_grad()
def predict_logits(model, arrays: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """Logits [N, 2] in input order."""
    model.eval()
    device = model_device(model)
    out = []
    for batch in make_loader({k: arrays[k] for k in ("input_ids", "attention_mask")}, batch_size, shuffle=False):
        out.append(model(**model_inputs(trim_padding(batch), device)).logits.float().cpu())
    return torch.cat(out).numpy()


def probs1(logits: np.ndarray) -> np.ndarray:
    """P(vulnerable) from logits [N, 2]."""
    return torch.softmax(torch.from_numpy(logits).float(), dim=-1)[:, 1].numpy()


def throughput(model, arrays: dict[str, np.ndarray], batch_size: int, threads: int, n: int = 256) -> float:
    """Inference functions/s on the first n rows at `threads` torch threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sub = {k: v[:n] for k, v in arrays.items()}
        predict_logits(model, {k: v[:batch_size] for k, v in sub.items()}, batch_size)  # warm-up
        start = time.perf_counter()
        predict_logits(model, sub, batch_size)
        return len(sub["input_ids"]) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(old)


def latency_p50_ms(model, arrays: dict[str, np.ndarray], threads: int, n: int = 100) -> float:
    """Median milliseconds to score one function alone (batch of 1, its own length) at `threads` torch threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        one = lambda i: {k: v[i : i + 1] for k, v in arrays.items()}  # noqa: E731
        predict_logits(model, one(0), 1)  # warm-up
        times = []
        for i in range(min(n, len(arrays["input_ids"]))):
            start = time.perf_counter()
            predict_logits(model, one(i), 1)
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1000)
    finally:
        torch.set_num_threads(old)
