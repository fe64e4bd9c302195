"""The attack stage: renaming and structural attacks (attacks/methods.py) on many functions, in parallel.

A seeded sample of `attack.n` functions of `attack.split` is classified once; functions the model gets wrong, or
that have no renamable identifier (for the structural attack: no edit site), are skipped (and counted); every other function is attacked with
`attack.query_budget` queries. `attack.workers` Ray actors each load the model once and attack chunks of examples;
each example has its own seeded generator, so a parallel run gives the serial run's adversarial examples.
Metrics follow ALERT: attack success rate over attacked functions, mean queries, mean renamed identifiers,
robust accuracy (correct and not flipped, over all sampled functions).

Used by `moekd attack` and the pipeline's attack stage (stages/attack.py), the benchmark, tune's robust objective and
the robust students' attack-found copies (`augment.adversarial_renamings`).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np
import ray
import torch

from moekd_ray import progress, ray_runtime
from moekd_ray.identifiers import Identifiers, identifier_vocabulary
from moekd_ray.attacks.methods import ATTACKS, FLIP, RENAMING
from moekd_ray.attacks.structural import Structure
from moekd_ray.attacks.victim import BudgetedVictim, load_victim
from moekd_ray.config import AttackConfig, MoEKDConfig
from moekd_ray.data import load_devign

CHUNK = 4  # examples per actor call: small enough for a live progress line, large enough to amortise the call


@contextlib.contextmanager
def _one_thread():
    # One torch thread per attacking worker: the workers are the parallelism, and the scores stay bit-identical
    # between a serial and a parallel run.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class AttackWorker:
    """Loads the victim once; attacks examples. Used directly (serial) and as a Ray actor (parallel)."""

    def __init__(self, folder: str, target: str, attack: dict, pool: list[str], seed: int, batch_size: int):
        self.cfg, self.pool, self.seed = AttackConfig.model_validate(attack), pool, seed
        # A GPU when Ray gave this actor one (attack.gpus_per_worker): CodeBERT-sized victims are ~100x faster there.
        device = "cuda" if self.cfg.gpus_per_worker and torch.cuda.is_available() else "cpu"
        with _one_thread():
            self.model = load_victim(folder, target, batch_size, device)
            self.pool_vectors = None
            if self.cfg.method == "alert":
                v = self.model.embed_names(pool)
                self.pool_vectors = v / np.linalg.norm(v, axis=1, keepdims=True)

    def attack(self, examples: list[tuple[int, str, int]]) -> list[dict]:
        with _one_thread():
            p_vuln = self.model([func for _, func, _ in examples])  # the clean prediction is not charged
            return [self._one(i, func, label, float(p)) for (i, func, label), p in zip(examples, p_vuln)]

    def _one(self, index: int, func: str, label: int, p_vuln: float) -> dict:
        p0 = p_vuln if label == 1 else 1.0 - p_vuln
        row = {"index": index, "label": label, "p_true": p0, "status": "", "queries": 0, "renamed": 0,
               "p_true_adv": p0, "seconds": 0.0, "mapping": "{}", "edits": "[]", "original": func,
               "adversarial": func}
        if p0 < FLIP:
            return {**row, "status": "skipped_misclassified"}
        ids = Identifiers(func, include_function_name=self.cfg.include_function_name)
        if self.cfg.method in RENAMING and not ids.names:
            return {**row, "status": "skipped_no_identifiers"}
        if self.cfg.method not in RENAMING and not Structure(func).edits:
            return {**row, "status": "skipped_no_edits"}
        victim = BudgetedVictim(self.model, label, self.cfg.query_budget)
        start = time.perf_counter()
        out = ATTACKS[self.cfg.method](
            victim, ids, p0, self.pool, np.random.default_rng([self.seed, index]), candidates=self.cfg.candidates,
            population=self.cfg.population, pool_vectors=self.pool_vectors, embed=self.model.embed_names,
        )
        return {**row, "status": "success" if out.success else "failed", "queries": victim.queries,
                "renamed": len(out.mapping), "p_true_adv": out.p_true, "seconds": time.perf_counter() - start,
                "mapping": json.dumps(out.mapping), "edits": json.dumps(out.edits), "adversarial": out.code}


def attack_examples(folder, target, cfg: MoEKDConfig, examples, pool, log=print) -> list[dict]:
    """Every example's outcome row, from `attack.workers` Ray actors (or in this process when workers = 1)."""
    args = (str(folder), target, cfg.attack.model_dump(mode="json"), pool, cfg.seed, cfg.eval.batch_size)
    chunks = [examples[i : i + CHUNK] for i in range(0, len(examples), CHUNK)]
    rows: list[dict] = []

    def show():  # on the console's status line (the summary is the caller's line)
        done = [r for r in rows if r["status"] in ("success", "failed")]
        asr = sum(r["status"] == "success" for r in done) / max(len(done), 1)
        progress.report(f"attack {cfg.attack.method}", len(rows), len(examples), "functions",
                        f"{len(done)} attacked, ASR {asr:.1%}")

    if cfg.attack.workers == 1:
        worker = AttackWorker(*args)
        for chunk in chunks:
            rows += worker.attack(chunk)
            show()
    else:
        # Chunks go only to workers Ray has placed; the others join the pool once placed. (Handing a chunk to every
        # worker at once, one that cannot be placed while a training run holds its CPU keeps its chunk until that
        # run ends: the benchmark's attacks then waited an hour for AVATAR's distillation.)
        actor = ray.remote(num_cpus=1, num_gpus=cfg.attack.gpus_per_worker)(AttackWorker)
        actors = [actor.remote(*args) for _ in range(cfg.attack.workers)]
        unplaced = {a.__ray_ready__.remote(): a for a in actors}
        placed, _ = ray.wait(list(unplaced), num_returns=1)
        pool_ = ray.util.ActorPool([unplaced.pop(ref) for ref in placed])
        for chunk in chunks:
            pool_.submit(lambda a, c: a.attack.remote(c), chunk)
        while pool_.has_next():
            rows += pool_.get_next_unordered()
            show()
            if unplaced:
                placed, _ = ray.wait(list(unplaced), num_returns=len(unplaced), timeout=0)
                for ref in placed:
                    pool_.push(unplaced.pop(ref))
        for a in unplaced.values():
            ray.kill(a)
    return sorted(rows, key=lambda r: r["index"])


