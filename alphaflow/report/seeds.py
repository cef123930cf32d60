"""Seeds: the mean over training seeds with t-intervals, the verdicts of params `comparisons` (Welch and paired
by seed), and the pre-registered test of params `preregistered` (primary endpoint, secondary and post-hoc
contrasts, matched training time, power)."""

import numpy as np
import pandas as pd

from alphaflow.io import atomic_write_text
from alphaflow.jsonl import read_jsonl
from alphaflow.plots import plot_metric_vs_step_by_group, plot_primary_endpoint
from alphaflow.report.tables import fmt, interval_strings, markdown
from alphaflow.stats import (
    detectable_difference,
    lower_is_better,
    paired_interval,
    t_interval,
    verdict_of,
    welch_interval,
)


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
        rows.append(
            {
                "group": group,
                "weights": weights,
                "sampler": sampler,
                "metric": metric,
                "mean": mean,
                "low": mean - half,
                "high": mean + half,
                "seeds": len(sub),
                "per_seed": " ".join(f"{v:.2f}" for v in sub.sort_values("seed").value),
            }
        )
    return pd.DataFrame(rows)


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
            lower_better = lower_is_better(metric)
            diff, half = welch_interval(va, vb)
            line = {
                "comparison": f"{a} − {b}",
                "weights": weights,
                "sampler": sampler,
                "metric": metric,
                "difference": diff,
                "low": diff - half,
                "high": diff + half,
                "verdict": verdict_of(diff, half, a, b, lower_better),
            }
            common = va.index.intersection(vb.index)
            if len(common) >= 2:
                pdiff, phalf = paired_interval(va[common], vb[common])
                line.update(
                    paired_seeds=len(common),
                    paired_difference=pdiff,
                    paired_low=pdiff - phalf,
                    paired_high=pdiff + phalf,
                    paired_verdict=verdict_of(pdiff, phalf, a, b, lower_better),
                )
            lines.append(line)
    return pd.DataFrame(lines)


def seeds_report(params, results, tables, plots):
    grouped = with_groups(params, results)
    if grouped.empty:
        return {}
    table = seed_table(grouped)
    verdict = verdicts(params, grouped)
    out = {"seeds_csv": atomic_write_text(tables / "seeds_per_run.csv", grouped.to_csv(index=False))}
    shown = table.assign(
        **{
            "mean [95 % t-interval over seeds]": [
                f"{m:.2f} [{lo:.2f}, {hi:.2f}]" for m, lo, hi in zip(table["mean"], table["low"], table["high"])
            ]
        }
    )
    shown = shown[["group", "weights", "sampler", "metric", "mean [95 % t-interval over seeds]", "seeds", "per_seed"]]
    text = (
        f"# Mean over training seeds — {params.profile}\n\nIntervals are Student-t 95 % intervals over "
        f"training seeds (not bootstrap over samples).\n\n{markdown(shown)}"
    )
    if not verdict.empty:
        columns = ["comparison", "weights", "sampler", "metric", "A − B [95 % Welch interval]", "verdict"]
        verdict_shown = verdict.assign(**{"A − B [95 % Welch interval]": interval_strings(verdict, "")})
        if "paired_difference" in verdict:
            verdict_shown["paired by seed [95 % t-interval]"] = [
                x if x == "–" else f"{x} (n={int(n)})"
                for x, n in zip(interval_strings(verdict, "paired_"), verdict["paired_seeds"])
            ]
            verdict_shown["paired verdict"] = verdict["paired_verdict"].fillna("–")
            columns += ["paired by seed [95 % t-interval]", "paired verdict"]
        text += (
            '\n## Verdicts\n\nLower is better for FD/FID. "not separable" = the interval contains 0. '
            "Welch treats the two groups' seeds as independent samples. The paired interval uses that seed k "
            "gives both methods the same initial weights, data order and noise draws: it is the t-interval "
            "of the per-seed differences over the n seeds both groups ran.\n\n" + markdown(verdict_shown[columns])
        )
        out["verdicts_csv"] = atomic_write_text(tables / "verdicts.csv", verdict.to_csv(index=False))
    out["seeds"] = atomic_write_text(tables / "seeds.md", text)
    atomic_write_text(tables / "seeds.csv", table.to_csv(index=False))
    out.update(preregistered_report(params, grouped, tables, plots))
    for sampler in params.samplers:
        for weights in params.raw["eval"]["weights"]:
            key = f"fd_classifier_{sampler}_{weights}"
            out[f"steps_{key}"] = plot_metric_vs_step_by_group(params, key, plots / f"{key}_vs_step.png")
    return out


