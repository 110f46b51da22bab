"""Figures logged with a training run (pure functions; they return matplotlib figures).

The Agg backend is forced here so that plotting works on headless nodes (SLURM, CI) and never
opens a window. Callers own the returned figure: log it (``Tracker.log_figure``) or save it, then
``plt.close(fig)``.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # must precede pyplot; headless everywhere
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["confusion_heatmap", "accuracy_curves", "MAX_TICK_LABELS"]

#: Above this many classes the axes get no per-class tick labels (they would be unreadable).
MAX_TICK_LABELS = 50


def confusion_heatmap(
    confusion: np.ndarray,
    class_names: Sequence[str] | None = None,
    *,
    normalize: bool = True,
    title: str | None = None,
):
    """Heat-map of a ``C x C`` confusion matrix (rows: true class, columns: predicted class).

    Rows are normalised to per-class recall (``normalize=True``) so classes of different sizes
    share one colour scale, fixed to [0, 1].
    For ``C <= MAX_TICK_LABELS`` every class is labelled (with ``class_names`` or its index) and,
    for ``C <= 20``, each cell shows its value. For larger ``C`` (up to ImageNet's 1000 and more)
    there are no per-class tick labels, only a few index ticks, and the figure size is capped.
    """
    cm = np.asarray(confusion)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion must be a square 2-D array, got shape {cm.shape}")
    n = cm.shape[0]
    if class_names is not None and len(class_names) != n:
        raise ValueError(f"class_names has {len(class_names)} entries for a {n}x{n} confusion matrix")

    cm = cm.astype(np.float64)
    if normalize:
        row_sums = cm.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            data = np.where(row_sums > 0, cm / np.where(row_sums == 0, 1, row_sums), 0.0)
        vmin, vmax, cbar_label = 0.0, 1.0, "fraction of true class"
    else:
        data = cm
        vmin, vmax, cbar_label = 0.0, max(float(cm.max()), 1.0), "count"

    # size: grows with C for small matrices, capped so a 1000-class plot stays a reasonable PNG
    side = float(np.clip(4.0 + 0.25 * n, 5.0, 12.0)) if n <= MAX_TICK_LABELS else 10.0
    fig, ax = plt.subplots(figsize=(side + 1.5, side), dpi=100)
    im = ax.imshow(data, cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest", aspect="equal")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label(cbar_label)

    if n <= MAX_TICK_LABELS:
        labels = list(class_names) if class_names is not None else [str(i) for i in range(n)]
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        fontsize = 8 if n <= 20 else 6
        ax.set_xticklabels(labels, rotation=90, fontsize=fontsize)
        ax.set_yticklabels(labels, fontsize=fontsize)
        if n <= 20:
            thresh = (vmin + vmax) / 2.0
            for i in range(n):
                for j in range(n):
                    v = data[i, j]
                    txt = f"{v:.2f}" if normalize else f"{int(round(v))}"
                    ax.text(j, i, txt, ha="center", va="center", fontsize=6,
                            color="black" if v > thresh else "white")
    else:
        step = _nice_step(n)
        ticks = list(range(0, n, step))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.tick_params(labelsize=7)

    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    acc = float(np.trace(cm) / cm.sum()) if cm.sum() > 0 else float("nan")
    ax.set_title(title or f"confusion matrix ({n} classes, top-1 {acc:.3f})")
    fig.tight_layout()
    return fig


def _nice_step(n: int, target_ticks: int = 10) -> int:
    raw = max(1, n / target_ticks)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * mag >= raw:
            return int(m * mag)
    return int(10 * mag)


def accuracy_curves(
    history: Mapping[str, Sequence[tuple[int, float]]],
    *,
    title: str = "validation top-1 per head",
    ylabel: str = "top-1 accuracy",
):
    """One line per head: ``history[head] = [(epoch, top1), ...]`` (unsorted input is sorted).

    Heads with no points are skipped (not drawn). Values are plotted as given (fractions or
    percentages); the legend shows each head's best value and its epoch.
    """
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    drawn = 0
    for head in sorted(history):
        pts = sorted((int(e), float(v)) for e, v in history[head])
        if not pts:
            continue
        xs, ys = zip(*pts)
        finite = [(x, y) for x, y in pts if math.isfinite(y)]
        if finite:
            bx, by = max(finite, key=lambda p: p[1])
            label = f"{head} (best {by:.4g} @ {bx})"
        else:
            label = head
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=label)
        drawn += 1
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig
