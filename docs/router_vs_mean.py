"""The learned router against the plain mean of the same experts, on a finished `moekd run`'s cached targets
(docs/measured.md, BENCHMARKS.md "Specialisation"): each mixture's threshold chosen on validation as the pipeline
chooses it (eval.threshold), then valid and test accuracy and F1, and each router's test difference from the plain
mean with a 95% paired bootstrap interval (the same resampled test functions for all). No expert is run again: it
reads <run folder>/soft_targets.safetensors.

    python docs/router_vs_mean.py runs/devign-cpu-<stamp>-<digest> [--resamples 2000]
    python docs/router_vs_mean.py <run folder> --refit router.part_loss_weight=1

--refit KEY=VALUE ... also fits the router again with those overrides of the run's config, on the run's cached
training-split expert outputs, with the code features and parts recomputed as the pipeline's partition stage makes
them (the same experts: only the router differs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from moekd_ray.config import load_config
from moekd_ray.data import load_devign
from moekd_ray.decision import pick_threshold
from moekd_ray.metrics import classification_metrics
from moekd_ray.partition import code_features, partition
from moekd_ray.stages.aggregate import fit_gate, load_soft_targets, soft_targets

SPLITS = ("valid", "test")


def refit_router(run: Path, overrides: list[str], targets: dict) -> tuple[dict, object]:
    """Gate logits per split of a router fitted again under `overrides`, and the config it was fitted with."""
    cfg = load_config(run / "config.yaml", overrides)
    data = load_devign(cfg.data, cfg.seed)
    funcs = {s: list(data[s]["func"]) for s in ("train",) + SPLITS}
    features = {s: code_features(f, cfg.partition.hash_features) for s, f in funcs.items()}
    p = cfg.partition
    parts = partition(funcs["train"], list(data["train"]["project"]), p.strategy.value, cfg.experts.k, cfg.seed,
                      p.hash_features)
    logits = {s: targets[s]["expert_logits"] for s in funcs}
    labels = {s: targets[s]["labels"].astype(int) for s in funcs}
    return fit_gate(cfg, features, logits, labels, parts), cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_folder")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--refit", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    run = Path(args.run_folder)
    cfg = load_config(run / "config.yaml")
    targets = load_soft_targets(run / "soft_targets.safetensors")
    plain = cfg.with_values({"router": {"kind": "uniform"}})
    probs = {"plain mean": {s: soft_targets(plain, targets[s]["expert_logits"], targets[s]["gate_logits"], 1.0)[:, 1]
                            for s in SPLITS},
             "router": {s: targets[s]["mixture_probs"][:, 1] for s in SPLITS}}
    weights = {"router": targets["test"]["weights"].mean(0)}
    if args.refit:
        gates, refit_cfg = refit_router(run, args.refit, targets)
        name = "router " + " ".join(args.refit)
        probs[name] = {s: soft_targets(refit_cfg, targets[s]["expert_logits"], gates[s], 1.0)[:, 1] for s in SPLITS}
        weights[name] = np.array([np.mean(gates["test"].argmax(1) == k) for k in range(cfg.experts.k)])
    labels = {s: targets[s]["labels"].astype(int) for s in SPLITS}
    correct = {}
    for name, p in probs.items():
        cut = pick_threshold(cfg.eval, labels["valid"], p["valid"])
        m = {s: classification_metrics(labels[s], p[s], cut) for s in SPLITS}
        correct[name] = (p["test"] >= cut) == labels["test"]
        print(f"{name:10s} threshold {cut:.2f}: valid acc {m['valid']['accuracy']:.4f} F1 {m['valid']['f1']:.3f}; "
              f"test acc {m['test']['accuracy']:.4f} F1 {m['test']['f1']:.3f}")
    for name, w in weights.items():
        print(f"{name}: mean test weights (refit: share of functions routed to each) {[round(float(x), 3) for x in w]}")
    rng = np.random.default_rng(0)
    draws = rng.integers(len(labels["test"]), size=(args.resamples, len(labels["test"])))
    for name in weights:
        diff = correct[name][draws].mean(1) - correct["plain mean"][draws].mean(1)
        low, high = np.quantile(diff, [0.025, 0.975])
        point = correct[name].mean() - correct["plain mean"].mean()
        verdict = "significant" if low > 0 or high < 0 else "not significant"
        print(f"test accuracy, {name} minus plain mean: {point:+.4f}, 95% paired bootstrap interval "
              f"[{low:+.4f}, {high:+.4f}] ({verdict}; {args.resamples} resamples)")


if __name__ == "__main__":
    main()
