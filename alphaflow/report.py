"""Tables and plots: the paper's tables with this project's numbers beside them (paper Tables 1–6).

    alphaflow report --params P

reads every `results/runs/<run>/eval/<weights>/<sampler>.json` of the profile and writes, under
`results/tables/<profile>/`:
  results.csv          long format: one row per run × weights × sampler × metric (value, CI, n)
  table1.{md,csv,tex}  paper Table 1 shape: model × method × weights, 1-NFE and 2-NFE per metric,
                       ours [95 % CI] | paper | Δ; paper rows without a result say "not run"
  table2.{md,csv,tex}  the same for Table 2 ablation runs (paper_results.<run>.table: 2a / 2b), if any
  samplers.md          every sampler of every run (not only the 1-/2-NFE pair of Table 1)
  complete.json        the evaluations the tables were built from (sha256 each); written only when every
                       run × weights × sampler of the profile has been evaluated
and under `results/plots/<profile>/`: training curves (losses, α(k)), gradient-conflict cosines,
metric bars (EMA vs raw, per sampler, with CIs) and one sample sheet per run. Each run's rows also go
to its MLflow run with `log_table` (artifact `fid_table.json`), so the MLflow UI compares runs.
"""

import hashlib
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from alphaflow import checkpoint as ckpt
from alphaflow.config import eval_protocol, phema_sigma_rel
from alphaflow.tracking import read_jsonl

METRIC_LABELS = {"fid": "FID", "fdd": "FDD", "fcd": "FCD", "is": "IS", "fd_classifier": "FD_clf",
                 "is_classifier": "IS_clf"}
NOT_RUN = "not run"


def save_figure(fig, out_png):
    """Atomic PNG write (temp file + rename)."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png


def write_text(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


#----------------------------------------------------------------------------
# Collecting results


def collect(params):
    """Long-format DataFrame of every finished evaluation of the profile's runs."""
    rows = []
    for run_name in params.run_names:
        run = params.run(run_name)
        for path in sorted((params.run_dir(run_name) / "eval").glob("*/*.json")):
            record = json.loads(path.read_text())
            for metric, m in record["metrics"].items():
                rows.append({"run": run_name, "method": run.method, "model": run.model, "weights": record["weights"],
                             "sampler": record["sampler"], "nfe": len(record["t_steps"]) - 1, "mode": record["mode"],
                             "metric": metric, "value": m["value"], "low": m["low"], "high": m["high"],
                             "n": m.get("n", record["num_samples"]), "extractor": m.get("extractor", ""),
                             "labels": record.get("labels", "")})
    columns = ["run", "method", "model", "weights", "sampler", "nfe", "mode", "metric", "value", "low", "high", "n",
               "extractor", "labels"]
    return pd.DataFrame(rows, columns=columns)


def sampler_labels(params, name):
    """The labels a sampler's samples carry: its own `labels`, else eval.labels."""
    return params.samplers[name].get("labels") or params.raw["eval"].get("labels", "random")


def nfe_samplers(params, run_name, labels=None):
    """{1: sampler, 2: sampler} used for the run's Table 1 columns (paper_results may name the 2-NFE one), among
    the samplers with these labels (None: eval.labels). For other labels than eval.labels, the 2-NFE sampler is
    the one with the same t_steps and mode as the run's Table 1 sampler."""
    default = params.raw["eval"].get("labels", "random")
    labels = labels or default
    paper = params.raw.get("paper_results", {}).get(run_name, {})
    by_nfe = {}
    for name, s in params.samplers.items():
        if sampler_labels(params, name) == labels:
            by_nfe.setdefault(len(s["t_steps"]) - 1, name)
    named = paper.get("nfe2_sampler")
    if named in params.samplers:
        if labels == default:
            by_nfe[2] = named
        else:
            like = {k: params.samplers[named][k] for k in ("t_steps", "mode")}
            by_nfe[2] = next((n for n, s in params.samplers.items() if sampler_labels(params, n) == labels
                              and {k: s[k] for k in like} == like), None)
    return {n: by_nfe.get(n) for n in (1, 2)}


def other_labels(params):
    """Label protocols of samplers other than eval.labels (e.g. balanced: the paper's Table 6)."""
    default = params.raw["eval"].get("labels", "random")
    return sorted({sampler_labels(params, n) for n in params.samplers} - {default})


def table_metrics(params):
    """Metrics shown in the tables: the profile's own (FD/FID-like first), then any with paper numbers."""
    metrics = [m for m in params.raw["eval"]["metrics"]]
    for entry in params.raw.get("paper_results", {}).values():
        for key in entry:
            base = key.rsplit("_", 1)[0]
            if key.endswith(("_1nfe", "_2nfe")) and base not in metrics:
                metrics.append(base)
    return metrics


SAME_PROTOCOL = "as the paper"  # paper_results.<run>.protocol: how a row's paper numbers were obtained otherwise


