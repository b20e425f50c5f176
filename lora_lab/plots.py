"""Figures, drawn at the edge: training curves, confusion matrices. matplotlib without a screen."""

from __future__ import annotations

import math
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
    history: Sequence[dict],
    path: str | os.PathLike,
    title: str = "",
    initial: dict | None = None,
    steps: Sequence[dict] = (),
    kept: int | None = None,
) -> None:
    """Train and validation loss per epoch, and validation accuracy when there is one; `initial`
    (the validation loss and accuracy before training) is drawn at epoch 0, every optimizer step's
    loss (`steps`, steps.csv's rows) along the epochs, and the epoch a run kept (`kept`, when not the
    last) marked."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    has_acc = any("val_accuracy" in row for row in history)
    start = [0] if initial else []
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5.5, 3.8), squeeze=False)
    ax = axes[0][0]
    _step_losses(ax, steps)
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
    if kept is not None and epochs and kept != epochs[-1]:
        _mark_kept(axes[0], kept)
    if title:
        fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)


def _step_losses(ax, steps: Sequence[dict]) -> None:
    """Every optimizer step's loss, spread evenly over its epoch (epoch e ends at x = e)."""
    per_epoch: dict[int, list[dict]] = {}
    for row in steps:
        per_epoch.setdefault(row["epoch"], []).append(row)
    x = [e - 1 + (i + 1) / len(rows) for e, rows in per_epoch.items() for i in range(len(rows))]
    if x:
        ax.plot(x, [r["loss"] for rows in per_epoch.values() for r in rows], "-", lw=0.8, alpha=0.45,
                color="tab:blue", label="train (each step)")  # fmt: skip


def _mark_kept(axes, kept: int) -> None:
    for ax in axes:
        ax.axvline(kept, color="0.4", ls="--", lw=1, label=f"kept: epoch {kept} (best validation)")
    axes[0].legend(loc="upper right")


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


_LABELS = {
    "test_accuracy": "test accuracy (%)",
    "val_accuracy": "validation accuracy (%)",
    "final_val_loss": "validation loss",
    "test_loss": "test loss",
}