def summarize(rows: list[dict], seconds: float) -> dict:
    attacked = [r for r in rows if r["status"] in ("success", "failed")]
    success = [r for r in attacked if r["status"] == "success"]
    correct = [r for r in rows if r["status"] != "skipped_misclassified"]
    return {
        "functions": len(rows),
        "attacked": len(attacked),
        "skipped_misclassified": sum(r["status"] == "skipped_misclassified" for r in rows),
        "skipped_no_identifiers": sum(r["status"] == "skipped_no_identifiers" for r in rows),
        "skipped_no_edits": sum(r["status"] == "skipped_no_edits" for r in rows),
        "asr": len(success) / max(len(attacked), 1),
        # ASR on each class: a model can be hard to flip on the class it favours and easy on the other.
        **{f"asr_{name}": sum(r["label"] == c for r in success) / max(sum(r["label"] == c for r in attacked), 1)
           for c, name in ((0, "safe"), (1, "vulnerable"))},
        "mean_queries": float(np.mean([r["queries"] for r in attacked])) if attacked else 0.0,
        "mean_renamed": float(np.mean([r["renamed"] for r in success])) if success else 0.0,
        "mean_edits": float(np.mean([len(json.loads(r.get("edits", "[]"))) for r in success])) if success else 0.0,
        "clean_accuracy": len(correct) / max(len(rows), 1),
        "robust_accuracy": (len(correct) - len(success)) / max(len(rows), 1),
        "seconds": seconds,
        "attacks_per_s": len(attacked) / seconds if seconds else 0.0,
    }


def asr_by_budget(rows: list[dict], budget: int, points: int = 12) -> tuple[list[int], list[float]]:
    """ASR had the budget been b: a success counts when it needed at most b queries (one run gives the curve)."""
    attacked = [r for r in rows if r["status"] in ("success", "failed")]
    budgets = sorted({max(1, int(round(b))) for b in np.linspace(1, budget, points)})
    asr = [sum(r["status"] == "success" and r["queries"] <= b for r in attacked) / max(len(attacked), 1)
           for b in budgets]
    return budgets, asr


def substitute_pool(cfg: MoEKDConfig, train_funcs: list[str]) -> list[str]:
    """The names attacks and robust copies rename to: the `attack.vocab_size` most frequent identifiers of the
    first `attack.vocab_rows` training functions."""
    return identifier_vocabulary(list(train_funcs[: cfg.attack.vocab_rows]), max_size=cfg.attack.vocab_size)


