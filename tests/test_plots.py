"""What the report's figures show: the Figure builders behind plot_training_curves and plot_metric_bars carry
exactly the input records' values (lines, bars, error bars, labels), and the PNG writers save those Figures."""

import json
import math

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from matplotlib.container import BarContainer

from alphaflow.plots import (
    metric_bars_figure,
    plot_metric_bars,
    plot_training_curves,
    save_figure,
    training_curves_figure,
)
from alphaflow.stats import METRIC_LABELS

NAN = float("nan")


@pytest.fixture(autouse=True)
def close_figures():
    """The figures a test builds and inspects are closed after it."""
    yield
    plt.close("all")


def same(values, expected):
    """Equal lists where NaN equals NaN and None counts as NaN (a missing value is drawn as a gap)."""
    values = [NAN if v is None else float(v) for v in values]
    return len(values) == len(expected) and all(
        (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b) for a, b in zip(values, expected)
    )


# ----------------------------------------------------------------------------
# Training curves


TRAINING = [
    {"step": 2, "alpha": 1.0, "delta_sq": 0.9, "L_TFM": 0.8, "L_sum": 0.8},
    {"step": 4, "alpha": 0.6, "delta_sq": 0.5, "L_TFM": 0.45, "L_sum": 0.5},
    {"step": 5, "fd_classifier_1nfe_ema": 3.0},  # an in-training evaluation: not drawn
    {"step": 6, "alpha": 0.1, "delta_sq": 0.3, "L_sum": 0.25},  # L_TFM not logged at this step
    {"step": 8, "alpha": 0.0, "delta_sq": 0.2, "L_TFM": 0.1, "L_sum": 0.15},
]


def test_training_curves_draw_each_logged_key_and_alpha_against_the_step():
    fig = training_curves_figure(TRAINING, title="tiny")
    ax_loss, ax_alpha = fig.axes
    steps = [2, 4, 6, 8]
    # One line per key some record logged, in the order delta_sq, L_TFM, L_TC, L_sum (L_TC: never logged).
    assert [line.get_label() for line in ax_loss.lines] == ["delta_sq", "L_TFM", "L_sum"]
    expected = {"delta_sq": [0.9, 0.5, 0.3, 0.2], "L_TFM": [0.8, 0.45, NAN, 0.1], "L_sum": [0.8, 0.5, 0.25, 0.15]}
    for line in ax_loss.lines:
        assert same(line.get_xdata(), steps)
        assert same(line.get_ydata(), expected[line.get_label()]), line.get_label()
    assert [t.get_text() for t in ax_loss.get_legend().get_texts()] == ["delta_sq", "L_TFM", "L_sum"]
    assert ax_loss.get_title() == "tiny losses"
    (alpha,) = ax_alpha.lines
    assert same(alpha.get_xdata(), steps) and same(alpha.get_ydata(), [1.0, 0.6, 0.1, 0.0])
    assert ax_alpha.get_title() == "α(k)" and ax_alpha.get_ylim() == pytest.approx((-0.05, 1.05))


def test_plot_training_curves_writes_that_figure(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TRAINING))
    out = plot_training_curves(path, tmp_path / "training.png", title="tiny")
    reference = save_figure(training_curves_figure(TRAINING, title="tiny"), tmp_path / "reference.png")
    assert out == tmp_path / "training.png" and out.read_bytes() == reference.read_bytes()
    other = save_figure(training_curves_figure(TRAINING[:2], title="tiny"), tmp_path / "other.png")
    assert other.read_bytes() != out.read_bytes()  # the bytes do depend on the records


# ----------------------------------------------------------------------------
# Metric bars


def results_rows():
    """fd_classifier for runs b, a (b first) in three weights × sampler cells, one cell (b, raw, 1nfe) missing,
    and a row of another metric that must not be drawn."""
    cells = [
        ("b", "ema", "1nfe", 7.0, 6.0, 9.0),
        ("a", "ema", "1nfe", 10.0, 9.5, 10.5),
        ("a", "raw", "1nfe", 12.0, 11.0, 14.0),
        ("b", "ema", "2nfe", 5.0, 5.0, 5.5),
        ("a", "ema", "2nfe", 6.0, 4.0, 6.0),
        ("a", "ema", "1nfe", 99.0, 98.0, 100.0),
    ]
    metrics = ["fd_classifier"] * 5 + ["is"]
    return pd.DataFrame(
        [
            dict(run=r, weights=w, sampler=s, metric=m, value=v, low=lo, high=hi, nfe=1)
            for (r, w, s, v, lo, hi), m in zip(cells, metrics)
        ]
    )


