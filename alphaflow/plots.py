"""The report's figures (matplotlib, Agg backend): training curves, gradient-conflict cosines, metric bars,
metrics against the training step and against the post-hoc EMA width σ_rel, the pre-registered primary
endpoint and sample sheets. Every figure is written atomically (alphaflow.io) and closed."""

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from alphaflow.divergence import bucket_keys, bucket_label
from alphaflow.io import atomic_write_bytes
from alphaflow.jsonl import read_jsonl
from alphaflow.stats import METRIC_LABELS, best_index, lower_is_better


def save_figure(fig, out_png):
    """Atomic PNG write (temp file, fsync, rename); closes the figure."""
    out_png = Path(out_png)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())
    return out_png


# ----------------------------------------------------------------------------
# Training


def training_curves_figure(records, title=""):
    """The Figure of plot_training_curves for metrics.jsonl records: left axes one line per logged key of
    delta_sq, L_TFM, L_TC, L_sum (in that order) against the step, middle axes α(k), and, when the records carry
    them, right axes the loss per t bucket (loss_t0 … loss_t7, log scale: where in t a spike starts); records
    without an "alpha" (in-training evaluations, rollbacks) are skipped."""
    records = [r for r in records if "alpha" in r]  # training records (not in-training evals)
    buckets = [key for key in bucket_keys() if key.startswith("loss_t") and any(key in r for r in records)]
    fig, axes = plt.subplots(1, 3 if buckets else 2, figsize=(15 if buckets else 10, 3.5))
    ax_loss, ax_alpha = axes[:2]
    steps = [r["step"] for r in records]
    for key in ("delta_sq", "L_TFM", "L_TC", "L_sum"):
        if any(key in r for r in records):
            ax_loss.plot(steps, [r.get(key) for r in records], label=key)
    ax_loss.set_xlabel("step")
    ax_loss.set_title(f"{title} losses")
    ax_loss.legend(fontsize=8)
    ax_alpha.plot(steps, [r.get("alpha") for r in records], color="k")
    ax_alpha.set_xlabel("step")
    ax_alpha.set_title("α(k)")
    ax_alpha.set_ylim(-0.05, 1.05)
    if buckets:
        ax_t = axes[2]
        colors = plt.cm.viridis([k / max(len(bucket_keys()) // 2 - 1, 1) for k in range(len(bucket_keys()) // 2)])
        for key in buckets:
            k = int(key[len("loss_t") :])
            ax_t.plot(steps, [r.get(key) for r in records], color=colors[k], label=bucket_label(key))
        ax_t.set_yscale("log")
        ax_t.set(xlabel="step", title="loss per t bucket")
        ax_t.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def plot_training_curves(metrics_jsonl, out_png, title=""):
    """Loss decomposition (L_TFM, L_TC, their sum), the weighted loss and α(k) against the step."""
    return save_figure(training_curves_figure(read_jsonl(metrics_jsonl), title), out_png)


def plot_all_training(params, out_png):
    """Every run's Δ² (mean squared distance to the target, before the adaptive weight, which makes the
    weighted loss ≈ 1 by design) and α(k) on shared axes."""
    fig, (ax_loss, ax_alpha) = plt.subplots(1, 2, figsize=(11, 3.8))
    for run_name in params.run_names:
        records = [r for r in read_jsonl(params.run_dir(run_name) / "metrics.jsonl") if "alpha" in r]
        steps = [r["step"] for r in records]
        ax_loss.plot(steps, [r.get("delta_sq") for r in records], label=run_name)
        ax_alpha.plot(steps, [r.get("alpha") for r in records], label=run_name)
    ax_loss.set(xlabel="step", title="Δ² = mean (u − sg(target))² (unweighted)", yscale="log")
    ax_alpha.set(xlabel="step", title="α(k) (sigmoid curriculum)", ylim=(-0.05, 1.05))
    ax_loss.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out_png)


# ----------------------------------------------------------------------------
# In-training curves per group (mean over seeds, min–max band)


def curves_by_group(params, key):
    """{group: [{step: value} per seed]} for a metrics.jsonl key; a run without a group is its own group."""
    curves = {}
    for run_name in params.run_names:
        points = {
            r["step"]: r[key] for r in read_jsonl(params.run_dir(run_name) / "metrics.jsonl") if r.get(key) is not None
        }
        if points:
            curves.setdefault(params.run(run_name).group or run_name, []).append(points)
    return curves


def plot_band(ax, runs, label):
    """Mean over seeds (line) and min–max band over seeds, at the steps every seed logged."""
    steps = sorted(set.intersection(*(set(p) for p in runs)))
    vals = pd.DataFrame([[p[s] for s in steps] for p in runs], columns=steps)
    (line,) = ax.plot(steps, vals.mean(), marker="o", ms=3, label=f"{label} (n={len(runs)})")
    if len(runs) > 1:
        ax.fill_between(steps, vals.min(), vals.max(), alpha=0.2, color=line.get_color())


CONFLICT_KEYS = ("cos(TFM,TC)", "cos(FM',TC)", "cos(TFM,FM')")


def gradient_conflict_figure(params):
    """The Figure of plot_gradient_conflict, one axes per CONFLICT_KEYS entry, one line per group; None when
    no run logged the first key."""
    keys = list(CONFLICT_KEYS)
    curves = {key: curves_by_group(params, key) for key in keys}
    if not curves[keys[0]]:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), sharey=True)
    for ax, key in zip(axes, keys):
        for group, runs in curves[key].items():
            plot_band(ax, runs, group)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(title=key.replace("cos", "cos ∇"), xlabel="step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_gradient_conflict(params, out_png):
    """cos(∇L_TFM, ∇L_TC), cos(∇L_FM′, ∇L_TC), cos(∇L_TFM, ∇L_FM′) against the step (paper Fig. 3 / App. E),
    per group: mean over seeds, band = min–max."""
    fig = gradient_conflict_figure(params)
    return None if fig is None else save_figure(fig, out_png)


def plot_metric_vs_step_by_group(params, metric_key, out_png):
    """In-training `metric_key` per group: mean over seeds (line) and min–max band over seeds."""
    curves = curves_by_group(params, metric_key)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for group, runs in curves.items():
        plot_band(ax, runs, group)
    ax.set(
        xlabel="training step", ylabel=metric_key, title=f"{metric_key}: mean over seeds, band = min–max", yscale="log"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_png)


# ----------------------------------------------------------------------------
# Evaluated metrics


def metric_bars_figure(results, metric):
    """The Figure of plot_metric_bars: one bar container per (weights, sampler) in sorted order, one bar per
    run in order of first appearance (NaN where that run lacks the cell); None when `metric` has no rows."""
    sub = results[results.metric == metric]
    if sub.empty:
        return None
    groups = sorted(set(zip(sub.weights, sub.sampler)))
    runs = list(dict.fromkeys(sub.run))
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(runs) * len(groups) ** 0.5), 4))
    for i, (weights, sampler) in enumerate(groups):
        vals, err_lo, err_hi = [], [], []
        for run in runs:
            hit = sub[(sub.run == run) & (sub.weights == weights) & (sub.sampler == sampler)]
            v, lo, hi = (hit.iloc[0].value, hit.iloc[0].low, hit.iloc[0].high) if len(hit) else (float("nan"),) * 3
            vals.append(v)
            err_lo.append(max(v - lo, 0))
            err_hi.append(max(hi - v, 0))
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(runs))]
        ax.bar(xs, vals, width, yerr=[err_lo, err_hi], capsize=2, label=f"{weights} {sampler}")
    ax.set_xticks(range(len(runs)), runs, rotation=15, fontsize=8)
    ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (lower is better)" if lower_is_better(metric) else metric)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_metric_bars(results, metric, out_png):
    """One bar per run × weights × sampler with its bootstrap interval."""
    fig = metric_bars_figure(results, metric)
    return None if fig is None else save_figure(fig, out_png)