def paper_table(params, results, table="1", labels=None):
    """Wide table: a row per (run, weights) of this table; ours / paper / Δ for each NFE × metric. labels: the
    Table 1 runs with samplers of other labels (balanced: Table 6), beside paper_results.<run>.<labels>."""
    paper_results = params.raw.get("paper_results", {})
    metrics = table_metrics(params)
    runs = [r for r in params.run_names if str(paper_results.get(r, {}).get("table", "1")) == table]
    if table != "1" and not runs:
        return None
    rows = []
    for run_name in runs:
        paper = paper_results.get(run_name, {})
        if labels is not None:  # the paper's numbers for these labels only (none where it has none)
            numbers = paper.get(labels) or {}
            paper = {**{k: v for k, v in paper.items() if not k.endswith(("_1nfe", "_2nfe"))}, **numbers}
        samplers = nfe_samplers(params, run_name, labels)
        for weights in params.raw["eval"]["weights"]:
            row = {"run": run_name, "paper row": paper.get("row", "–"), "weights": weights,
                   "protocol": paper.get("protocol", SAME_PROTOCOL)}
            for nfe in (1, 2):
                for metric in metrics:
                    col = f"NFE{nfe} {METRIC_LABELS.get(metric, metric)}"
                    hit = results[(results.run == run_name) & (results.weights == weights)
                                  & (results.sampler == samplers[nfe]) & (results.metric == metric)]
                    ours = hit.iloc[0] if len(hit) else None
                    # The paper evaluates EMA weights only (paper Table 1).
                    theirs = paper.get(f"{metric}_{nfe}nfe") if weights == "ema" else None
                    row[f"{col} ours"] = None if ours is None else float(ours.value)
                    row[f"{col} low"] = None if ours is None else float(ours.low)
                    row[f"{col} high"] = None if ours is None else float(ours.high)
                    row[f"{col} paper"] = theirs
                    row[f"{col} Δ"] = (None if ours is None or theirs is None else float(ours.value) - theirs)
            rows.append(row)
    return mark_best_sigma_rel(pd.DataFrame(rows), metrics)


BEST = " ★"


def mark_best_sigma_rel(wide, metrics):
    """Appends ★ to the weights of each run's best phema-<σ_rel> row, by the first metric it has at 1 NFE."""
    if wide.empty:
        return wide
    for metric in metrics:
        col = f"NFE1 {METRIC_LABELS.get(metric, metric)} ours"
        sweep = wide[wide.weights.map(phema_sigma_rel).notna() & wide[col].notna()]
        if sweep.empty:
            continue
        for _, rows in sweep.groupby("run"):
            pick = rows[col].idxmin() if lower_is_better(metric) else rows[col].idxmax()
            wide.loc[pick, "weights"] += BEST
        break
    return wide


def fmt(x, digits=2):
    return "–" if x is None or (isinstance(x, float) and pd.isna(x)) else f"{x:.{digits}f}"


def display_table(wide):
    """The wide table with 'ours' as 'value [low, high]' (or 'not run'), ready for Markdown/LaTeX."""
    out = pd.DataFrame({"run": wide["run"], "paper row": wide["paper row"], "weights": wide["weights"]})
    if "protocol" in wide and (wide["protocol"] != SAME_PROTOCOL).any():  # rows not comparable like for like
        out["paper numbers' protocol"] = wide["protocol"]
    for col in [c[: -len(" ours")] for c in wide.columns if c.endswith(" ours")]:
        ours = [NOT_RUN if pd.isna(v) else f"{v:.2f} [{lo:.2f}, {hi:.2f}]"
                for v, lo, hi in zip(wide[f"{col} ours"], wide[f"{col} low"], wide[f"{col} high"])]
        if wide[f"{col} paper"].isna().all() and all(o == NOT_RUN for o in ours):
            continue  # a metric nobody reports for this table
        out[f"{col} ours"] = ours
        if not wide[f"{col} paper"].isna().all():
            out[f"{col} paper"] = [fmt(v) for v in wide[f"{col} paper"]]
            out[f"{col} Δ"] = [fmt(v) for v in wide[f"{col} Δ"]]
    return out


def markdown(df):
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def latex(df):
    escaped = df.map(lambda v: str(v).replace("_", r"\_").replace("%", r"\%").replace("α", r"$\alpha$"))
    escaped.columns = [str(c).replace("_", r"\_").replace("Δ", r"$\Delta$") for c in df.columns]
    return escaped.to_latex(index=False)


def write_table(wide, base, title):
    shown = display_table(wide)
    write_text(f"{base}.md", f"# {title}\n\n{markdown(shown)}")
    write_text(f"{base}.csv", wide.to_csv(index=False))
    write_text(f"{base}.tex", latex(shown))
    return shown


def samplers_table(results):
    if results.empty:
        return "no evaluation results yet\n"
    pivot = results.assign(cell=[f"{v:.2f} [{lo:.2f}, {hi:.2f}]" for v, lo, hi in
                                 zip(results.value, results.low, results.high)])
    pivot = pivot.pivot_table(index=["run", "weights"], columns=["metric", "sampler"], values="cell", aggfunc="first")
    pivot.columns = [f"{METRIC_LABELS.get(m, m)} {s}" for m, s in pivot.columns]
    return markdown(pivot.reset_index().fillna("–"))


#----------------------------------------------------------------------------
# Plots


def plot_training_curves(metrics_jsonl, out_png, title=""):
    """Loss decomposition (L_TFM, L_TC, their sum), the weighted loss and α(k) against the step."""
    records = [r for r in read_jsonl(metrics_jsonl) if "alpha" in r]  # training records (not in-training evals)
    fig, (ax_loss, ax_alpha) = plt.subplots(1, 2, figsize=(10, 3.5))
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
    fig.tight_layout()
    return save_figure(fig, out_png)


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


def curves_by_group(params, key):
    """{group: [{step: value} per seed]} for a metrics.jsonl key; a run without a group is its own group."""
    curves = {}
    for run_name in params.run_names:
        points = {r["step"]: r[key] for r in read_jsonl(params.run_dir(run_name) / "metrics.jsonl")
                  if r.get(key) is not None}
        if points:
            curves.setdefault(params.run(run_name).group or run_name, []).append(points)
    return curves