def test_metric_bars_show_each_cells_value_and_interval():
    fig = metric_bars_figure(results_rows(), "fd_classifier")
    (ax,) = fig.axes
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    # One bar group per (weights, sampler), sorted; within it one bar per run in order of first appearance.
    assert [c.get_label() for c in bars] == ["ema 1nfe", "ema 2nfe", "raw 1nfe"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["b", "a"] and list(ax.get_xticks()) == [0, 1]
    heights = {"ema 1nfe": [7.0, 10.0], "ema 2nfe": [5.0, 6.0], "raw 1nfe": [NAN, 12.0]}  # run b has no raw 1nfe
    intervals = {
        "ema 1nfe": [(6.0, 9.0), (9.5, 10.5)],
        "ema 2nfe": [(5.0, 5.5), (4.0, 6.0)],
        "raw 1nfe": [(NAN, NAN), (11.0, 14.0)],
    }
    width = 0.8 / 3
    for i, c in enumerate(bars):
        label = c.get_label()
        assert same([b.get_height() for b in c], heights[label]), label
        centres = [b.get_x() + b.get_width() / 2 for b in c]
        assert same(centres, [j + (i - 1) * width for j in range(2)]) and all(
            b.get_width() == pytest.approx(width) for b in c
        )
        # The error bar of each bar spans its interval [low, high] at the bar's centre.
        segments = c.errorbar.lines[2][0].get_segments()
        for (x, y), seg, (lo, hi) in zip(zip(centres, heights[label]), segments, intervals[label]):
            if math.isnan(y):
                continue
            assert seg[:, 0].tolist() == pytest.approx([x, x])
            assert sorted(seg[:, 1].tolist()) == pytest.approx([lo, hi])
    assert ax.get_ylabel() == f"{METRIC_LABELS.get('fd_classifier', 'fd_classifier')} (lower is better)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ema 1nfe", "ema 2nfe", "raw 1nfe"]


def test_metric_bars_clip_an_interval_that_excludes_its_value_and_skip_absent_metrics(tmp_path):
    rows = pd.DataFrame(
        [dict(run="a", weights="ema", sampler="1nfe", metric="fd_classifier", value=5.0, low=6.0, high=8.0, nfe=1)]
    )  # a value outside its interval: the lower arm is 0, not negative
    (bar,) = [c for c in metric_bars_figure(rows, "fd_classifier").axes[0].containers if isinstance(c, BarContainer)]
    assert sorted(bar.errorbar.lines[2][0].get_segments()[0][:, 1].tolist()) == pytest.approx([5.0, 8.0])
    assert metric_bars_figure(rows, "is") is None
    assert plot_metric_bars(rows, "is", tmp_path / "is.png") is None and not (tmp_path / "is.png").exists()


def test_plot_metric_bars_writes_that_figure(tmp_path):
    out = plot_metric_bars(results_rows(), "fd_classifier", tmp_path / "bars.png")
    reference = save_figure(metric_bars_figure(results_rows(), "fd_classifier"), tmp_path / "reference.png")
    assert out == tmp_path / "bars.png" and out.read_bytes() == reference.read_bytes()


def test_training_curves_show_the_loss_per_t_bucket_when_logged():
    records = [
        {"step": 2, "alpha": 1.0, "L_sum": 0.8, "loss_t0": 0.5, "loss_t7": 1.5, "loss_dt0": 0.4},
        {"step": 4, "alpha": 0.5, "L_sum": 0.6, "loss_t0": 0.4, "loss_t7": 9.0},
    ]
    fig = training_curves_figure(records)
    ax_t = fig.axes[2]
    assert [line.get_label() for line in ax_t.lines] == ["t ∈ [0, 0.125)", "t ∈ [0.875, 1]"]  # t buckets only
    assert same(ax_t.lines[1].get_xdata(), [2, 4]) and same(ax_t.lines[1].get_ydata(), [1.5, 9.0])
    assert ax_t.get_yscale() == "log" and ax_t.get_title() == "loss per t bucket"
    assert len(training_curves_figure(TRAINING).axes) == 2  # records without buckets: as before
