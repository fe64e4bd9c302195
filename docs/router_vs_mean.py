"""The learned router against the plain mean of the same experts, on a finished `moekd run`'s cached targets
(docs/measured.md, BENCHMARKS.md "Specialisation"): each mixture's threshold chosen on validation as the pipeline
chooses it (eval.threshold), then valid and test accuracy and F1, and each router's test difference from the plain
mean with a 95% paired bootstrap interval (the same resampled test functions for all). No expert is run again: it
reads <run folder>/soft_targets.safetensors.

    python docs/router_vs_mean.py runs/devign-cpu-<stamp>-<digest> [--resamples 2000]
    python docs/router_vs_mean.py <run folder> [<run folder of another seed> ...] --refit router.part_loss_weight=1

--refit KEY=VALUE ... also fits the router again with those overrides of the run's config, on the run's cached
training-split expert outputs, with the code features and parts recomputed as the pipeline's partition stage makes
them (the same experts: only the router differs).

--with-experts <run folder> appends another run's experts (the same functions: the same data settings and seed,
checked by their labels) before the plain mean and the refit: what a mixture with those experts too would give,
without training anything. The refit then needs router.part_loss_weight=0 (the parts are the first run's K).
--keep I J ... keeps only those experts (0-based, this run's first, then the appended ones): another choice of
families, e.g. `--keep 1 3` for this run's second expert and the other run's second.

    python docs/router_vs_mean.py runs/devign-cpu-<stamp> --with-experts runs/families-<stamp> \
        --refit router.part_loss_weight=0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from moekd_ray.config import load_config
from moekd_ray.data import load_devign
from moekd_ray.decision import pick_threshold
from moekd_ray.metrics import classification_metrics
from moekd_ray.partition import features_and_parts
from moekd_ray.stages.aggregate import fit_gate, load_soft_targets, soft_targets

SPLITS = ("valid", "test")


def refit_router(run: Path, overrides: list[str], targets: dict) -> tuple[dict, object]:
    """Gate logits per split of a router fitted again under `overrides`, and the config it was fitted with."""
    cfg = load_config(run / "config.yaml", overrides)
    data = load_devign(cfg.data, cfg.seed)
    funcs = {s: list(data[s]["func"]) for s in ("train",) + SPLITS}
    p = cfg.partition
    features, parts = features_and_parts(funcs, list(data["train"]["project"]), p.strategy.value, cfg.experts.k,
                                         cfg.seed, p.hash_features)
    logits = {s: targets[s]["expert_logits"] for s in funcs}
    labels = {s: targets[s]["labels"].astype(int) for s in funcs}
    return fit_gate(cfg, features, logits, labels, parts), cfg


def with_experts(targets: dict, other: Path) -> dict:
    """`targets` with another run's experts appended after its own, split by split."""
    extra = load_soft_targets(other / "soft_targets.safetensors")
    for s in targets:
        if s not in extra or not np.array_equal(targets[s]["labels"], extra[s]["labels"]):
            raise SystemExit(f"--with-experts {other}: its {s} split holds other functions; give a run of the same "
                             "data settings and seed")
        logits = np.concatenate([targets[s]["expert_logits"], extra[s]["expert_logits"]], axis=1)
        targets[s] = {**targets[s], "expert_logits": logits}
    return targets


def compare(run: Path, refit: list[str], other: Path | None = None, keep: list[int] | None = None) -> dict:
    """Print each mixture's valid and test figures for one run (its experts, and `other`'s after them; only `keep`'s
    if given); return, per mixture, which test functions it gets right at its validation-chosen threshold."""
    cfg = load_config(run / "config.yaml")
    targets = load_soft_targets(run / "soft_targets.safetensors")
    if other is not None:
        targets = with_experts(targets, other)
    if keep:
        targets = {s: {**t, "expert_logits": t["expert_logits"][:, keep]} for s, t in targets.items()}
    k = targets["test"]["expert_logits"].shape[1]
    plain = cfg.with_values({"router": {"kind": "uniform"}, "experts.k": k, "experts.models": None,
                             "experts.schedules": None})
    probs = {"plain mean": {s: soft_targets(plain, targets[s]["expert_logits"], targets[s]["gate_logits"], 1.0)[:, 1]
                            for s in SPLITS},
             "router": {s: targets[s]["mixture_probs"][:, 1] for s in SPLITS}}
    weights = {"router": targets["test"]["weights"].mean(0)}
    if refit:
        gates, refit_cfg = refit_router(run, refit, targets)
        name = "router " + " ".join(refit)
        probs[name] = {s: soft_targets(refit_cfg, targets[s]["expert_logits"], gates[s], 1.0)[:, 1] for s in SPLITS}
        weights[name] = np.array([np.mean(gates["test"].argmax(1) == j) for j in range(k)])
    labels = {s: targets[s]["labels"].astype(int) for s in SPLITS}
    correct = {}
    print(f"== {run}" + (f" with the experts of {other}" if other else "") + (f", experts {keep} kept" if keep else "")
          + (f" ({k} experts; 'router' is the run's own)" if other or keep else ""))
    for name, p in probs.items():
        cut = pick_threshold(cfg.eval, labels["valid"], p["valid"])
        m = {s: classification_metrics(labels[s], p[s], cut) for s in SPLITS}
        correct[name] = ((p["test"] >= cut) == labels["test"]).astype(float)
        print(f"{name:10s} threshold {cut:.2f}: valid acc {m['valid']['accuracy']:.4f} F1 {m['valid']['f1']:.3f}; "
              f"test acc {m['test']['accuracy']:.4f} F1 {m['test']['f1']:.3f}")
    for name, w in weights.items():
        print(f"{name}: mean test weights (refit: share of functions routed to each) {[round(float(x), 3) for x in w]}")
    return correct


def interval(name: str, diff: np.ndarray, resamples: int, what: str) -> None:
    """diff [N]: per test function, a router's correctness minus the plain mean's (averaged over runs)."""
    draws = np.random.default_rng(0).integers(len(diff), size=(resamples, len(diff)))
    low, high = np.quantile(diff[draws].mean(1), [0.025, 0.975])
    verdict = "significant" if low > 0 or high < 0 else "not significant"
    print(f"test accuracy, {name} minus plain mean{what}: {diff.mean():+.4f}, 95% paired bootstrap interval "
          f"[{low:+.4f}, {high:+.4f}] ({verdict}; {resamples} resamples)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_folders", nargs="+", help="one run, or several of one setting (seeds): then also their "
                        "mean difference, the same test functions resampled for every run")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--refit", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--with-experts", type=Path, default=None, metavar="RUN_FOLDER")
    parser.add_argument("--keep", type=int, nargs="+", default=None, metavar="I")
    args = parser.parse_args()
    runs = [compare(Path(run), args.refit, args.with_experts, args.keep) for run in args.run_folders]
    for correct in runs:
        for name in list(correct)[1:]:
            interval(name, correct[name] - correct["plain mean"], args.resamples, "")
    if len(runs) > 1:
        for name in list(runs[0])[1:]:
            diff = np.mean([c[name] - c["plain mean"] for c in runs], axis=0)
            interval(name, diff, args.resamples, f", mean over {len(runs)} runs")


if __name__ == "__main__":
    main()