# ----------------------------------------------------------------------------
# The pre-registered test


def paired_values(grouped, spec):
    """(A, B): the two groups' values of spec's metric at its weights × sampler, indexed by the seeds both ran."""
    a, b = spec["contrast"]
    sub = grouped[
        (grouped.weights == spec["weights"]) & (grouped.sampler == spec["sampler"]) & (grouped.metric == spec["metric"])
    ]
    va, vb = (sub[sub.group == g].set_index("seed").value for g in (a, b))
    common = va.index.intersection(vb.index).sort_values()
    return va[common], vb[common]


def summarise_differences(d, spec, label, mean_b, level, power):
    """The contrast line of per-seed differences d = A − B: mean, t-interval, SD, detectable difference, verdict."""
    a, b = spec["contrast"]
    mean, half = t_interval(d, level)
    sd = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
    return {
        "contrast": label,
        "weights": spec["weights"],
        "sampler": spec["sampler"],
        "metric": spec["metric"],
        "seeds": len(d),
        "difference": mean,
        "low": mean - half,
        "high": mean + half,
        "sd": sd,
        "detectable": detectable_difference(sd, len(d), level, power),
        "mean_b": mean_b,
        "verdict": (
            verdict_of(mean, half, a, b, lower_is_better(spec["metric"]))
            if len(d) > 1
            else "not run yet"
            if len(d) == 0
            else "one seed: no interval"
        ),
        "per_seed": d,
    }


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


def preregistered_report(params, grouped, tables, plots):
    """The pre-registered test (params `preregistered`): primary endpoint, secondary contrasts, post-hoc
    checks of the primary contrast at the other weights × samplers, and the power statement."""
    spec = params.raw.get("preregistered")
    if not spec or grouped.empty:
        return {}
    level, power = spec.get("level", 0.95), spec.get("power", 0.8)
    primary = spec["primary"]
    rows = [("primary", primary)] + [("secondary", s) for s in spec.get("secondary", [])]
    rows += [
        ("post hoc", {**primary, "weights": w, "sampler": smp})
        for w in params.raw["eval"]["weights"]
        for smp in params.samplers
        if (w, smp) != (primary["weights"], primary["sampler"])
    ]

    def evaluate(s):
        if s.get("at") == "matched_time":
            return matched_time_endpoint(params, grouped, s, level, power)
        return endpoint(grouped, s, level, power)

    results = [{"role": role, **evaluate(s)} for role, s in rows]
    table = pd.DataFrame([{k: v for k, v in r.items() if k != "per_seed"} for r in results])
    first = results[0]
    per_seed = first["per_seed"].rename("difference").rename_axis("seed").reset_index()
    out = {
        "preregistered_csv": atomic_write_text(tables / "preregistered.csv", table.to_csv(index=False)),
        "primary_per_seed_csv": atomic_write_text(tables / "primary_per_seed.csv", per_seed.to_csv(index=False)),
    }
    shown = table.assign(
        **{
            f"A − B [{level:.0%} t-interval]": interval_strings(table, ""),
            "paired SD": [fmt(x) for x in table.sd],
            f"detectable with {power:.0%} power": [fmt(x) for x in table.detectable],
        }
    )
    shown = shown[
        [
            "role",
            "contrast",
            "weights",
            "sampler",
            "metric",
            "seeds",
            f"A − B [{level:.0%} t-interval]",
            "paired SD",
            f"detectable with {power:.0%} power",
            "verdict",
        ]
    ]
    rel = first["detectable"] / first["mean_b"] if first["mean_b"] else float("nan")
    statement = (
        f"With {first['seeds']} seeds and the measured paired SD of {fmt(first['sd'])}, this design detects a "
        f"true {first['contrast']} difference of {fmt(first['detectable'])} {first['metric']} "
        f"({rel:.1%} of the second arm's mean) with {power:.0%} power at the {1 - level:.0%} level "
        f"(two-sided paired t-test). Only the primary row is the test; the others are labelled."
    )
    text = (
        f"# Pre-registered test — {params.profile}\n\n{spec.get('statement', '').strip()}\n\n"
        f"**Primary endpoint**: {first['contrast']}, {first['metric']}, {first['weights']} weights, "
        f"{first['sampler']}, paired over seeds: {interval_strings(table.iloc[:1], '')[0]} → "
        f"**{first['verdict']}**.\n\n**Power**: {statement}\n\n{markdown(shown)}"
    )
    out["preregistered"] = atomic_write_text(tables / "preregistered.md", text)
    out["primary_endpoint"] = plot_primary_endpoint(
        *paired_values(grouped, primary), primary, plots / "primary_endpoint.png"
    )
    return out
