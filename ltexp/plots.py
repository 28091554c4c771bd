"""Figures logged as run artifacts (matplotlib, headless Agg backend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def class_count_chart(table, title: str = "Training images per class"):
    """Bar chart of training images per class in rank order, head and tail coloured apart."""
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(table) + 4), 3.5))
    colors = np.where(table["group"] == "head", "tab:blue", "tab:orange")
    ax.bar(np.arange(len(table)), table["train"], color=colors)
    ax.set_xlabel("class rank (by training count)")
    ax.set_ylabel("training images")
    ax.set_yscale("log")
    ax.set_title(title)
    if len(table) <= 20:
        ax.set_xticks(np.arange(len(table)), table["class"], rotation=45, ha="right")
    fig.tight_layout()
    return fig


def accuracy_vs_count(per_class, title: str = "Test accuracy vs training count"):
    """Scatter of per-class test accuracy against training images (log x), head and tail apart."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for group, color in (("head", "tab:blue"), ("tail", "tab:orange")):
        rows = per_class[per_class["group"] == group]
        if len(rows):
            ax.scatter(rows["train"], rows["test_acc"], color=color, label=f"{group} classes")
    ax.legend(loc="lower right")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training images of the class")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def confusion_matrix_figure(matrix: np.ndarray, class_names, title: str = "Confusion matrix (test, row-normalised)"):
    """Row-normalised confusion matrix as an image; labels shown when K <= 20."""
    rows = matrix.sum(axis=1, keepdims=True)
    norm = matrix / np.maximum(rows, 1)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.4 * k), min(12, 2 + 0.4 * k)))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k <= 20:
        ax.set_xticks(range(k), class_names, rotation=45, ha="right")
        ax.set_yticks(range(k), class_names)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