def plot_metric_vs_step(params, results, metric, out_png):
    """The metric at each evaluated step per run (EMA, first sampler) — final evaluations and any logged
    in training (metrics.jsonl keys named like the MLflow ones: `<metric>_<sampler>_<weights>`)."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    drawn = False
    for run_name in params.run_names:
        points = {}
        for r in read_jsonl(params.run_dir(run_name) / "metrics.jsonl"):
            for key, v in r.items():
                if key.startswith(f"{metric}_") and key.endswith("_ema"):
                    points[r["step"]] = v
        final = results[(results.run == run_name) & (results.metric == metric) & (results.weights == "ema")]
        if len(final):
            points[params.run(run_name).steps] = float(final.sort_values("nfe").iloc[0].value)
        if points:
            steps = sorted(points)
            ax.plot(steps, [points[s] for s in steps], marker="o", label=run_name)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="training step", ylabel=METRIC_LABELS.get(metric, metric), title=f"{metric} (EMA) vs step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out_png)


# ----------------------------------------------------------------------------
# Sample sheets


def sample_sheet(params, run_name, out_png):
    """The run's class-sorted sample grids, one panel per weights × sampler."""
    grids = sorted((params.run_dir(run_name) / "samples").glob("*/*.png"))
    if not grids:
        return None
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.6), squeeze=False)
    for ax, path in zip(axes[0], grids):
        ax.imshow(plt.imread(path), cmap="gray")
        ax.set_title(f"{path.parent.name} {path.stem}", fontsize=9)
        ax.axis("off")
    fig.suptitle(run_name)
    fig.tight_layout()
    return save_figure(fig, out_png)


