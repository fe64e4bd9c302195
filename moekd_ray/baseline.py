"""The tfidf-lr reference: the simplest model that could work, fitted beside every run so that its table says
whether the student beats it. TF-IDF of C-token uni- and bigrams (sublinear tf, min_df 3, at most 200k features)
and scikit-learn's logistic regression, its C chosen on validation accuracy."""

from __future__ import annotations

import time

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from moekd_ray.tokenization import C_TOKEN

C_GRID = (0.1, 0.3, 1.0, 3.0)


class TfidfLR:
    """fit(train) then predict_proba(texts) -> P(vulnerable) [N]."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.vectorizer = TfidfVectorizer(tokenizer=C_TOKEN.findall, token_pattern=None, lowercase=False,
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