def plot_band(ax, runs, label):
    """Mean over seeds (line) and min–max band over seeds, at the steps every seed logged."""
    steps = sorted(set.intersection(*(set(p) for p in runs)))
    vals = pd.DataFrame([[p[s] for s in steps] for p in runs], columns=steps)
    line, = ax.plot(steps, vals.mean(), marker="o", ms=3, label=f"{label} (n={len(runs)})")
    if len(runs) > 1:
        ax.fill_between(steps, vals.min(), vals.max(), alpha=0.2, color=line.get_color())


def plot_gradient_conflict(params, out_png):
    """cos(∇L_TFM, ∇L_TC), cos(∇L_FM′, ∇L_TC), cos(∇L_TFM, ∇L_FM′) against the step (paper Fig. 3 / App. E),
    per group: mean over seeds, band = min–max."""
    keys = ["cos(TFM,TC)", "cos(FM',TC)", "cos(TFM,FM')"]
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
    return save_figure(fig, out_png)


def plot_metric_bars(results, metric, out_png):
    """One bar per run × weights × sampler with its bootstrap interval."""
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
    ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (lower is better)" if not metric.startswith("is") else metric)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out_png)


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
    fig, axes = plt.subplots(len(samplers), len(first), figsize=(3.2 * len(first), 3.6 * len(samplers)),
                             squeeze=False)
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


#----------------------------------------------------------------------------
# Seeds: mean over training seeds with t-intervals, and verdicts (params `group`, `comparisons`)


def t_interval(values, level=0.95):
    """(mean, half-width) of the Student-t interval over independent runs; half-width NaN for n < 2."""
    from scipy import stats as st

    x = pd.Series(values, dtype=float)
    n = len(x)
    if n < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(st.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / n ** 0.5)


