"""The learned router against the plain mean of the same experts, on a finished `moekd run`'s cached targets
(docs/measured.md): each mixture's threshold chosen on validation as the pipeline chooses it (eval.threshold), then
valid and test accuracy and F1, and the test difference with a 95% paired bootstrap interval (the same resampled
test functions for both). No expert is run again: it reads <run folder>/soft_targets.safetensors.

    python docs/router_vs_mean.py runs/devign-cpu-<stamp>-<digest> [--resamples 2000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from moekd_ray.config import load_config
from moekd_ray.decision import pick_threshold
from moekd_ray.metrics import classification_metrics
from moekd_ray.stages.aggregate import load_soft_targets, soft_targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_folder")
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()
    run = Path(args.run_folder)
    cfg = load_config(run / "config.yaml")
    targets = load_soft_targets(run / "soft_targets.safetensors")
    plain = cfg.with_values({"router": {"kind": "uniform"}})
    probs = {"router": {s: targets[s]["mixture_probs"][:, 1] for s in ("valid", "test")},
             "plain mean": {s: soft_targets(plain, targets[s]["expert_logits"], targets[s]["gate_logits"], 1.0)[:, 1]
                            for s in ("valid", "test")}}
    labels = {s: targets[s]["labels"].astype(int) for s in ("valid", "test")}
    correct = {}
    for name, p in probs.items():
        cut = pick_threshold(cfg.eval, labels["valid"], p["valid"])
        m = {s: classification_metrics(labels[s], p[s], cut) for s in ("valid", "test")}
        correct[name] = (p["test"] >= cut) == labels["test"]
        print(f"{name:10s} threshold {cut:.2f}: valid acc {m['valid']['accuracy']:.4f} F1 {m['valid']['f1']:.3f}; "
              f"test acc {m['test']['accuracy']:.4f} F1 {m['test']['f1']:.3f}")
    weights = targets["test"]["weights"].mean(0)
    print(f"router's mean test weights {[round(float(w), 3) for w in weights]}")
    rng = np.random.default_rng(0)
    draws = rng.integers(len(labels["test"]), size=(args.resamples, len(labels["test"])))
    diff = correct["router"][draws].mean(1) - correct["plain mean"][draws].mean(1)
    low, high = np.quantile(diff, [0.025, 0.975])
    point = correct["router"].mean() - correct["plain mean"].mean()
    verdict = "significant" if low > 0 or high < 0 else "not significant"
    print(f"test accuracy, router minus plain mean: {point:+.4f}, 95% paired bootstrap interval "
          f"[{low:+.4f}, {high:+.4f}] ({verdict}; {args.resamples} resamples)")


if __name__ == "__main__":
    main()
