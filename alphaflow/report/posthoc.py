"""Post-hoc EMA: the metric against σ_rel (phema-<σ_rel> weight sets), with raw and the training EMA as
references, per run and per group, and the verdicts at each group's best σ_rel (also with σ_rel held out)."""

import pandas as pd

from alphaflow.config import phema_sigma_rel
from alphaflow.io import atomic_write_text
from alphaflow.plots import plot_metric_vs_sigma_rel
from alphaflow.report.seeds import seed_table, with_groups
from alphaflow.report.tables import fmt, interval_strings, markdown
from alphaflow.stats import METRIC_LABELS, best_index, lower_is_better, paired_interval, verdict_of


def sigma_sweep(results):
    """The rows of phema-<σ_rel> weight sets, with their σ_rel (empty when the profile has none)."""
    sigma = results.weights.map(phema_sigma_rel)
    return results[sigma.notna()].assign(sigma_rel=sigma[sigma.notna()].astype(float))


def best_sigma_rel(rows):
    """The σ_rel with the best value among rows of one unit × sampler × metric (lowest FD/FID, highest IS)."""
    return float(rows.loc[best_index(rows.value, rows.metric.iloc[0]), "sigma_rel"])


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
            hit = values[
                (values[unit] == u)
                & (values.sampler == sampler)
                & (values.metric == metric)
                & (values.weights == fixed)
            ]
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
    text = (
        f"# Post-hoc EMA — {params.profile}\n\nEach phema-<σ_rel> weight set is the power-function EMA of "
        "that relative width, reconstructed after training from the run's snapshots (EDM2, Karras et al. "
        "2024). ★ = the best σ_rel of the row: selected on the same samples it is scored on, so its value is "
        "optimistic; compare methods at a fixed σ_rel, or at each one's best with that caveat.\n\n"
        "## Per run\n\n" + sweep_table(results, "run")
    )
    grouped = with_groups(params, results)
    out = {}
    if not grouped.empty:
        means = seed_table(grouped).rename(columns={"mean": "value"})
        text += "\n## Per group (mean over seeds)\n\n" + sweep_table(means, "group")
        best = best_ema_verdicts(params, grouped)
        if not best.empty:
            shown = best.assign(**{"A − B [95 % paired t-interval]": interval_strings(best, "")})
            text += (
                "\n## Verdicts at each group's best σ_rel\n\nEach group at the σ_rel with its best mean over "
                "seeds, then the paired per-seed difference. The σ_rel were selected on the same samples, so "
                "these intervals are optimistic; the verdicts at every fixed σ_rel are in seeds.md.\n\n"
                + markdown(
                    shown[
                        [
                            "comparison",
                            "sampler",
                            "metric",
                            "best σ_rel A",
                            "best σ_rel B",
                            "A − B [95 % paired t-interval]",
                            "seeds",
                            "verdict",
                        ]
                    ]
                )
            )
            if "held-out difference" in best:
                held = best[best["held-out difference"].notna()]
                held = held.assign(**{"A − B [95 % paired t-interval]": interval_strings(held, "held-out ")})
                text += (
                    "\n## Verdicts with σ_rel held out (leave one seed out)\n\nFor each seed, each group's "
                    "σ_rel is the best on the mean of its other seeds; the seed is scored there, and the "
                    "per-seed differences are paired. Selection and scoring use different training runs, "
                    "so this interval carries no selection optimism (the σ_rel may differ from seed to seed)."
                    "\n\n"
                    + markdown(
                        held[
                            [
                                "comparison",
                                "sampler",
                                "metric",
                                "A − B [95 % paired t-interval]",
                                "held-out seeds",
                                "held-out verdict",
                            ]
                        ]
                    )
                )
            out["phema_verdicts_csv"] = atomic_write_text(tables / "phema_verdicts.csv", best.to_csv(index=False))
    out["phema"] = atomic_write_text(tables / "phema.md", text)
    for run_name in sweep.run.unique():
        out[f"phema_{run_name}"] = plot_metric_vs_sigma_rel(
            results[results.run == run_name], sweep[sweep.run == run_name], plots / f"phema_{run_name}.png", run_name
        )
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
            line = {
                "comparison": f"{a} − {b}",
                "sampler": sampler,
                "metric": metric,
                "best σ_rel A": f"{best[a]:g}",
                "best σ_rel B": f"{best[b]:g}",
                "difference": diff,
                "low": diff - half,
                "high": diff + half,
                "seeds": n,
                "verdict": verdict_of(diff, half, a, b, lower_is_better(metric)) if n > 1 else "one seed",
            }
            held = {g: leave_one_seed_out(sub[sub.group == g], metric) for g in (a, b)}
            common = held[a].index.intersection(held[b].index)
            if len(common) > 1:
                hdiff, hhalf = paired_interval(held[a][common], held[b][common])
                line.update(
                    {
                        "held-out difference": hdiff,
                        "held-out low": hdiff - hhalf,
                        "held-out high": hdiff + hhalf,
                        "held-out seeds": len(common),
                        "held-out verdict": verdict_of(hdiff, hhalf, a, b, lower_is_better(metric)),
                    }
                )
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
