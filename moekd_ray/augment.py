"""Robust distillation: the transfer set plus identifier-renamed copies of its functions.

Each copy renames every renamable identifier of its function (tree-sitter, `attacks.identifiers`) to a random
name from the training code's identifier vocabulary, and is distilled towards the soft targets of its
**original** function: renaming must not change the answer. `distill.augment_ratio` copies per function
(0.5: a seeded half of the functions get one copy; 2: every function gets two).
"""

from __future__ import annotations

import numpy as np

from moekd_ray.attacks.identifiers import Identifiers
from moekd_ray.tokenization import encode


def renamed_variants(funcs: list[str], pool: list[str], ratio: float, seed: int) -> tuple[list[str], np.ndarray]:
    """Renamed copies and, for each, the index of its original in `funcs`. Functions without a renamable
    identifier get no copy (it would equal the original)."""
    rng = np.random.default_rng([seed, 7])
    whole, part = int(ratio), ratio - int(ratio)
    copies = np.full(len(funcs), whole) + (rng.random(len(funcs)) < part)
    variants, source = [], []
    for i in np.flatnonzero(copies):
        ids = Identifiers(funcs[i])
        if not ids.names:
            continue
        for _ in range(copies[i]):
            picks = rng.choice(len(pool), size=min(len(pool), 4 * len(ids.names) + 8), replace=False)
            fresh = [pool[j] for j in picks if ids.is_valid_new_name(pool[j])]
            if len(fresh) < len(ids.names):
                break  # a pool too small for this function: keep it unaugmented
            variants.append(ids.rename(dict(zip(ids.names, fresh))))
            source.append(i)
    return variants, np.asarray(source, dtype=np.int64)


def with_renamed_copies(enc: dict[str, np.ndarray], labels: np.ndarray, teacher: np.ndarray, funcs: list[str],
                        tokenizer, max_length: int, pool: list[str], ratio: float, seed: int):
    """The encoded transfer set, its labels and teacher rows, each extended by the renamed copies (which carry
    their original's label and teacher row). Returns (enc, labels, teacher, number of copies)."""
    variants, source = renamed_variants(funcs, pool, ratio, seed)
    if not variants:
        return enc, labels, teacher, 0
    extra = encode(tokenizer, variants, max_length)
    enc = {k: np.concatenate([a, extra[k]]) for k, a in enc.items()}
    return enc, np.concatenate([labels, labels[source]]), np.concatenate([teacher, teacher[source]]), len(variants)
