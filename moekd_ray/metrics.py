"""Classification metrics and the confusion-matrix plot."""

from __future__ import annotations

import numpy as np


def validation_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """What a training loop watches each epoch: classification_metrics at 0.5, ROC AUC and cross-entropy, from
    logits [N, 2]."""
    labels = np.asarray(labels)
    z = np.asarray(logits, dtype=np.float64)
    log_p = z - np.logaddexp(z[:, :1], z[:, 1:])  # log-softmax over the two classes
    probs = np.exp(log_p[:, 1])
    loss = float(-log_p[np.arange(len(labels)), labels.astype(int)].mean()) if len(labels) else 0.0
    return {**classification_metrics(labels, probs), "auc": roc_auc(labels, probs), "loss": loss}


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); 0.5 when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if not pos or not neg:
        return 0.5
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def choose_threshold(labels: np.ndarray, probs1: np.ndarray, metric: str) -> float:
    """The cut on P(vulnerable) that maximises `metric` (accuracy, balanced_accuracy, f1 or mcc) on these
    (validation) rows; among equally good cuts, the one closest to 0.5. Candidates: midpoints between neighbouring
    distinct probabilities."""
    labels, probs1 = np.asarray(labels), np.asarray(probs1, dtype=np.float64)
    values = np.unique(probs1)
    cuts = np.concatenate([[0.5], (values[:-1] + values[1:]) / 2]) if len(values) > 1 else np.array([0.5])
    if len(cuts) > 2000:  # plenty of resolution; keeps the search linear in the split size
        cuts = np.unique(np.concatenate([[0.5], np.quantile(probs1, np.linspace(0.001, 0.999, 1999))]))
    scores = np.array([classification_metrics(labels, probs1, t)[metric] for t in cuts])
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    return float(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]])


def degenerate(labels: np.ndarray, probs1: np.ndarray, max_share: float, min_f1: float,
               threshold: float = 0.5) -> str | None:
    """Why a model is useless on these (validation) rows, or None: it labels >= max_share of them with one class,
    or its F1 is below min_f1."""
    pred = np.asarray(probs1) >= threshold
    share = max(pred.mean(), 1 - pred.mean()) if len(pred) else 1.0
    if share >= max_share:
        return f"labels {share:.1%} of the validation functions {'vulnerable' if pred.mean() > 0.5 else 'safe'}"
    f1 = classification_metrics(np.asarray(labels), np.asarray(probs1), threshold)["f1"]
    if f1 < min_f1:
        return f"has validation F1 {f1:.3f}, below the floor eval.min_val_f1={min_f1:g}"
    return None


def classification_metrics(labels: np.ndarray, probs1: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """accuracy/precision/recall/f1/mcc of class 1 (vulnerable) and balanced accuracy (the mean of the two classes'
    recalls: what accuracy would be at a 50/50 class balance) from P(vulnerable), predicted vulnerable at or above
    `threshold`."""
    pred = (probs1 >= threshold).astype(int)
    tp = int(((pred == 1) & (labels == 1)).sum())
    fp = int(((pred == 1) & (labels == 0)).sum())
    fn = int(((pred == 0) & (labels == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    tn = len(labels) - tp - fp - fn
    denom = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    mcc = (tp * tn - fp * fn) / denom if denom else 0.0  # 0 for a one-class model, whatever the class balance
    specificity = tn / (tn + fp) if tn + fp else 0.0
    return {"accuracy": float((pred == labels).mean()), "precision": precision, "recall": recall, "f1": f1,
            "mcc": float(mcc), "balanced_accuracy": (recall + specificity) / 2}


def confusion_matrix_figure(labels: np.ndarray, probs1: np.ndarray, threshold: float, title: str):
    pred = (probs1 >= threshold).astype(int)
    cm = np.array([[((labels == t) & (pred == p)).sum() for p in (0, 1)] for t in (0, 1)])
    fig, ax = axes((3.4, 3))
    ax.imshow(cm, cmap="Blues")
    for t in (0, 1):
        for p in (0, 1):
            ax.text(p, t, str(cm[t, p]), ha="center", va="center", color="black")
    ax.set_xticks([0, 1], ["safe", "vulnerable"])
    ax.set_yticks([0, 1], ["safe", "vulnerable"])
    return finish(fig, ax, "predicted", "true", title)


def comparison_figure(rows: list[dict], title: str):
    """Test accuracy and F1 of every model of the final table, side by side (a row: model, test_accuracy, test_f1)."""
    fig, ax = axes((max(4.5, 0.9 * len(rows) + 1.5), 3.2))
    x = np.arange(len(rows))
    for offset, key, label in ((-0.2, "test_accuracy", "accuracy"), (0.2, "test_f1", "F1")):
        bars = ax.bar(x + offset, [r[key] for r in rows], width=0.4, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=6)
    ax.set_xticks(x, [r["model"] for r in rows], fontsize=7)
    ax.set_ylim(0, 1)
    return finish(fig, ax, "model", "test", title, legend=7)


def axes(figsize=(4.5, 3.2)):
    """A new (figure, axes) on the file-only Agg backend (no display on servers and Ray workers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def finish(fig, ax, xlabel: str, ylabel: str, title: str, legend: int | None = None):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if legend:
        ax.legend(fontsize=legend)
    fig.tight_layout()
    return fig


def scatter_figure(x: list[float], y: list[float], xlabel: str, ylabel: str, title: str):
    fig, ax = axes()
    ax.scatter(x, y)
    return finish(fig, ax, xlabel, ylabel, title)


def line_figure(series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, title: str):
    """One line per named series of (x, y)."""
    fig, ax = axes()
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", markersize=3, label=name)
    return finish(fig, ax, xlabel, ylabel, title, legend=8)


def points_figure(points: dict[str, tuple[float, float, float]], xlabel: str, ylabel: str, title: str):
    """One labelled point (x, y, y error bar) per named series, e.g. one per method."""
    fig, ax = axes((5, 3.4))
    for name, (x, y, err) in points.items():
        ax.errorbar([x], [y], yerr=[err], marker="o", capsize=3, linestyle="none", label=name)
    return finish(fig, ax, xlabel, ylabel, title, legend=7)


def size_accuracy_figure(rows: list[dict], title: str, asr_key: str | None = None):
    """Test accuracy against size (MB, log scale): one labelled point per model of the final table (experts,
    mixture, student, reference). A model whose attack success rate was measured (`asr_key` in its row) is ringed
    in red and its label gives the ASR."""
    fig, ax = axes((5, 3.6))
    for r in rows:
        x, y = r["size_mb"], r["test_accuracy"]
        ax.scatter([x], [y], zorder=3)
        label = r["model"]
        if asr_key and isinstance(r.get(asr_key), float):
            ax.scatter([x], [y], s=180, facecolors="none", edgecolors="red", zorder=2)
            label += f"\nASR {r[asr_key]:.2f}"
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=6)
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.15)
    note = f" (red ring: ASR measured, {asr_key.removeprefix('asr_')})" if asr_key else ""
    return finish(fig, ax, "size (MB, float32; log scale)", "test accuracy", title + note)
