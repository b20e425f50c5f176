"""Figures, drawn at the edge: training curves, confusion matrices. matplotlib without a screen."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .files import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")


def plot_history(
    history: Sequence[dict], path: str | os.PathLike, title: str = "", initial: dict | None = None
) -> None:
    """Train and validation loss per epoch, and validation accuracy when there is one; `initial`
    (the validation loss and accuracy before training) is drawn at epoch 0."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    has_acc = any("val_accuracy" in row for row in history)
    start = [0] if initial else []
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5.5, 3.8), squeeze=False)
    ax = axes[0][0]
    ax.plot(epochs, [r["train_loss"] for r in history], "o-", label="train (epoch mean)")
    val = ([initial["loss"]] if initial else []) + [r["val_loss"] for r in history]
    ax.plot(start + epochs, val, "s-", label="validation (0: before training)")
    ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    if has_acc:
        ax = axes[0][1]
        acc = ([initial["accuracy"]] if initial and "accuracy" in initial else []) + [
            r["val_accuracy"] for r in history
        ]
        ax.plot((start if len(acc) > len(epochs) else []) + epochs, [100 * a for a in acc], "s-", color="tab:green")
        ax.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
        ax.set_ylim(max(0.0, 100 * min(acc) - 5), 100.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)


def plot_confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str | os.PathLike) -> None:
    """A confusion matrix with counts in the cells: rows the true label, columns the prediction."""
    plt = _pyplot()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * n, 1.2 + 1.0 * n))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), labels)
    ax.set_yticks(range(n), labels)
    ax.set(xlabel="predicted", ylabel="true", title="test set")
    top = max(max(row) for row in matrix) or 1
    for i in range(n):
        for j in range(n):
            color = "white" if matrix[i][j] > top / 2 else "black"
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center", color=color, fontsize=12)
    _save(fig, path)
    plt.close(fig)
