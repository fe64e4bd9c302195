"""The learned router fitted in-sample (the labelled rows its experts trained on, as the benchmark fits it) or on
validation, against the plain mean, on a benchmark's cached teachers (BENCHMARKS.md "Robustness ablation").

    python docs/router_holdout.py jobs/robustness_ablation.yaml runs/benchmark-teachers/<digest>
"""
import sys
from pathlib import Path

import numpy as np

from moekd_ray.config import load_config
from moekd_ray.data import load_devign
from moekd_ray.metrics import classification_metrics
from moekd_ray.partition import code_features
from moekd_ray.recipes.benchmark import PROTOCOL_SPLITS, split_transfer
from moekd_ray.stages.aggregate import expert_weights, fit_gate, load_soft_targets, soft_targets

cfg = load_config(sys.argv[1])
data = load_devign(cfg.data, cfg.seed)
funcs, labels, _ = split_transfer(data, cfg.benchmark.labelled_fraction, cfg.seed)
flat = load_soft_targets(Path(sys.argv[2]) / "logits.safetensors")
logits = {s: flat[s]["experts"] for s in PROTOCOL_SPLITS}
features = {s: code_features(funcs[s], cfg.partition.hash_features) for s in PROTOCOL_SPLITS}
quiet = lambda *_: None  # noqa: E731
gates = {
    "router fitted in-sample": fit_gate(cfg, features, logits, labels, log=quiet),
    "router fitted on valid": fit_gate(  # validation swapped in as the router's training splitcfg, *({**d, "train": d["valid"]} for d in (features, logits, labels)),
                                       log=quiet),
    "plain mean": {s: np.zeros((len(labels[s]), cfg.experts.k), np.float32) for s in labels},
}
for name, g in gates.items():
    weights = expert_weights(cfg, g["test"]).mean(0) if name != "plain mean" else np.full(cfg.experts.k, 1 / cfg.experts.k)
    scores = [f"{s} acc {classification_metrics(labels[s], soft_targets(cfg, logits[s], g[s], 1.0)[:, 1])['accuracy']:.3f}"
              for s in ("valid", "test")]
    print(f"{name:24s} {', '.join(scores)}; mean test weights {[round(float(w), 2) for w in weights]}")
