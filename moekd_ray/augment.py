"""Robust distillation: the transfer set plus renamed or restructured copies of its functions.

Each copy is distilled towards the soft targets of its **original** function: renaming or a semantics-preserving
edit must not change the answer. `distill.augment_ratio` copies per function (0.5: a seeded half of the functions
get one copy; 2: every function gets two). A copy is either
  random       every renamable identifier (tree-sitter, `identifiers`) gets a random name from the
               training code's identifier vocabulary,
  random-edits EDITS_PER_COPY random structural edits (`attacks.structural`: dead code, swaps, for/while, braces,
               parentheses, split/merged declarations), or
  adversarial  (`distill.augment_attack` = an attack's name) what that attack finds against the teachers, within
               `distill.augment_budget` queries: it tries to move the plain mean of the experts away from the class
               the aggregated soft targets give the original. A function's first copy is the attack's result when
               the attack changed anything; other copies, and functions the experts already disagree on, get
               random copies (random edits after the structural attack, random names after the others).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from moekd_ray.identifiers import Identifiers
from moekd_ray.attacks.structural import random_edits
from moekd_ray.attacks.workers import attack_examples, format_summary, summarize
from moekd_ray.tokenization import encode

EDITS_PER_COPY = 4


def _copies(rng: np.random.Generator, n: int, ratio: float) -> np.ndarray:
    whole, part = int(ratio), ratio - int(ratio)
    return np.full(n, whole) + (rng.random(n) < part)


def copies_per_function(n: int, ratio: float, seed: int) -> np.ndarray:
    """How many copies each of `n` functions gets (seeded): the counts `renamed_variants` uses."""
    return _copies(np.random.default_rng([seed, 7]), n, ratio)


def renamed_variants(funcs: list[str], pool: list[str], ratio: float, seed: int,
                     adversarial: dict[int, str] | None = None, edits: bool = False) -> tuple[list[str], np.ndarray]:
    """Renamed copies (`edits`: restructured copies) and, for each, the index of its original in `funcs`.
    `adversarial` maps a function's index to an attack-found copy, used as its first copy. Functions without a
    renamable identifier (an edit site) get no copy (it would equal the original)."""
    rng = np.random.default_rng([seed, 7])
    copies = _copies(rng, len(funcs), ratio)  # as copies_per_function; the same generator then draws the names
    adversarial = adversarial or {}
    variants, source = [], []
    for i in np.flatnonzero(copies):
        if i in adversarial:
            variants.append(adversarial[i])
            source.append(i)
        if edits:
            for _ in range(copies[i] - (i in adversarial)):
                copy, done = random_edits(funcs[i], EDITS_PER_COPY, rng)
                if done:
                    variants.append(copy)
                    source.append(i)
            continue
        ids = Identifiers(funcs[i])
        if not ids.names:
            continue
        for _ in range(copies[i] - (i in adversarial)):
            picks = rng.choice(len(pool), size=min(len(pool), 4 * len(ids.names) + 8), replace=False)
            fresh = [pool[j] for j in picks if ids.is_valid_new_name(pool[j])]
            if len(fresh) < len(ids.names):
                break  # a pool too small for this function: keep it unaugmented
            variants.append(ids.rename(dict(zip(ids.names, fresh))))
            source.append(i)
    return variants, np.asarray(source, dtype=np.int64)


def with_renamed_copies(enc: dict[str, np.ndarray], labels: np.ndarray, teacher: np.ndarray, funcs: list[str],
                        tokenizer, max_length: int, pool: list[str], ratio: float, seed: int,
                        adversarial: dict[int, str] | None = None, edits: bool = False, pairs: bool = False):
    """The encoded transfer set, its labels and teacher rows, each extended by the copies (which carry their
    original's label and teacher row). Returns (enc, labels, teacher, number of copies)."""
    variants, source = renamed_variants(funcs, pool, ratio, seed, adversarial, edits)
    if not variants:
        return enc, labels, teacher, 0
    extra = encode(tokenizer, variants, max_length)
    n, original = len(labels), enc
    enc = {k: np.concatenate([a, extra[k]]) for k, a in enc.items()}
    if pairs:  # each row also carries its original (itself for an original, has_pair 0), for the consistency term
        pair_of = np.concatenate([np.arange(n), source])
        enc.update({f"pair_{k}": a[pair_of] for k, a in original.items()},
                   has_pair=np.concatenate([np.zeros(n, np.int32), np.ones(len(source), np.int32)]))
    return enc, np.concatenate([labels, labels[source]]), np.concatenate([teacher, teacher[source]]), len(variants)


def robust_transfer_set(distill, enc: dict[str, np.ndarray], labels: np.ndarray, teacher: np.ndarray,
                        funcs: list[str], tokenizer, max_length: int, pool: list[str], seed: int,
                        find_adversarial: Callable[[], dict[int, str]], log) -> tuple:
    """The transfer set a student distils from under `distill` (a DistillConfig): as given when augment_ratio is 0,
    else with its renamed copies, random or (augment_attack) found by `find_adversarial()` (called only then).
    Returns (enc, labels, teacher, counts); counts (renamed_copies, attack_found_copies) is empty without copies."""
    if not distill.augment_ratio:
        return enc, labels, teacher, {}
    adversarial = find_adversarial() if not distill.augment_attack.startswith("random") else None
    edits = distill.augment_attack in ("random-edits", "structural")
    enc, labels_out, teacher, n = with_renamed_copies(enc, labels, teacher, funcs, tokenizer, max_length, pool,
                                                      distill.augment_ratio, seed, adversarial, edits,
                                                      pairs=distill.consistency_weight > 0)
    log(f"{n:,} {'restructured' if edits else 'identifier-renamed'} copies ({len(adversarial or {}):,} "
        f"attack-found) join the {len(labels):,} transfer functions")
    return enc, labels_out, teacher, {"renamed_copies": n, "attack_found_copies": len(adversarial or {})}


def adversarial_renamings(cfg, victim: str | Path, target: str, funcs: list[str], teacher: np.ndarray,
                          pool: list[str], log=print) -> dict[int, str]:
    """Attack-found renamings of the functions that get copies (seeded by `cfg.seed`), as {index: code}.

    The victim (`attacks.victim.load_victim(victim, target)`, e.g. a run folder's "uniform" mean of its experts)
    is attacked with `distill.augment_attack` for `distill.augment_budget` queries per function, the "true"
    class being the soft targets' argmax; `attack.workers` Ray actors share the work."""
    chosen = np.flatnonzero(copies_per_function(len(funcs), cfg.distill.augment_ratio, cfg.seed))
    examples = [(int(i), funcs[i], int(teacher[i].argmax())) for i in chosen]
    acfg = cfg.with_values({"attack.method": cfg.distill.augment_attack,
                            "attack.query_budget": cfg.distill.augment_budget})
    start = time.perf_counter()
    rows = attack_examples(victim, target, acfg, examples, pool, log=lambda *_: None)
    log(f"adversarial copies against the teachers ({target}): "
        f"{format_summary(acfg.attack.method, summarize(rows, time.perf_counter() - start))}")
    return {r["index"]: r["adversarial"] for r in rows if r["adversarial"] != r["original"]}
