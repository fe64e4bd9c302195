"""The tfidf-lr reference: the simplest model that could work, fitted beside every run so that its table says
whether the student beats it. TF-IDF of C-token uni- and bigrams (sublinear tf, min_df 3, at most 200k features)
and scikit-learn's logistic regression, its C chosen on validation accuracy.

Saved as what it is, a vocabulary and three arrays (tfidf-lr.json + tfidf-lr.safetensors, no pickle), and loaded
as a scorer the attacks can query like any model (`__call__`, `embed_names`). With `canonical`, it reads functions
after identifier canonicalisation (tokenization.CanonicalInput's transform), saved with it like a tokenizer's."""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from moekd_ray.identifiers import canonicalize
from moekd_ray.tokenization import C_TOKEN


def _c_tokens(canonical: bool):
    return (lambda text: C_TOKEN.findall(canonicalize(text))) if canonical else C_TOKEN.findall

C_GRID = (0.1, 0.3, 1.0, 3.0)
SAVED = "tfidf-lr.json"  # the folder marker (attacks.victim.load_victim)
NAME_DIM = 1024  # hashed character trigrams: the names' "embedding" for ALERT's nearest substitutes


class TfidfLR:
    """fit(train) then predict_proba(texts) -> P(vulnerable) [N]."""

    def __init__(self, seed: int = 0, canonical: bool = False):
        self.seed, self.canonical = seed, canonical
        self.vectorizer = TfidfVectorizer(tokenizer=_c_tokens(canonical), token_pattern=None, lowercase=False,
                                          ngram_range=(1, 2), sublinear_tf=True, min_df=3, max_features=200_000)
        self.model: LogisticRegression | None = None
        self.fit_seconds = 0.0

    def fit(self, train: list[str], train_labels: np.ndarray, valid: list[str], valid_labels: np.ndarray) -> "TfidfLR":
        start = time.perf_counter()
        x_train = self.vectorizer.fit_transform(train)
        x_valid = self.vectorizer.transform(valid)
        best = -1.0
        for c in C_GRID:
            model = LogisticRegression(C=c, max_iter=2000, random_state=self.seed).fit(x_train, train_labels)
            accuracy = float((model.predict(x_valid) == valid_labels).mean())
            if accuracy > best:
                best, self.model = accuracy, model
        self.fit_seconds = time.perf_counter() - start
        return self

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return self.model.predict_proba(self.vectorizer.transform(texts))[:, 1]

    @property
    def num_params(self) -> int:
        return int(self.model.coef_.size + self.model.intercept_.size)

    @property
    def c(self) -> float:
        return float(self.model.C)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"idf": self.vectorizer.idf_.astype(np.float64), "coef": self.model.coef_[0].astype(np.float64),
                   "intercept": self.model.intercept_.astype(np.float64)}, str(folder / "tfidf-lr.safetensors"))
        vocabulary = {term: int(i) for term, i in self.vectorizer.vocabulary_.items()}
        (folder / SAVED).write_text(json.dumps({"C": self.c, "seed": self.seed, "canonical": self.canonical,
                                                "vocabulary": vocabulary}))


class SavedTfidfLR:
    """A saved TfidfLR as a scorer: funcs -> P(vulnerable), the fitted model's numbers (TF-IDF recomputed here:
    sublinear tf, the saved idf, L2 norm, then the logistic regression)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        saved = json.loads((folder / SAVED).read_text())
        arrays = load_file(str(folder / "tfidf-lr.safetensors"))
        self.idf, self.coef, self.intercept = arrays["idf"], arrays["coef"], float(arrays["intercept"][0])
        self.counter = CountVectorizer(tokenizer=_c_tokens(saved.get("canonical", False)), token_pattern=None,
                                       lowercase=False, ngram_range=(1, 2), vocabulary=saved["vocabulary"])
        self.C = saved["C"]

    @property
    def num_params(self) -> int:
        return int(self.coef.size + 1)

    def __call__(self, funcs: list[str]) -> np.ndarray:
        x = self.counter.transform(list(funcs)).astype(np.float64)
        x.data = 1.0 + np.log(x.data)  # sublinear tf
        x = x.multiply(self.idf).tocsr()
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
        z = np.asarray(x @ self.coef).ravel() / np.maximum(norms, 1e-12) + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def embed_names(self, names: list[str]) -> np.ndarray:
        """Hashed character trigrams of each name: a bag of words has no embedding table, so ALERT's "natural"
        substitutes are the pool names closest in spelling."""
        out = np.zeros((len(names), NAME_DIM), dtype=np.float32)
        for row, name in enumerate(names):
            padded = f"^{name}$"
            for j in range(max(len(padded) - 2, 1)):
                out[row, zlib.crc32(padded[j : j + 3].encode()) % NAME_DIM] += 1.0
        return out