def group_sample_sheet(params, weights, out_png):
    """One column per group (its lowest-seed run), one row per sampler: the same sample seeds and labels."""
    first = {}
    for run_name in sorted(params.run_names, key=lambda r: params.run(r).seed):
        first.setdefault(params.run(run_name).group, run_name)
    first.pop(None, None)
    samplers = list(params.samplers)
    grids = {(g, s): params.run_dir(r) / "samples" / weights / f"{s}.png" for g, r in first.items() for s in samplers}
    if not first or not any(p.exists() for p in grids.values()):
        return None
    fig, axes = plt.subplots(len(samplers), len(first), figsize=(3.2 * len(first), 3.6 * len(samplers)), squeeze=False)
    for j, (group, run_name) in enumerate(first.items()):
        for i, sampler in enumerate(samplers):
            ax = axes[i][j]
            if grids[group, sampler].exists():
                ax.imshow(plt.imread(grids[group, sampler]), cmap="gray")
            ax.set_title(f"{run_name} · {sampler}", fontsize=9)
            ax.axis("off")
    fig.suptitle(f"{weights} weights: the same sample seeds and labels for every method (rows: classes)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_png)


# ----------------------------------------------------------------------------
# Seeds and the post-hoc EMA sweep


def plot_primary_endpoint(va, vb, spec, out_png):
    """Per seed, the two arms' values joined by a line (paired by seed), and the differences. va, vb: the
    contrast's two arms indexed by the seeds both ran (report.seeds.paired_values)."""
    a, b = spec["contrast"]
    if not len(va):
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    for seed in va.index:
        ax1.plot([0, 1], [va[seed], vb[seed]], "o-", color="0.5", lw=1)
    ax1.set(
        xticks=[0, 1],
        xticklabels=[a, b],
        xlim=(-0.4, 1.4),
        ylabel=spec["metric"],
        title=f"{spec['weights']}, {spec['sampler']}: one line per seed",
    )
    d = va - vb
    ax2.axhline(0, color="k", lw=0.8)
    ax2.plot(range(len(d)), d.values, "o")
    ax2.set(
        xticks=range(len(d)),
        xticklabels=[str(s) for s in d.index],
        xlabel="seed",
        ylabel=f"{a} − {b}",
        title="paired differences (below 0: A better)",
    )
    fig.tight_layout()
    return save_figure(fig, out_png)


def plot_metric_vs_sigma_rel(rows, sweep, out_png, title):
    """One panel per metric: the metric (with its interval) against σ_rel, one line per sampler, the best σ_rel
    marked; dashed and dotted lines at the same sampler's raw and training-EMA values. sweep: the phema-<σ_rel>
    rows of `rows` with their sigma_rel column (report.posthoc.sigma_sweep)."""
    metrics = list(dict.fromkeys(sweep.metric))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, (sampler, sub) in enumerate(sweep[sweep.metric == metric].groupby("sampler")):
            sub = sub.sort_values("sigma_rel")
            color = f"C{i}"
            ax.errorbar(
                sub.sigma_rel,
                sub.value,
                yerr=[(sub.value - sub.low).clip(lower=0), (sub.high - sub.value).clip(lower=0)],
                marker="o",
                capsize=2,
                color=color,
                label=f"post-hoc EMA, {sampler}",
            )
            best = float(sub.loc[best_index(sub.value, metric), "sigma_rel"])
            ax.plot([best], sub[sub.sigma_rel == best].value, marker="*", markersize=14, color=color, linestyle="")
            for fixed, style in (("raw", "--"), ("ema", ":")):
                hit = rows[(rows.metric == metric) & (rows.sampler == sampler) & (rows.weights == fixed)]
                if len(hit):
                    ax.axhline(
                        float(hit.value.iloc[0]),
                        color=color,
                        linestyle=style,
                        linewidth=1,
                        label=f"{'raw weights' if fixed == 'raw' else 'training EMA'}, {sampler}",
                    )
        ax.set(
            xlabel="σ_rel (relative EMA width)",
            ylabel=METRIC_LABELS.get(metric, metric),
            title=f"{title}: {METRIC_LABELS.get(metric, metric)} vs σ_rel (★ best)",
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out_png)
