"""pipeline.tracking.plots: figures render headless to PNGs of sensible size with the right content."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest

from pipeline.tracking.plots import MAX_TICK_LABELS, accuracy_curves, confusion_heatmap


def _png(fig, path):
    fig.savefig(path, format="png")
    plt.close(fig)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return data


def _labels(ax, axis):
    return [t.get_text() for t in getattr(ax, f"get_{axis}ticklabels")() if t.get_text()]


def test_confusion_small_labelled(tmp_path):
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 20, size=(10, 10)) + np.eye(10, dtype=int) * 100
    names = [f"class_{i}" for i in range(10)]
    fig = confusion_heatmap(cm, names)
    ax = fig.axes[0]
    assert _labels(ax, "x") == names and _labels(ax, "y") == names
    img = ax.images[0].get_array()
    assert img.shape == (10, 10)
    np.testing.assert_allclose(np.asarray(img).sum(axis=1), 1.0)  # row-normalised
    assert len(ax.texts) == 100  # cell annotations for small C
    data = _png(fig, tmp_path / "cm10.png")
    assert 5_000 < len(data) < 2_000_000


@pytest.mark.parametrize("n", [MAX_TICK_LABELS + 1, 200, 1000])
def test_confusion_large_has_no_class_labels(tmp_path, n):
    rng = np.random.default_rng(1)
    cm = rng.poisson(0.05, size=(n, n)) + np.eye(n, dtype=np.int64) * 40
    fig = confusion_heatmap(cm, [f"c{i}" for i in range(n)])
    ax = fig.axes[0]
    assert not any(lbl.startswith("c") for lbl in _labels(ax, "x"))
    assert len(ax.get_xticks()) <= 12 and len(ax.texts) == 0
    w, h = fig.get_size_inches() * fig.dpi
    assert w <= 1300 and h <= 1300
    data = _png(fig, tmp_path / f"cm{n}.png")
    assert 5_000 < len(data) < 3_000_000


def test_confusion_zero_rows_and_validation():
    cm = np.zeros((3, 3))
    cm[0, 0] = 5
    fig = confusion_heatmap(cm)  # empty rows must not give NaN
    assert np.isfinite(np.asarray(fig.axes[0].images[0].get_array())).all()
    plt.close(fig)
    with pytest.raises(ValueError):
        confusion_heatmap(np.zeros((3, 4)))
    with pytest.raises(ValueError):
        confusion_heatmap(np.zeros((3, 3)), ["a", "b"])


def test_accuracy_curves_one_line_per_head(tmp_path):
    history = {
        "main": [(e, 0.1 * e) for e in range(1, 6)],
        "joint": [(5, 0.55), (1, 0.12), (3, 0.33)],  # unsorted input
        "branch0": [(e, 0.05 * e) for e in range(1, 6)],
        "empty": [],
    }
    fig = accuracy_curves(history)
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 3
    by_label = {ln.get_label().split(" ")[0]: ln for ln in lines}
    assert set(by_label) == {"main", "joint", "branch0"}
    assert list(by_label["joint"].get_xdata()) == [1, 3, 5]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("main (best 0.5 @ 5)" in t for t in legend)
    data = _png(fig, tmp_path / "acc.png")
    assert 10_000 < len(data) < 1_000_000


def test_accuracy_curves_empty_history(tmp_path):
    fig = accuracy_curves({})
    assert fig.axes[0].get_lines() == []
    _png(fig, tmp_path / "empty.png")
