"""Benchmark: K experts on Ray Train fitted concurrently vs one after another, and Ray Train vs a plain PyTorch loop.

    python -m moekd_ray.bench                          # defaults: about 3-5 minutes on 2 CPU cores
    python -m moekd_ray.bench --train-rows 1200 --epochs 2 --max-length 256

One process, one Ray (moekd_ray.ray_runtime.init_ray), real Devign rows (moekd_ray.data), the pipeline's expert
tokenizer and partition, and the pipeline's own expert trainers (moekd_ray.stages.experts.expert_trainers). Order: one
unmeasured warm-up fit (the session's first fit pays one-time costs), concurrent fits, sequential fits, plain loop.
The plain loop repeats the worker's per-epoch work (train_epoch, validation, save_pretrained) in this process, at
the worker's thread count, so "Ray wall - plain wall" is Ray's fixed cost per fit.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Writing model shards" bars (Ray workers inherit it)

import numpy as np
import ray
import torch

from moekd_ray import ray_runtime
from moekd_ray.config import MoEKDConfig, load_config
from moekd_ray.data import SPLITS, describe, load_devign
from moekd_ray.metrics import classification_metrics
from moekd_ray.models import build_model, num_params
from moekd_ray.partition import partition, partition_table
from moekd_ray.stages.experts import encode_for_experts, expert_trainers, make_tokenizers, part_arrays
from moekd_ray.train_loop import make_loader, predict_logits, probs1, torch_step, train_epoch, weighted_ce


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moekd_ray.bench", description=__doc__.splitlines()[0])
    p.add_argument("--train-rows", type=int, default=600, help="Devign training rows (split among the K experts)")
    p.add_argument("--eval-rows", type=int, default=100, help="valid/test rows (each expert validates every epoch)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128, help="tokens per function")
    for name, default in (("hidden", 64), ("layers", 2), ("heads", 4), ("ffn", 256), ("vocab", 2000)):
        p.add_argument(f"--{name}", type=int, default=default, help="expert model size")
    p.add_argument("--k", type=int, default=2, help="number of experts")
    p.add_argument("--partition", default="random", help="kmeans|project|length|random (random: equal parts)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_config(a: argparse.Namespace, out: Path) -> MoEKDConfig:
    m, s = "experts.model", "experts.schedule"
    return load_config(None, [
        f"seed={a.seed}", f"output_dir={out}", f"ray.storage_path={out / 'ray'}",
        f"data.train_rows={a.train_rows}", f"data.eval_rows={a.eval_rows}", f"partition.strategy={a.partition}",
        f"experts.k={a.k}", f"{m}.vocab_size={a.vocab}", f"{m}.hidden_size={a.hidden}", f"{m}.num_layers={a.layers}",
        f"{m}.num_heads={a.heads}", f"{m}.ffn_size={a.ffn}", f"{m}.max_length={a.max_length}",
        f"{s}.epochs={a.epochs}", f"{s}.batch_size={a.batch_size}",
        "experts.resources.num_workers=1", "experts.resources.cpus_per_worker=1",
    ])


def ray_rates(result) -> float:
    """Mean samples/s over the epochs expert_worker reported (train_epoch's own timing inside the worker)."""
    return float(np.mean([r["samples_per_s"] for r in ray_runtime.epoch_rows(result)]))


def plain_expert(cfg: MoEKDConfig, k: int, train: dict, valid: dict, threads: int) -> tuple[float, float]:
    """expert_worker's work for expert k without Ray, in this process: (mean samples/s, wall seconds)."""
    sched, seed, old = cfg.experts.schedule, cfg.seed + k, torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start, rates = time.perf_counter(), []
        model = build_model(cfg.experts.specs()[k], seed)
        loader = make_loader(train, sched.batch_size, shuffle=True, seed=seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=sched.lr, weight_decay=sched.weight_decay)
        for _ in range(sched.epochs):
            rates.append(train_epoch(model, loader, weighted_ce, torch_step(optimizer))["samples_per_s"])
            classification_metrics(valid["labels"], probs1(predict_logits(model, valid, 64)))
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
        return float(np.mean(rates)), time.perf_counter() - start
    finally:
        torch.set_num_threads(old)


def main(argv=None) -> None:
    a = parse_args(argv)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="moekd-bench-") as tmp:
        out = Path(tmp)
        cfg = make_config(a, out)
        threads = int(cfg.experts.resources.cpus_per_worker)  # expert_worker's torch thread count
        inputs = prepare(cfg, out)
        t0 = time.perf_counter()
        ray_runtime.init_ray(cfg)
        init_s = time.perf_counter() - t0
        print_setup(cfg, inputs, threads, init_s, load_start)

        warm_s = warm_up(cfg, inputs)
        conc, conc_s = fit_concurrently(cfg, inputs)
        seq, seq_s = fit_sequentially(cfg, inputs)
        plain = fit_plain(cfg, inputs, threads)
        # Per-epoch metrics live in the checkpoints under `tmp`: read them before it goes.
        conc_rates, seq_rates = [ray_rates(r) for r in conc], [ray_rates(r) for r in seq]
        ray.shutdown()
    print_results(cfg.experts.k, Measured(warm_s, conc_s, seq_s, conc_rates, seq_rates, plain), load_start)


@dataclass
class Inputs:
    """The experts' data as the pipeline makes it, and the seconds making it took."""

    data: dict
    labels: dict[str, np.ndarray]
    toks: list  # a tokenizer per expert
    enc: list  # each expert's encoded splits
    parts: np.ndarray  # the expert each training row goes to
    seconds: float


@dataclass
class Measured:
    """What the bench measured: wall seconds of the fits, the fits' samples/s, and the plain loop's (samples/s,
    wall seconds) per expert."""

    warm_s: float
    conc_s: float
    seq_s: list[float]
    conc_rates: list[float]
    seq_rates: list[float]
    plain: list[tuple[float, float]]


def prepare(cfg: MoEKDConfig, out: Path) -> Inputs:
    """Devign rows, the experts' tokenizers and encodings, and the partition, as the pipeline makes them."""
    t0 = time.perf_counter()
    data = load_devign(cfg.data, cfg.seed)
    labels = {s: np.asarray(data[s]["target"], dtype=np.int64) for s in SPLITS}
    funcs = {s: list(data[s]["func"]) for s in SPLITS}
    toks, _ = make_tokenizers(cfg, funcs["train"], out)  # one per expert (shared when specs are equal)
    enc = encode_for_experts(cfg, toks, funcs)
    parts = partition(funcs["train"], list(data["train"]["project"]), cfg.partition.strategy.value, cfg.experts.k,
                      cfg.seed, cfg.partition.hash_features)
    return Inputs(data, labels, toks, enc, parts, time.perf_counter() - t0)


def print_setup(cfg: MoEKDConfig, inputs: Inputs, threads: int, init_s: float, load_start: float) -> None:
    """The header: versions, data, partition, model, tokens, training settings and setup times."""
    spec, sched, k = cfg.experts.model, cfg.experts.schedule, cfg.experts.k  # every expert: this spec
    part_rows = [r["rows"] for r in partition_table(inputs.parts, inputs.labels["train"], k)]
    fill = float(inputs.enc[0]["train"]["attention_mask"].sum(1).mean())
    print("=" * 78)
    print(f"moekd_ray.bench  torch {torch.__version__}, ray {ray.__version__}, "
          f"Ray CPUs {ray.cluster_resources().get('CPU', 0):.0f}")
    print(f"data:    {describe(inputs.data)} (Devign, seed {cfg.seed})")
    print(f"parts:   {cfg.partition.strategy.value}, K={k}, rows per expert {part_rows}")
    print(f"model:   RoBERTa hidden {spec.hidden_size}, {spec.num_layers} layers, {spec.num_heads} heads, "
          f"ffn {spec.ffn_size}, vocab {len(inputs.toks[0])}/{spec.vocab_size}, "
          f"{num_params(build_model(spec, 0)):,} params")
    print(f"tokens:  max_length {spec.max_length} (mean real tokens {fill:.0f}; batches trimmed to their longest)")
    print(f"train:   {sched.epochs} epoch(s), batch {sched.batch_size}, AdamW lr {sched.lr}, "
          f"1 Ray worker x {cfg.experts.resources.cpus_per_worker:g} CPU per expert, torch threads {threads} "
          "(worker and plain loop)")
    print(f"setup:   data+tokenizer+partition {inputs.seconds:.1f} s, init_ray {init_s:.1f} s; "
          f"1-min load average before start {load_start:.2f} on {os.cpu_count()} cores")
    print("=" * 78, flush=True)


def warm_up(cfg: MoEKDConfig, inputs: Inputs) -> float:
    """0. One expert fit, not measured (the session's first fit pays one-time costs): its wall seconds."""
    print("\n== 0. warm-up: one expert fit, not measured (the session's first fit pays one-time costs)", flush=True)
    t0 = time.perf_counter()
    expert_trainers(cfg, inputs.enc, inputs.labels, inputs.parts, "warmup", cfg.ray.storage_path)[0].fit()
    return time.perf_counter() - t0