def welch_interval(a, b, level=0.95):
    """(mean(a) − mean(b), half-width) with Welch's t-interval (unequal variances)."""
    from scipy import stats as st

    a, b = pd.Series(a, dtype=float), pd.Series(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return float(a.mean() - b.mean()), float("nan")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va + vb > 0 else len(a) + len(b) - 2
    return float(a.mean() - b.mean()), float(st.t.ppf(0.5 + level / 2, dof) * (va + vb) ** 0.5)


def with_groups(params, results):
    """results restricted to runs with a `group`, with group and seed columns."""
    runs = {r: params.run(r) for r in params.run_names if params.run(r).group}
    sub = results[results.run.isin(runs)].copy()
    sub["group"] = sub.run.map(lambda r: runs[r].group)
    sub["seed"] = sub.run.map(lambda r: runs[r].seed)
    return sub


def seed_table(grouped):
    """A row per group × weights × sampler × metric: mean over seeds, 95 % t-interval, seeds."""
    rows = []
    for (group, weights, sampler, metric), sub in grouped.groupby(["group", "weights", "sampler", "metric"]):
        mean, half = t_interval(sub.value)
        rows.append({"group": group, "weights": weights, "sampler": sampler, "metric": metric, "mean": mean,
                     "low": mean - half, "high": mean + half, "seeds": len(sub),
                     "per_seed": " ".join(f"{v:.2f}" for v in sub.sort_values("seed").value)})
    return pd.DataFrame(rows)


def paired_interval(a, b, level=0.95):
    """(mean(a − b), half-width): the t-interval of per-seed differences; a, b indexed by the same seeds."""
    return t_interval((pd.Series(a, dtype=float) - pd.Series(b, dtype=float)).dropna(), level)


def verdict_of(diff, half, a, b, lower_better=True):
    """"not separable" when the interval diff ± half contains 0, else which of a, b is better."""
    if pd.isna(half) or abs(diff) <= half:
        return "not separable"
    return f"{a if (diff < 0) == lower_better else b} better"


def verdicts(params, grouped):
    """One line per comparison × weights × sampler × metric: A − B with its Welch interval and, over the
    seeds both groups ran (at least 2), the paired interval (seed k gives every method the same initial
    weights, data order and noise draws, so per-seed differences cancel the shared luck)."""
    lines = []
    for a, b in params.raw.get("comparisons", []):
        for (weights, sampler, metric), sub in grouped.groupby(["weights", "sampler", "metric"]):
            va = sub[sub.group == a].set_index("seed").value
            vb = sub[sub.group == b].set_index("seed").value
            if va.empty or vb.empty:
                continue
            lower_better = not metric.startswith("is")
            diff, half = welch_interval(va, vb)
            line = {"comparison": f"{a} − {b}", "weights": weights, "sampler": sampler, "metric": metric,
                    "difference": diff, "low": diff - half, "high": diff + half,
                    "verdict": verdict_of(diff, half, a, b, lower_better)}
            common = va.index.intersection(vb.index)
            if len(common) >= 2:
                pdiff, phalf = paired_interval(va[common], vb[common])
                line.update(paired_seeds=len(common), paired_difference=pdiff, paired_low=pdiff - phalf,
                            paired_high=pdiff + phalf, paired_verdict=verdict_of(pdiff, phalf, a, b, lower_better))
            lines.append(line)
    return pd.DataFrame(lines)


def detectable_difference(sd, n, level=0.95, power=0.8):
    """Smallest true paired difference a two-sided paired t-test at `level` detects with probability
    `power` over n seeds with per-seed difference SD sd: (t_{(1+level)/2, n−1} + t_{power, n−1}) · sd / √n."""
    from scipy import stats as st

    if n < 2 or pd.isna(sd):
        return float("nan")
    return float((st.t.ppf(0.5 + level / 2, n - 1) + st.t.ppf(power, n - 1)) * sd / n ** 0.5)


def paired_values(grouped, spec):
    """(A, B): the two groups' values of spec's metric at its weights × sampler, indexed by the seeds both ran."""
    a, b = spec["contrast"]
    sub = grouped[(grouped.weights == spec["weights"]) & (grouped.sampler == spec["sampler"])
                  & (grouped.metric == spec["metric"])]
    va, vb = (sub[sub.group == g].set_index("seed").value for g in (a, b))
    common = va.index.intersection(vb.index).sort_values()
    return va[common], vb[common]


def summarise_differences(d, spec, label, mean_b, level, power):
    """The contrast line of per-seed differences d = A − B: mean, t-interval, SD, detectable difference, verdict."""
    a, b = spec["contrast"]
    mean, half = t_interval(d, level)
    sd = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
    return {"contrast": label, "weights": spec["weights"], "sampler": spec["sampler"], "metric": spec["metric"],
            "seeds": len(d), "difference": mean, "low": mean - half, "high": mean + half, "sd": sd,
            "detectable": detectable_difference(sd, len(d), level, power), "mean_b": mean_b,
            "verdict": (verdict_of(mean, half, a, b, not spec["metric"].startswith("is")) if len(d) > 1
                        else "not run yet" if len(d) == 0 else "one seed: no interval"), "per_seed": d}


def endpoint(grouped, spec, level=0.95, power=0.8):
    """One pre-registered contrast (params `preregistered`): the per-seed differences A − B over the seeds
    both groups ran, their mean with a t-interval, SD, the difference detectable with `power`, the verdict."""
    va, vb = paired_values(grouped, spec)
    mean_b = float(vb.mean()) if len(vb) else float("nan")
    return summarise_differences(va - vb, spec, " − ".join(spec["contrast"]), mean_b, level, power)


def training_seconds(records, batch_size):
    """{step: training seconds up to that step} from metrics.jsonl: each log record's images/s covers the
    steps since the previous record (in-training evaluation excluded, as training measures it)."""
    seconds, total, prev = {}, 0.0, 0
    for r in records:
        if "images_per_s" in r:
            total += (r["step"] - prev) * batch_size / r["images_per_s"]
            prev = r["step"]
            seconds[r["step"]] = total
    return seconds


def curve_in_time(params, run_name, key):
    """[(training seconds, value)] of an in-training metric (eval_every), at its evaluation steps."""
    records = read_jsonl(params.run_dir(run_name) / "metrics.jsonl")
    seconds = training_seconds(records, params.run(run_name).batch_size)
    return sorted((seconds[r["step"]], r[key]) for r in records if r.get(key) is not None and r["step"] in seconds)


def matched_time_endpoint(params, grouped, spec, level=0.95, power=0.8):
    """The equal-compute contrast: per seed, A's in-training metric at its last evaluation against B's at the
    same training wall time (linear interpolation between B's evaluations; NaN if B never got that far)."""
    a, b = spec["contrast"]
    key = f"{spec['metric']}_{spec['sampler']}_{spec['weights']}"
    runs = grouped.drop_duplicates("run").set_index(["group", "seed"]).run
    diffs = {}
    for seed in sorted(set(runs[a].index) & set(runs[b].index)):
        ca, cb = curve_in_time(params, runs[a][seed], key), curve_in_time(params, runs[b][seed], key)
        if not ca or not cb:
            continue
        t_a, v_a = ca[-1]
        times, values = zip(*cb)
        diffs[seed] = v_a - float(np.interp(t_a, times, values, right=np.nan)) if t_a >= times[0] else np.nan
    label = f"{a} − {b} (matched training time, in-training {spec['metric']})"
    return summarise_differences(pd.Series(diffs, dtype=float).dropna(), spec, label, float("nan"), level, power)


def plot_primary_endpoint(grouped, spec, out_png):
    """Per seed, the two arms' values joined by a line (paired by seed), and the differences."""
    a, b = spec["contrast"]
    va, vb = paired_values(grouped, spec)
    if not len(va):
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    for seed in va.index:
        ax1.plot([0, 1], [va[seed], vb[seed]], "o-", color="0.5", lw=1)
    ax1.set(xticks=[0, 1], xticklabels=[a, b], xlim=(-0.4, 1.4), ylabel=spec["metric"],
            title=f"{spec['weights']}, {spec['sampler']}: one line per seed")
    d = va - vb
    ax2.axhline(0, color="k", lw=0.8)
    ax2.plot(range(len(d)), d.values, "o")
    ax2.set(xticks=range(len(d)), xticklabels=[str(s) for s in d.index], xlabel="seed", ylabel=f"{a} − {b}",
            title="paired differences (below 0: A better)")
    fig.tight_layout()
    return save_figure(fig, out_png)


def preregistered_report(params, grouped, tables, plots):
    """The pre-registered test (params `preregistered`): primary endpoint, secondary contrasts, post-hoc
    checks of the primary contrast at the other weights × samplers, and the power statement."""
    spec = params.raw.get("preregistered")
    if not spec or grouped.empty:
        return {}
    level, power = spec.get("level", 0.95), spec.get("power", 0.8)
    primary = spec["primary"]
    rows = [("primary", primary)] + [("secondary", s) for s in spec.get("secondary", [])]
    rows += [("post hoc", {**primary, "weights": w, "sampler": smp})
             for w in params.raw["eval"]["weights"] for smp in params.samplers
             if (w, smp) != (primary["weights"], primary["sampler"])]
    def evaluate(s):
        if s.get("at") == "matched_time":
            return matched_time_endpoint(params, grouped, s, level, power)
        return endpoint(grouped, s, level, power)

    results = [{"role": role, **evaluate(s)} for role, s in rows]
    table = pd.DataFrame([{k: v for k, v in r.items() if k != "per_seed"} for r in results])
    first = results[0]
    per_seed = first["per_seed"].rename("difference").rename_axis("seed").reset_index()
    out = {"preregistered_csv": write_text(tables / "preregistered.csv", table.to_csv(index=False)),
           "primary_per_seed_csv": write_text(tables / "primary_per_seed.csv", per_seed.to_csv(index=False))}
    shown = table.assign(**{
        f"A − B [{level:.0%} t-interval]": interval_strings(table, ""),
        "paired SD": [fmt(x) for x in table.sd],
        f"detectable with {power:.0%} power": [fmt(x) for x in table.detectable]})
    shown = shown[["role", "contrast", "weights", "sampler", "metric", "seeds", f"A − B [{level:.0%} t-interval]",
                   "paired SD", f"detectable with {power:.0%} power", "verdict"]]
    rel = first["detectable"] / first["mean_b"] if first["mean_b"] else float("nan")
    statement = (f"With {first['seeds']} seeds and the measured paired SD of {fmt(first['sd'])}, this design detects a "
                 f"true {first['contrast']} difference of {fmt(first['detectable'])} {first['metric']} "
                 f"({rel:.1%} of the second arm's mean) with {power:.0%} power at the {1 - level:.0%} level "
                 f"(two-sided paired t-test). Only the primary row is the test; the others are labelled.")
    text = (f"# Pre-registered test — {params.profile}\n\n{spec.get('statement', '').strip()}\n\n"
            f"**Primary endpoint**: {first['contrast']}, {first['metric']}, {first['weights']} weights, "
            f"{first['sampler']}, paired over seeds: {interval_strings(table.iloc[:1], '')[0]} → "
            f"**{first['verdict']}**.\n\n**Power**: {statement}\n\n{markdown(shown)}")
    out["preregistered"] = write_text(tables / "preregistered.md", text)
    out["primary_endpoint"] = plot_primary_endpoint(grouped, primary, plots / "primary_endpoint.png")
    return out


def plot_metric_vs_step_by_group(params, metric_key, out_png):
    """In-training `metric_key` per group: mean over seeds (line) and min–max band over seeds."""
    curves = curves_by_group(params, metric_key)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for group, runs in curves.items():
        plot_band(ax, runs, group)
    ax.set(xlabel="training step", ylabel=metric_key, title=f"{metric_key}: mean over seeds, band = min–max",
           yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_png)


def interval_strings(df, prefix):
    """'+d [lo, hi]' per row from the columns <prefix>difference/low/high ('–' where missing)."""
    d, lo, hi = df[f"{prefix}difference"], df[f"{prefix}low"], df[f"{prefix}high"]
    return ["–" if pd.isna(x) else f"{x:+.2f} [{l:+.2f}, {h:+.2f}]" for x, l, h in zip(d, lo, hi)]


def seeds_report(params, results, tables, plots):
    grouped = with_groups(params, results)
    if grouped.empty:
        return {}
    table = seed_table(grouped)
    verdict = verdicts(params, grouped)
    out = {"seeds_csv": write_text(tables / "seeds_per_run.csv", grouped.to_csv(index=False))}
    shown = table.assign(**{"mean [95 % t-interval over seeds]": [
        f"{m:.2f} [{lo:.2f}, {hi:.2f}]" for m, lo, hi in zip(table["mean"], table["low"], table["high"])]})
    shown = shown[["group", "weights", "sampler", "metric", "mean [95 % t-interval over seeds]", "seeds", "per_seed"]]
    text = (f"# Mean over training seeds — {params.profile}\n\nIntervals are Student-t 95 % intervals over "
            f"training seeds (not bootstrap over samples).\n\n{markdown(shown)}")
    if not verdict.empty:
        columns = ["comparison", "weights", "sampler", "metric", "A − B [95 % Welch interval]", "verdict"]
        verdict_shown = verdict.assign(**{"A − B [95 % Welch interval]": interval_strings(verdict, "")})
        if "paired_difference" in verdict:
            verdict_shown["paired by seed [95 % t-interval]"] = [
                x if x == "–" else f"{x} (n={int(n)})" for x, n in zip(interval_strings(verdict, "paired_"),
                                                                       verdict["paired_seeds"])]
            verdict_shown["paired verdict"] = verdict["paired_verdict"].fillna("–")
            columns += ["paired by seed [95 % t-interval]", "paired verdict"]
        text += ("\n## Verdicts\n\nLower is better for FD/FID. \"not separable\" = the interval contains 0. "
                 "Welch treats the two groups' seeds as independent samples. The paired interval uses that seed k "
                 "gives both methods the same initial weights, data order and noise draws: it is the t-interval "
                 "of the per-seed differences over the n seeds both groups ran.\n\n"
                 + markdown(verdict_shown[columns]))
        out["verdicts_csv"] = write_text(tables / "verdicts.csv", verdict.to_csv(index=False))
    out["seeds"] = write_text(tables / "seeds.md", text)
    write_text(tables / "seeds.csv", table.to_csv(index=False))
    out.update(preregistered_report(params, grouped, tables, plots))
    for sampler in params.samplers:
        for weights in params.raw["eval"]["weights"]:
            key = f"fd_classifier_{sampler}_{weights}"
            out[f"steps_{key}"] = plot_metric_vs_step_by_group(params, key, plots / f"{key}_vs_step.png")
    return out


#----------------------------------------------------------------------------
# Post-hoc EMA: the metric against σ_rel, with raw and the training EMA as references


def lower_is_better(metric):
    return not metric.startswith("is")


def sigma_sweep(results):
    """The rows of phema-<σ_rel> weight sets, with their σ_rel (empty when the profile has none)."""
    sigma = results.weights.map(phema_sigma_rel)
    return results[sigma.notna()].assign(sigma_rel=sigma[sigma.notna()].astype(float))


def best_sigma_rel(rows):
    """The σ_rel with the best value among rows of one unit × sampler × metric (lowest FD/FID, highest IS)."""
    metric = rows.metric.iloc[0]
    pick = rows.value.idxmin() if lower_is_better(metric) else rows.value.idxmax()
    return float(rows.loc[pick, "sigma_rel"])


def sweep_table(values, unit):
    """Markdown: one row per unit × sampler × metric; raw, ema and each σ_rel's value, the best σ_rel in bold.
    `values` has columns [unit, weights, sampler, metric, value]."""
    sweep = sigma_sweep(values)
    sigmas = sorted(sweep.sigma_rel.unique())
    rows = []
    for (u, sampler, metric), sub in sweep.groupby([unit, "sampler", "metric"]):
        best = best_sigma_rel(sub)
        row = {unit: u, "sampler": sampler, "metric": METRIC_LABELS.get(metric, metric)}
        for fixed in ("raw", "ema"):
            hit = values[(values[unit] == u) & (values.sampler == sampler) & (values.metric == metric)
                         & (values.weights == fixed)]
            row[fixed] = fmt(float(hit.value.iloc[0])) if len(hit) else "–"
        for sigma in sigmas:
            hit = sub[sub.sigma_rel == sigma]
            cell = fmt(float(hit.value.iloc[0])) if len(hit) else "–"
            row[f"σ_rel {sigma:g}"] = f"**{cell}** ★" if sigma == best else cell
        row["best σ_rel"] = f"{best:g}"
        rows.append(row)
    return markdown(pd.DataFrame(rows))


def phema_report(params, results, tables, plots):
    """tables/phema.md (per run, and per group as the mean over seeds) and one metric-vs-σ_rel plot per run."""
    sweep = sigma_sweep(results)
    if sweep.empty:
        return {}
    text = (f"# Post-hoc EMA — {params.profile}\n\nEach phema-<σ_rel> weight set is the power-function EMA of "
            "that relative width, reconstructed after training from the run's snapshots (EDM2, Karras et al. "
            "2024). ★ = the best σ_rel of the row: selected on the same samples it is scored on, so its value is "
            "optimistic; compare methods at a fixed σ_rel, or at each one's best with that caveat.\n\n"
            "## Per run\n\n" + sweep_table(results, "run"))
    grouped = with_groups(params, results)
    out = {}
    if not grouped.empty:
        means = seed_table(grouped).rename(columns={"mean": "value"})
        text += "\n## Per group (mean over seeds)\n\n" + sweep_table(means, "group")
        best = best_ema_verdicts(params, grouped)
        if not best.empty:
            shown = best.assign(**{"A − B [95 % paired t-interval]": interval_strings(best, "")})
            text += ("\n## Verdicts at each group's best σ_rel\n\nEach group at the σ_rel with its best mean over "
                     "seeds, then the paired per-seed difference. The σ_rel were selected on the same samples, so "
                     "these intervals are optimistic; the verdicts at every fixed σ_rel are in seeds.md.\n\n"
                     + markdown(shown[["comparison", "sampler", "metric", "best σ_rel A", "best σ_rel B",
                                       "A − B [95 % paired t-interval]", "seeds", "verdict"]]))
            if "held-out difference" in best:
                held = best[best["held-out difference"].notna()]
                held = held.assign(**{"A − B [95 % paired t-interval]": interval_strings(held, "held-out ")})
                text += ("\n## Verdicts with σ_rel held out (leave one seed out)\n\nFor each seed, each group's "
                         "σ_rel is the best on the mean of its other seeds; the seed is scored there, and the "
                         "per-seed differences are paired. Selection and scoring use different training runs, "
                         "so this interval carries no selection optimism (the σ_rel may differ from seed to seed)."
                         "\n\n" + markdown(held[["comparison", "sampler", "metric", "A − B [95 % paired t-interval]",
                                                "held-out seeds", "held-out verdict"]]))
            out["phema_verdicts_csv"] = write_text(tables / "phema_verdicts.csv", best.to_csv(index=False))
    out["phema"] = write_text(tables / "phema.md", text)
    for run_name in sweep.run.unique():
        out[f"phema_{run_name}"] = plot_metric_vs_sigma_rel(results[results.run == run_name],
                                                              plots / f"phema_{run_name}.png", run_name)
    return out


def best_ema_verdicts(params, grouped):
    """Per comparison (A, B) × sampler × metric: A at its best σ_rel − B at its best (group means over seeds),
    paired over the seeds both ran; and the same with σ_rel held out (leave_one_seed_out)."""
    sweep = sigma_sweep(grouped)
    lines = []
    for a, b in params.raw.get("comparisons", []):
        for (sampler, metric), sub in sweep[sweep.group.isin([a, b])].groupby(["sampler", "metric"]):
            means = sub.groupby(["group", "sigma_rel"]).value.mean().reset_index().assign(metric=metric)
            if set(means.group) != {a, b}:
                continue
            best = {g: best_sigma_rel(means[means.group == g]) for g in (a, b)}
            per = {g: sub[(sub.group == g) & (sub.sigma_rel == best[g])].set_index("seed").value for g in (a, b)}
            diff, half = paired_interval(per[a], per[b])
            n = len(per[a].index.intersection(per[b].index))
            line = {"comparison": f"{a} − {b}", "sampler": sampler, "metric": metric,
                    "best σ_rel A": f"{best[a]:g}", "best σ_rel B": f"{best[b]:g}", "difference": diff,
                    "low": diff - half, "high": diff + half, "seeds": n,
                    "verdict": verdict_of(diff, half, a, b, lower_is_better(metric)) if n > 1 else "one seed"}
            held = {g: leave_one_seed_out(sub[sub.group == g], metric) for g in (a, b)}
            common = held[a].index.intersection(held[b].index)
            if len(common) > 1:
                hdiff, hhalf = paired_interval(held[a][common], held[b][common])
                line.update({"held-out difference": hdiff, "held-out low": hdiff - hhalf,
                             "held-out high": hdiff + hhalf, "held-out seeds": len(common),
                             "held-out verdict": verdict_of(hdiff, hhalf, a, b, lower_is_better(metric))})
            lines.append(line)
    return pd.DataFrame(lines)


def leave_one_seed_out(rows, metric):
    """Seed k's value at the σ_rel that is best on the mean of the group's other seeds: σ_rel chosen on other
    training runs than the one it scores, so the selection's optimism does not enter (empty with one seed)."""
    out = {}
    for seed in rows.seed.unique():
        others = rows[rows.seed != seed].groupby("sigma_rel").value.mean().reset_index().assign(metric=metric)
        if others.empty:
            continue
        chosen = best_sigma_rel(others)
        out[seed] = float(rows[(rows.seed == seed) & (rows.sigma_rel == chosen)].value.iloc[0])
    return pd.Series(out, dtype=float)


def plot_metric_vs_sigma_rel(rows, out_png, title):
    """One panel per metric: the metric (with its interval) against σ_rel, one line per sampler, the best σ_rel
    marked; dashed and dotted lines at the same sampler's raw and training-EMA values."""
    sweep = sigma_sweep(rows)
    metrics = list(dict.fromkeys(sweep.metric))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, (sampler, sub) in enumerate(sweep[sweep.metric == metric].groupby("sampler")):
            sub = sub.sort_values("sigma_rel")
            color = f"C{i}"
            ax.errorbar(sub.sigma_rel, sub.value, yerr=[(sub.value - sub.low).clip(lower=0),
                                                        (sub.high - sub.value).clip(lower=0)],
                        marker="o", capsize=2, color=color, label=f"post-hoc EMA, {sampler}")
            best = best_sigma_rel(sub)
            ax.plot([best], sub[sub.sigma_rel == best].value, marker="*", markersize=14, color=color, linestyle="")
            for fixed, style in (("raw", "--"), ("ema", ":")):
                hit = rows[(rows.metric == metric) & (rows.sampler == sampler) & (rows.weights == fixed)]
                if len(hit):
                    ax.axhline(float(hit.value.iloc[0]), color=color, linestyle=style, linewidth=1,
                               label=f"{'raw weights' if fixed == 'raw' else 'training EMA'}, {sampler}")
        ax.set(xlabel="σ_rel (relative EMA width)", ylabel=METRIC_LABELS.get(metric, metric),
               title=f"{title}: {METRIC_LABELS.get(metric, metric)} vs σ_rel (★ best)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out_png)


#----------------------------------------------------------------------------
# The report stage


def mlflow_metrics(rows):
    """{name: value} of one run's evaluation rows: `<metric>_<sampler>_<weights>` and its `_ci_low`/`_ci_high`."""
    from alphaflow.evaluate import mlflow_metric_name

    out = {}
    for r in rows.itertuples():
        name = mlflow_metric_name(r.metric, r.sampler, r.weights)
        out.update({name: r.value, f"{name}_ci_low": r.low, f"{name}_ci_high": r.high})
    return out


def log_to_mlflow(params, results, tables):
    """Each run's evaluation metrics (at its last step), sample grids and rows as an MLflow table, on its own run;
    writes tables/mlflow.md with the UI links to the runs table and to the compare view of every run.

    One connection per run. Metrics carry the time of their evaluation file, so logging an unchanged
    evaluation again (a re-run report) adds nothing to the run's history."""
    from alphaflow.tracking import Tracker, read_run_id, ui_links

    for run_name, rows in results.groupby("run"):
        run_dir = params.run_dir(run_name)
        if not (run_dir / "mlflow_run_id").exists():
            continue
        tracker = Tracker(params.tracking_uri(), params.profile, run_name, run_id_file=run_dir / "mlflow_run_id")
        for (weights, sampler), cell in rows.groupby(["weights", "sampler"]):
            evaluated = params.eval_file(run_name, weights, sampler).stat().st_mtime
            tracker.log_metrics(mlflow_metrics(cell), step=params.run(run_name).steps, timestamp=evaluated)
            grid = run_dir / "samples" / weights / f"{sampler}.png"
            if grid.exists():
                tracker.log_artifact(grid, f"samples/{weights}")
        tracker.log_table({c: rows[c].tolist() for c in rows.columns}, "fid_table.json")
        tracker.close()
    run_ids = [i for i in (read_run_id(params.run_dir(r) / "mlflow_run_id") for r in params.run_names) if i]
    links = ui_links(params.tracking_uri(), params.profile, run_ids) if run_ids else None
    if links is None:
        return None
    local = "" if params.tracking_uri().startswith("http") else "Start `mlflow ui` in the project root, then open\n"
    return write_text(tables / "mlflow.md", f"# MLflow — {params.profile}\n\n{local}"
                      f"- the runs table (model-training view): {links['runs']}\n"
                      f"- every run compared, FD/FID with their intervals among the metrics: {links['compare']}\n")


def evaluation_files(params):
    """Every evaluation the profile asks for (Params.evaluation_cells), as eval JSON paths."""
    return [params.eval_file(*cell) for cell in params.evaluation_cells()]


def write_complete_marker(params, tables):
    """complete.json: the evaluations the tables were built from, with their sha256. Only a report over every
    evaluation writes it, as its last file; the Snakemake report rule declares it, so a report run by hand on
    partial results leaves it missing and `snakemake all` still schedules the missing evaluations and this report."""
    digests = {str(p.relative_to(params.results)): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in evaluation_files(params)}
    return write_text(tables / "complete.json", json.dumps({"profile": params.profile, "evaluations": digests},
                                                           indent=1) + "\n")


def partial_banner(params, missing):
    cells = [str(p.relative_to(params.results)) for p in missing]
    more = f", … ({len(cells) - 3} more)" if len(cells) > 3 else ""
    return (f"**Partial: {len(cells)} of {len(evaluation_files(params))} evaluations are missing** "
            f"({', '.join(cells[:3])}{more}). `snakemake all` runs them and rewrites this report.")


PROTOCOL_NOTES = {
    "alphaflow": "the official α-Flow evaluation: per-seed noise generators (seed mod 2³², the consistency "
                 "sampler's fresh noise their next float64 draw), uint8 by truncation",
    "adm": "the official α-Flow sampling, FID against ADM's reference batch (eval.adm_reference)",
}


def provenance_notes(params):
    """Lines under Table 1's title: the evaluation protocol (when not this project's default) and the runs
    whose weights were imported from released files. Empty for the trained profiles with the default protocol."""
    notes = ""
    protocol = eval_protocol(params.raw["eval"])
    if protocol != "default":
        notes += f"\n\nOurs: eval.protocol = {protocol} ({PROTOCOL_NOTES[protocol]})."
    for run_name in params.run_names:
        source = (ckpt.read_state(params.run_dir(run_name) / "checkpoints" / "final", missing_ok=True) or {}).get(
            "source")
        if source:
            notes += (f"\n\n{run_name}: weights imported from {Path(source['file']).name} "
                      f"(sha256 {source['sha256'][:16]}), not trained here.")
    return notes


def report(params, *, mlflow=True):
    """Writes tables and plots; returns {name: path}. Missing evaluations are allowed (interim tables), but the
    tables then say so and complete.json is absent."""
    tables = params.results / "tables" / params.profile
    plots = params.results / "plots" / params.profile
    (tables / "complete.json").unlink(missing_ok=True)
    missing = [p for p in evaluation_files(params) if not p.exists()]
    results = collect(params)
    out = {"results": write_text(tables / "results.csv", results.to_csv(index=False))}
    title = f"Table 1 — {params.profile}: ours [95 % bootstrap CI] vs the paper (EMA rows)"
    if not sigma_sweep(results).empty:
        title += ("\n\n★ = the run's best post-hoc EMA σ_rel at 1 NFE (first metric with values), "
                  "selected on the same samples (optimistic); phema.md has every σ_rel")
    title += provenance_notes(params)
    shown = write_table(paper_table(params, results, "1"), tables / "table1",
                        title + ("\n\n" + partial_banner(params, missing) if missing else ""))
    out["table1"] = tables / "table1.md"
    for labels in other_labels(params):  # e.g. balanced labels: the paper's Table 6
        wide = paper_table(params, results, "1", labels)
        write_table(wide, tables / f"table1-{labels}", f"Table 1 with {labels} labels (the paper's Table 6) — "
                    f"{params.profile}: ours [95 % bootstrap CI] vs the paper (EMA rows)" + provenance_notes(params))
        out[f"table1-{labels}"] = tables / f"table1-{labels}.md"
    for table in ("2a", "2b"):
        wide = paper_table(params, results, table)
        if wide is not None:
            write_table(wide, tables / f"table{table}", f"Table {table} — {params.profile}")
            out[f"table{table}"] = tables / f"table{table}.md"
    out["samplers"] = write_text(tables / "samplers.md", f"# Every sampler — {params.profile}\n\n"
                                 + samplers_table(results))
    out.update(seeds_report(params, results, tables, plots))
    out.update(phema_report(params, results, tables, plots))
    out["training"] = plot_all_training(params, plots / "training.png")
    out["gradient_conflict"] = plot_gradient_conflict(params, plots / "gradient_conflict.png")
    for metric in params.raw["eval"]["metrics"]:
        out[f"bars_{metric}"] = plot_metric_bars(results, metric, plots / f"{metric}.png")
        out[f"steps_{metric}"] = plot_metric_vs_step(params, results, metric, plots / f"{metric}_vs_step.png")
    for weights in params.raw["eval"]["weights"]:
        out[f"samples_by_group_{weights}"] = group_sample_sheet(params, weights,
                                                                plots / f"samples_by_group_{weights}.png")
    for run_name in params.run_names:
        out[f"samples_{run_name}"] = sample_sheet(params, run_name, plots / f"samples_{run_name}.png")
        curves = params.run_dir(run_name) / "plots" / "training.png"
        if curves.exists():
            shutil.copyfile(curves, plots / f"training_{run_name}.png")
    if mlflow and not results.empty:
        out["mlflow"] = log_to_mlflow(params, results, tables)
    if missing:
        print(f"[alphaflow] warning: {partial_banner(params, missing)}")
    else:
        out["complete"] = write_complete_marker(params, tables)
    print(f"[alphaflow] report → {tables}, {plots}\n\n{markdown(shown)}")
    return {k: v for k, v in out.items() if v is not None}