def sample_examples(cfg: MoEKDConfig) -> tuple[list[tuple[int, str, int]], list[str]]:
    """The seeded sample of (row index, function, label) to attack, and the substitute pool from training code."""
    data = load_devign(cfg.data, cfg.seed)
    split = data[cfg.attack.split]
    rng = np.random.default_rng(cfg.seed)
    idx = sorted(rng.choice(len(split), size=min(cfg.attack.n, len(split)), replace=False).tolist())
    examples = [(i, split[i]["func"], int(split[i]["target"])) for i in idx]
    train = data["train"]["func"]
    pool = substitute_pool(cfg, list(train))
    return examples, pool


def validation_sample(cfg: MoEKDConfig, funcs: dict[str, list[str]], valid_labels, n: int) -> dict:
    """What every trial of a search attacks its student on: one seeded sample of `n` validation functions (the
    same for every trial, so trials' ASRs compare) and the substitute pool from training code."""
    rng = np.random.default_rng(cfg.seed)
    picked = sorted(rng.choice(len(funcs["valid"]), size=min(n, len(funcs["valid"])), replace=False).tolist())
    return {"examples": [(i, funcs["valid"][i], int(valid_labels[i])) for i in picked],
            "pool": substitute_pool(cfg, funcs["train"])}


def attack_trial_student(checkpoint, folder: Path, tokenizer, cfg: MoEKDConfig, sample: dict, method: str,
                         budget: int) -> dict:
    """A search trial's student: its checkpoint and tokenizer into `folder` (a loadable student), attacked with
    `method` at `budget` queries a function on `validation_sample`'s examples in this process; the summary."""
    ray_runtime.copy_atomically(checkpoint, folder)
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    attack = cfg.attack.model_copy(update={"method": method, "query_budget": budget})
    worker = AttackWorker(str(folder), "student", attack.model_dump(mode="json"), sample["pool"], cfg.seed,
                          cfg.eval.batch_size)
    start = time.perf_counter()
    return summarize(worker.attack(sample["examples"]), time.perf_counter() - start)


def summary_table(method: str, s: dict) -> str:
    """The summary as an aligned two-column table: what `moekd attack` prints last."""
    rows = [
        ("attack", method),
        ("functions sampled", str(s["functions"])),
        ("attacked", str(s["attacked"])),
        ("skipped: misclassified", str(s["skipped_misclassified"])),
        ("skipped: no identifiers", str(s["skipped_no_identifiers"])) if method in RENAMING else
        ("skipped: no edit sites", str(s.get("skipped_no_edits", 0))),
        ("ASR", f"{s['asr']:.1%}"),
        ("mean queries", f"{s['mean_queries']:.1f}"),
        ("mean renamed", f"{s['mean_renamed']:.2f}") if method in RENAMING else
        ("mean edits", f"{s.get('mean_edits', 0.0):.2f}"),
        ("accuracy -> robust", f"{s['clean_accuracy']:.3f} -> {s['robust_accuracy']:.3f}"),
        ("seconds", f"{s['seconds']:.1f}"),
        ("attacks/s", f"{s['attacks_per_s']:.2f}"),
    ]
    key_w, value_w = max(len(k) for k, _ in rows), max(len(v) for _, v in rows)
    return "\n".join(f"{k:<{key_w}}  {v:>{value_w}}" for k, v in rows)


def format_summary(method: str, s: dict) -> str:
    renaming = method in RENAMING
    skipped = s.get("skipped_no_edits", 0) + s["skipped_no_identifiers"]
    changed = f"mean renamed {s['mean_renamed']:.2f}" if renaming else f"mean edits {s.get('mean_edits', 0.0):.2f}"
    return (f"{method}: ASR {s['asr']:.1%} of {s['attacked']} attacked ({s['skipped_misclassified']} misclassified, "
            f"{skipped} without {'identifiers' if renaming else 'edit sites'} skipped); mean queries "
            f"{s['mean_queries']:.1f}, {changed}; accuracy {s['clean_accuracy']:.3f} -> robust "
            f"{s['robust_accuracy']:.3f}; {s['seconds']:.0f} s ({s['attacks_per_s']:.2f} attacks/s)")