def _human(value: float, _position: object = None) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def _human_ticks(ax, axis: str = "y", values: Sequence[float] = ()) -> None:
    """A log axis labelled at 1, 2 and 5 of each decade, as 50k, 1M, 2B; where `values` span less
    than a factor of 2 (no such tick between them), at the values themselves."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator

    scale = ax.yaxis if axis == "y" else ax.xaxis
    narrow = values and max(values) < 2 * min(values)
    scale.set_major_locator(FixedLocator(sorted(set(values))) if narrow else LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    scale.set_major_formatter(FuncFormatter(_human))
    scale.set_minor_locator(FixedLocator([]))
    scale.set_minor_formatter(FuncFormatter(lambda v, p: ""))


def _log2_ranks(ax, ranks: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(ranks)), [str(r) for r in sorted(set(ranks))])
    ax.minorticks_off()
    ax.set_xlabel("LoRA rank r (log scale)")
    ax.grid(alpha=0.3)


def plot_sweep(table: Sequence[dict], path: str | os.PathLike, chosen: str, reported: str) -> None:
    """A sweep at a glance, one colour per series (model, scaling, targets, variant, init, LoRA+ ratio),
    named in one legend below with what each mark means. Left: the validation
    metric's mean with its 95% interval and the test metric against the rank, the best rank starred,
    the recommended one ringed, the baseline dotted. Middle: the validation metric against trainable
    parameters, the Pareto front joined. Right: seconds per point. Ranks and parameters on log axes."""
    plt = _pyplot()
    series = list(dict.fromkeys(line["series"] for line in table))
    many = len(series) > 1  # then the legend below names a colour per series; the marks' meanings always
    rows_of_legend = math.ceil(((len(series) if many else 0) + 5) / 3)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6 + 0.22 * rows_of_legend))
    palette = plt.get_cmap("tab10" if len(series) <= 10 else "tab20").colors
    scale = 100.0 if chosen.endswith("accuracy") else 1.0
    baselines = []
    for i, name in enumerate(series):
        lines = [line for line in table if line["series"] == name and not math.isnan(line[chosen])]
        if not lines:
            continue
        color = palette[i % len(palette)]
        _metric_panel(axes[0], lines, chosen, reported, scale, color)
        _cost_panel(axes[1], lines, chosen, scale, color)
        axes[2].plot([line["rank"] for line in lines], [line["seconds"] for line in lines], "o-", color=color)
        baselines.append((scale * lines[0].get("baseline", math.nan), color, f"{name}: " if many else ""))
    what, unit = ("accuracy", " (%)") if scale == 100.0 else ("loss", "")
    off_axis = _baselines(axes[:2], baselines, unit.strip(" ()"))
    axes[0].set(ylabel=f"{what}{unit}", title=f"{what} by rank (chosen on validation)")
    axes[1].set(xscale="log", xlabel="trainable parameters (log scale)", ylabel=f"validation {what}{unit}",
                title="cost against the validation metric")  # fmt: skip
    axes[1].grid(alpha=0.3)
    _human_ticks(axes[1], axis="x", values=[line["trainable_params"] for line in table])
    axes[2].set(ylabel="seconds", title="training time per point")
    axes[2].set_ylim(bottom=0)
    for ax in (axes[0], axes[2]):
        _log2_ranks(ax, [line["rank"] for line in table])
    handles = [plt.Line2D([], [], color=palette[i % len(palette)], marker="o", label=n) for i, n in enumerate(series)]
    keys = (handles if many else []) + _style_keys(plt, chosen, reported, off_axis)
    fig.legend(handles=keys, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.subplots_adjust(wspace=0.3, bottom=0.15 + 0.03 * rows_of_legend)
    _save(fig, path)
    plt.close(fig)


def _style_keys(plt, chosen: str, reported: str, off_axis: list[str]) -> list:
    """The legend entries that say what each kind of mark means, in gray."""
    gray = "0.35"
    keys = [plt.Line2D([], [], color=gray, marker="o", label=f"{_name(chosen)}, 95% interval (left); Pareto front "
                       "joined, other ranks hollow (middle)")]  # fmt: skip
    if reported != chosen:
        keys.append(plt.Line2D([], [], color=gray, marker="s", ls="--", ms=4, alpha=0.6, label=_name(reported)))
    keys.append(
        plt.Line2D([], [], color=gray, ls=":", label="baseline" + (f" ({'; '.join(off_axis)})" if off_axis else ""))
    )
    keys.append(plt.Line2D([], [], ls="", marker="*", ms=12, color=gray, mec="black", label="best on the metric alone"))
    keys.append(plt.Line2D([], [], ls="", marker="o", ms=11, mfc="none", mec="black", mew=1.8, label="recommended"))
    return keys


def _baselines(axes, baselines: list[tuple[float, str, str]], unit: str) -> list[str]:
    """Each series' baseline as a dotted line where it falls near the data; one far off the data (an
    untrained model's loss, a 50% majority class under 98% accuracies) is not drawn, so that it does
    not squash the differences the plot is for: returned in words for the legend, each value once
    (named by its series only where the series' baselines differ)."""
    off: dict[str, list[str]] = {}
    for ax in axes:
        low, high = ax.get_ylim()
        for value, color, label in baselines:
            if math.isnan(value):
                continue
            if low - 0.5 * (high - low) <= value <= high + 0.5 * (high - low):
                ax.axhline(value, ls=":", color=color)
            elif ax is axes[0]:
                off.setdefault(f"{value:.4g}{unit}", []).append(label)
    if len(off) == 1:
        return [f"{next(iter(off))} off the axis"]
    return [f"{' '.join(labels)}{value} off the axis" for value, labels in off.items()]


def _name(key: str) -> str:
    return _LABELS.get(key, key).split(" (")[0]


def _metric_panel(ax, lines: list[dict], chosen: str, reported: str, scale: float, color) -> None:
    """One series' validation mean with its 95% interval, its test metric, its best and recommended ranks."""
    ranks = [line["rank"] for line in lines]
    values = [scale * line[chosen] for line in lines]
    low = [scale * (line[chosen] - line["ci95_low"]) for line in lines]
    high = [scale * (line["ci95_high"] - line[chosen]) for line in lines]
    ax.errorbar(ranks, values, yerr=[low, high], fmt="o-", capsize=3, color=color)
    shown = [scale * line[reported] for line in lines]
    if reported != chosen and not any(math.isnan(v) for v in shown):
        ax.plot(ranks, shown, "s--", color=color, alpha=0.5, ms=4)
    for line, value in zip(lines, values, strict=True):
        if "best" in line.get("pick", ""):
            ax.plot(line["rank"], value, "*", ms=17, color=color, markeredgecolor="black", zorder=5)
        if "recommended" in line.get("pick", ""):
            ax.plot(line["rank"], value, "o", ms=15, mfc="none", mec="black", mew=1.8, zorder=6)


def _cost_panel(ax, lines: list[dict], chosen: str, scale: float, color) -> None:
    """One series' validation metric (with its 95% intervals, faint) against its trainable parameters,
    the Pareto front joined."""
    params = [line["trainable_params"] for line in lines]
    values = [scale * line[chosen] for line in lines]
    front = sorted((line["trainable_params"], scale * line[chosen]) for line in lines if line.get("pareto"))
    low = [scale * (line[chosen] - line["ci95_low"]) for line in lines]
    high = [scale * (line["ci95_high"] - line[chosen]) for line in lines]
    ax.errorbar(params, values, yerr=[low, high], fmt="none", ecolor=color, alpha=0.35, capsize=2)  # 95% intervals
    ax.plot(params, values, "o", color=color, mfc="none")
    if front:
        ax.plot([x for x, _ in front], [y for _, y in front], "o-", color=color)
    for line, x, y in zip(lines, params, values, strict=True):
        ax.annotate(f"r={line['rank']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)


def plot_param_report(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Trainable parameters, and training memory (LoRA over a bf16 base, QLoRA over NF4, and full
    fine-tuning in bf16 for reference), against the rank: one colour per model (and target set),
    log axes."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    series = list(dict.fromkeys((row["model"], row["targets"]) for row in rows))
    several_sets = len({t for _, t in series}) > 1
    styles = {"lora_bf16_mib": ("-", "LoRA, bf16 base"), "qlora_nf4_mib": ("--", "QLoRA, NF4 base"),
              "full_bf16_mib": (":", "full fine-tuning, bf16")}  # fmt: skip
    colors: dict[str, str] = {}
    for model, targets in series:
        lines = [row for row in rows if (row["model"], row["targets"]) == (model, targets)]
        ranks = [row["rank"] for row in lines]
        name = f"{model} ({targets})" if several_sets else model
        (drawn,) = axes[0].plot(ranks, [row["trainable_params"] for row in lines], "o-", label=name)
        for key, (style, _) in styles.items():
            if key.startswith("full") and model in colors:
                continue  # full fine-tuning does not depend on the targets: one line per model
            axes[1].plot(ranks, [row[key] / 1024 for row in lines], style, marker="o" if style != ":" else None,
                         color=drawn.get_color(), ms=4)  # fmt: skip
        colors.setdefault(model, drawn.get_color())
    axes[0].set(ylabel="trainable parameters (log scale)", yscale="log", title="trainable parameters")
    axes[1].set(ylabel="GiB (log scale)", yscale="log",
                title="training memory: weights + gradients + AdamW (no activations)")  # fmt: skip
    _human_ticks(axes[0])
    _human_ticks(axes[1])
    for ax in axes:
        _log2_ranks(ax, [row["rank"] for row in rows])
    axes[0].legend(loc="best", fontsize=8, title="model")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="gray", linestyle=style, label=label) for style, label in styles.values()]
    axes[1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    _save(fig, path)
    plt.close(fig)


def plot_spectra(spectra: Sequence[dict], path: str | os.PathLike) -> None:
    """Effective rank of the learned updates against the LoRA rank: a panel per series, one line per
    module type (mean over layers and seeds), with y = r, the most an update of rank r can use."""
    plt = _pyplot()
    models = list(dict.fromkeys(row["series"] for row in spectra))
    cols = min(3, len(models))  # at most three panels a row, so each stays readable
    rows_of_panels = math.ceil(len(models) / cols)
    fig, axes = plt.subplots(rows_of_panels, cols, figsize=(5.2 * cols, 4.0 * rows_of_panels + 0.6), squeeze=False)
    panels = [ax for row in axes for ax in row]
    for ax in panels[len(models) :]:
        ax.set_visible(False)
    for ax, model in zip(panels, models, strict=False):
        rows = [row for row in spectra if row["series"] == model]
        ranks = sorted({int(row["rank"]) for row in rows})
        for kind in dict.fromkeys(row["type"] for row in rows):
            means = []
            for r in ranks:
                values = [float(x["effective_rank"]) for x in rows if x["type"] == kind and int(x["rank"]) == r]
                means.append(sum(values) / len(values) if values else float("nan"))
            ax.plot(ranks, means, "o-", label=kind, ms=4)
        ax.plot(ranks, ranks, ":", color="gray", label="y = r (all directions equal)")
        _log2_ranks(ax, ranks)
        ax.set_yscale("log", base=2)
        ax.set(ylabel="effective rank of dW (log scale)", title=model)
        if ax is panels[0]:
            ax.legend(loc="upper left", fontsize=7)
    fig.suptitle("How many directions the update uses: effective rank of dW against the LoRA rank")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    _save(fig, path)
    plt.close(fig)


def plot_similarity(matrices: dict, r1: int, r2: int, path: str | os.PathLike, title: str = "") -> None:
    """phi(i, j) between the ranks r1 and r2 (the LoRA paper's figure 3) for every adapted module,
    `matrices` keyed by (module type, layer index or None): rows are module types, columns layers;
    each cell a heatmap, i down (top directions of r1), j across (top directions of r2)."""
    plt = _pyplot()
    kinds = list(dict.fromkeys(kind for kind, _ in matrices))
    layers = sorted({layer for _, layer in matrices}, key=lambda x: math.inf if x is None else x)
    present = set(matrices)
    fig, axes = plt.subplots(len(kinds), len(layers), figsize=(1.9 * len(layers) + 1.5, 1.4 * len(kinds) + 1.2),
                             squeeze=False)  # fmt: skip
    image = None
    for (kind, layer), matrix in matrices.items():
        ax = axes[kinds.index(kind)][layers.index(layer)]
        rows, cols = matrix.shape  # a rank above the layer's width has only `in` directions
        image = ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto",
                          extent=(0.5, cols + 0.5, rows + 0.5, 0.5))  # fmt: skip
        ax.set_xticks([1, cols])
        ax.set_yticks([1, rows])
    for row, kind in enumerate(kinds):
        for col, layer in enumerate(layers):
            ax = axes[row][col]
            ax.tick_params(labelsize=6)
            if row == 0:
                ax.set_title("no layer" if layer is None else f"layer {layer}", fontsize=8)
            if layer == next(x for x in layers if (kind, x) in present):  # the row's first heatmap
                ax.set_ylabel(f"{kind}\ni (r={r1})", fontsize=7)
            if row == len(kinds) - 1 or (kinds[row + 1], layer) not in present:
                ax.set_xlabel(f"j (r={r2})", fontsize=7)
            if (kind, layer) not in present:
                ax.axis("off")
    fig.suptitle(f"subspace similarity phi(i, j) of A, r={r1} vs r={r2}" + (f": {title}" if title else ""))
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="phi")
    _save(fig, path)
    plt.close(fig)
