"""Split the input space into K parts, one per expert.

The cheap code representation is hashed TF-IDF over C tokens (identifiers, numbers, operators): no vocabulary to
fit, so the same `code_features` serves the kmeans partition and the router's input, on any split.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from sklearn.cluster import KMeans
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.preprocessing import normalize

from moekd_ray.tokenization import C_TOKEN, syntax_units


def code_features(funcs: list[str], n_features: int) -> "np.ndarray":
    """Sublinear-tf, L2-normalised hashed token counts, shape [N, n_features] (sparse CSR)."""
    vec = HashingVectorizer(
        n_features=n_features, token_pattern=None, tokenizer=C_TOKEN.findall, lowercase=False,
        alternate_sign=False, norm=None,
    )
    x = vec.transform(funcs)
    x.data = 1.0 + np.log(x.data)
    return normalize(x)


def syntax_features(funcs: list[str], n_features: int):
    """As `code_features`, over each function's syntax units (node-type paths, keywords, operators, types, fields,
    called functions; no variable names): kinds of function by what their syntax tree holds."""
    vec = HashingVectorizer(n_features=n_features, analyzer=lambda f: syntax_units(f, 2), alternate_sign=False,
                            norm=None)
    x = vec.transform(funcs)
    x.data = 1.0 + np.log(x.data)
    return normalize(x)


FEATURES = {"kmeans": code_features, "syntax": syntax_features}  # the strategies that cluster


def _kmeans(funcs, projects, k, seed, n_features):
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(code_features(funcs, n_features))


def _syntax(funcs, projects, k, seed, n_features):
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(syntax_features(funcs, n_features))


def _project(funcs, projects, k, seed, n_features):
    # Projects sorted by size are dealt to parts greedily (largest into the emptiest part) so parts stay balanced.
    counts = Counter(projects)
    if len(counts) < k:
        raise ValueError(f"partition 'project' needs >= k={k} distinct projects, data has {len(counts)}; lower experts.k")
    sizes = [0] * k
    part_of = {}
    for proj, n in counts.most_common():
        j = int(np.argmin(sizes))
        part_of[proj] = j
        sizes[j] += n
    return np.array([part_of[p] for p in projects])


def _length_parts(train_funcs, funcs, k):
    """Parts of `funcs` by the character-length quantiles of `train_funcs`."""
    edges = np.quantile([len(f) for f in train_funcs], np.linspace(0, 1, k + 1)[1:-1])
    return np.searchsorted(edges, [len(f) for f in funcs], side="right")


def _length(funcs, projects, k, seed, n_features):
    return _length_parts(funcs, funcs, k)


def _random(funcs, projects, k, seed, n_features):
    return np.random.default_rng(seed).permutation(np.arange(len(funcs)) % k)


STRATEGIES = {"kmeans": _kmeans, "syntax": _syntax, "project": _project, "length": _length, "random": _random}


def partition(funcs: list[str], projects: list[str], strategy: str, k: int, seed: int, n_features: int) -> np.ndarray:
    """Part index in [0, k) for every function. Every part is non-empty or a ValueError says why."""
    if k > len(funcs):
        raise ValueError(f"experts.k={k} exceeds the {len(funcs)} training rows; lower k or use more rows")
    parts = np.asarray(STRATEGIES[strategy](funcs, projects, k, seed, n_features), dtype=np.int64)
    empty = sorted(set(range(k)) - set(parts.tolist()))
    if empty:
        raise ValueError(f"partition '{strategy}' left part(s) {empty} empty; lower experts.k or pick another strategy")
    return parts


def features_and_parts(funcs: dict[str, list[str]], train_projects: list[str], strategy: str, k: int, seed: int,
                       n_features: int) -> tuple[dict, np.ndarray]:
    """Each split's `code_features` (the router reads them) and each training row's part: what the pipeline's
    partition stage computes, and what a router refitted on a finished run's cached outputs needs again."""
    features = {s: code_features(f, n_features) for s, f in funcs.items()}
    return features, partition(funcs["train"], train_projects, strategy, k, seed, n_features)


def assign_parts(strategy: str, train_funcs: list[str], train_projects: list[str], train_parts: np.ndarray,
                 funcs: list[str], projects: list[str], k: int, seed: int, n_features: int,
                 features: tuple | None = None) -> np.ndarray:
    """The part each of `funcs` (another split) falls in, by the partition fitted on the training rows: the nearest
    part centroid for the clustering strategies, the training mapping for `project` (an unseen project: the largest
    part), the training quantiles for `length`, a seeded draw for `random`. What the specialisation table needs.
    `features`: (train, funcs) `code_features` already computed (kmeans only), so they are not hashed again."""
    if strategy in FEATURES:
        if features is None or strategy != "kmeans":
            features = FEATURES[strategy](train_funcs, n_features), FEATURES[strategy](funcs, n_features)
        train_x, x = features
        centroids = np.vstack([np.asarray(train_x[train_parts == j].mean(0)) for j in range(k)])
        return np.asarray((x @ centroids.T).argmax(1)).ravel()
    if strategy == "project":
        largest = int(np.bincount(train_parts, minlength=k).argmax())
        part_of = dict(zip(train_projects, train_parts.tolist()))
        return np.array([part_of.get(p, largest) for p in projects], dtype=np.int64)
    if strategy == "length":
        return _length_parts(train_funcs, funcs, k)
    return np.random.default_rng([seed, 3]).integers(0, k, len(funcs))


def partition_table(parts: np.ndarray, labels: np.ndarray, k: int) -> list[dict]:
    """Size and label balance per part (logged with the run)."""
    return [
        {"part": j, "rows": int((parts == j).sum()), "vulnerable_share": float(labels[parts == j].mean())}
        for j in range(k)
    ]