def fit_concurrently(cfg: MoEKDConfig, inputs: Inputs) -> tuple[list, float]:
    """1a. The K experts fitted at once (ray_runtime.fit_all): their results and the wall seconds of all."""
    print(f"\n== 1a. {cfg.experts.k} experts at once: ray_runtime.fit_all", flush=True)
    t0 = time.perf_counter()
    trainers = expert_trainers(cfg, inputs.enc, inputs.labels, inputs.parts, "concurrent", cfg.ray.storage_path)
    results, _ = ray_runtime.fit_all(trainers)
    seconds = time.perf_counter() - t0
    print(f"== concurrent: {seconds:.1f} s", flush=True)
    return results, seconds


def fit_sequentially(cfg: MoEKDConfig, inputs: Inputs) -> tuple[list, list[float]]:
    """1b. The K experts fitted one after another: their results and the wall seconds of each."""
    print(f"\n== 1b. {cfg.experts.k} experts one after another: trainer.fit()", flush=True)
    results, seconds = [], []
    for trainer in expert_trainers(cfg, inputs.enc, inputs.labels, inputs.parts, "sequential", cfg.ray.storage_path):
        t0 = time.perf_counter()
        results.append(trainer.fit())
        seconds.append(time.perf_counter() - t0)
        print(f"== sequential expert_{len(results) - 1}: {seconds[-1]:.1f} s", flush=True)
    return results, seconds


def fit_plain(cfg: MoEKDConfig, inputs: Inputs, threads: int) -> list[tuple[float, float]]:
    """2. Each expert's work in a plain PyTorch loop in this process: (samples/s, wall seconds) per expert."""
    print(f"\n== 2. plain PyTorch loop in the driver ({threads} torch thread)", flush=True)
    enc, labels = inputs.enc, inputs.labels
    plain = [plain_expert(cfg, j, part_arrays(enc[j]["train"], labels["train"], inputs.parts, j, cfg),
                          {**enc[j]["valid"], "labels": labels["valid"]}, threads) for j in range(cfg.experts.k)]
    for j, (rate, wall) in enumerate(plain):
        print(f"== plain expert_{j}: {rate:.1f} samples/s, {wall:.1f} s", flush=True)
    return plain


def print_results(k: int, m: Measured, load_start: float) -> None:
    """The results table: a column per expert and one for all, then the load average before and after."""
    w = 12
    names = [f"expert_{j}" for j in range(k)]
    print("\n" + "=" * 78 + "\nRESULTS")
    print(f"{'':<44}" + "".join(f"{n:>{w}}" for n in names) + f"{'all':>{w}}")

    def line(label, vals, total=""):
        cells = "".join(f"{'-':>{w}}" if v is None else f"{v:>{w}.{2 if 'ratio' in label else 1}f}" for v in vals)
        print(f"{label:<44}{cells}{total:>{w}}")

    seq_s, plain = m.seq_s, m.plain
    line("0. warm-up fit (excluded)", [None] * k, f"{m.warm_s:.1f}")
    print("1. concurrent vs sequential (wall s, incl. Ray overhead)")
    line("  concurrent: fit_all of all K", [None] * k, f"{m.conc_s:.1f}")
    line("  sequential: one fit() after another", seq_s, f"{sum(seq_s):.1f}")
    print(f"{'  ratio sequential / concurrent':<44}{'':>{w * k}}{sum(seq_s) / m.conc_s:>{w}.2f}")
    print("2. Ray Train vs plain loop (train_epoch samples/s)")
    line("  Ray worker, concurrent fits", m.conc_rates)
    line("  Ray worker, sequential fit (alone)", m.seq_rates)
    line("  plain loop in driver", [p[0] for p in plain])
    line("  ratio Ray sequential / plain", [r / p[0] for r, p in zip(m.seq_rates, plain)])
    print("   end-to-end wall s (model build, train, validate, save)")
    line("  Ray fit (sequential)", seq_s, f"{sum(seq_s):.1f}")
    line("  plain loop", [p[1] for p in plain], f"{sum(p[1] for p in plain):.1f}")
    line("  Ray fixed cost per fit (Ray - plain)", [s - p[1] for s, p in zip(seq_s, plain)])
    load_end = os.getloadavg()[0]
    print(f"1-min load average: {load_start:.2f} before, {load_end:.2f} after")
    if load_start > 1.0:
        print("WARNING: the machine was busy before the run; other processes share the cores and skew every number")
    print("=" * 78)


if __name__ == "__main__":
    main()
