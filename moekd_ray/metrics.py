"""Classification metrics and the confusion-matrix plot."""

from __future__ import annotations

import numpy as np


def classification_metrics(labels: np.ndarray, probs1: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """accuracy/precision/recall/f1 of class 1 (vulnerable) from P(vulnerable)."""
    pred = (probs1 >= threshold).astype(int)
    tp = int(((pred == 1) & (labels == 1)).sum())
    fp = int(((pred == 1) & (labels == 0)).sum())
    fn = int(((pred == 0) & (labels == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": float((pred == labels).mean()), "precision": precision, "recall": recall, "f1": f1}


def confusion_matrix_figure(labels: np.ndarray, probs1: np.ndarray, title: str):
    pred = (probs1 >= 0.5).astype(int)
    cm = np.array([[((labels == t) & (pred == p)).sum() for p in (0, 1)] for t in (0, 1)])
    fig, ax = axes((3.4, 3))
    ax.imshow(cm, cmap="Blues")
    for t in (0, 1):
        for p in (0, 1):
            ax.text(p, t, str(cm[t, p]), ha="center", va="center", color="black")
    ax.set_xticks([0, 1], ["safe", "vulnerable"])
    ax.set_yticks([0, 1], ["safe", "vulnerable"])
    return finish(fig, ax, "predicted", "true", title)


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
