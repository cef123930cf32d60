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

The package: `collect` (the evaluations as one table) → `tables` (paper tables, formatting) → `seeds` (means over
seeds, verdicts, the pre-registered test) → `posthoc` (the σ_rel sweep); this module runs them. Below it:
`alphaflow.stats` (intervals, verdicts, power), `alphaflow.plots` (figures), `alphaflow.tracking` (MLflow) and
`alphaflow.io` (atomic writes).
"""

import json

from alphaflow.io import atomic_write_bytes, atomic_write_text, sha256_file
from alphaflow.plots import (
    group_sample_sheet,
    plot_all_training,
    plot_gradient_conflict,
    plot_metric_bars,
    plot_metric_vs_step,
    sample_sheet,
)
from alphaflow.report.collect import evaluation_files, load_results, other_labels
from alphaflow.report.posthoc import phema_report, sigma_sweep
from alphaflow.report.seeds import seeds_report
from alphaflow.report.tables import markdown, paper_table, provenance_notes, samplers_table, write_table
from alphaflow.tracking import log_to_mlflow, mlflow_metric_name


def write_complete_marker(params, tables):
    """complete.json: the evaluations the tables were built from, with their sha256. Only a report over every
    evaluation writes it, as its last file; the Snakemake report rule declares it, so a report run by hand on
    partial results leaves it missing and `snakemake all` still schedules the missing evaluations and this report."""
    digests = {str(p.relative_to(params.results)): sha256_file(p) for p in evaluation_files(params)}
    return atomic_write_text(
        tables / "complete.json", json.dumps({"profile": params.profile, "evaluations": digests}, indent=1) + "\n"
    )


def mlflow_runs(params, results):
    """The evaluations of every run with an MLflow run (its `mlflow_run_id` file), as tracking.log_to_mlflow
    takes them: metrics named `<metric>_<sampler>_<weights>` (as evaluate logs them) with `_ci_low`/`_ci_high`."""
    runs = []
    for run_name, rows in results.groupby("run"):
        run_dir = params.run_dir(run_name)
        if not (run_dir / "mlflow_run_id").exists():
            continue
        cells = []
        for (weights, sampler), cell in rows.groupby(["weights", "sampler"]):
            grid = run_dir / "samples" / weights / f"{sampler}.png"
            cells.append(
                {
                    "weights": weights,
                    "timestamp": params.eval_file(run_name, weights, sampler).stat().st_mtime,
                    "values": [
                        (mlflow_metric_name(r.metric, r.sampler, r.weights), r.value, r.low, r.high)
                        for r in cell.itertuples()
                    ],
                    "grid": grid if grid.exists() else None,
                }
            )
        runs.append(
            {
                "run": run_name,
                "run_id_file": run_dir / "mlflow_run_id",
                "step": params.run(run_name).steps,
                "cells": cells,
                "table": {c: rows[c].tolist() for c in rows.columns},
            }
        )
    return runs


def partial_banner(params, missing):
    cells = [str(p.relative_to(params.results)) for p in missing]
    more = f", … ({len(cells) - 3} more)" if len(cells) > 3 else ""
    return (
        f"**Partial: {len(cells)} of {len(evaluation_files(params))} evaluations are missing** "
        f"({', '.join(cells[:3])}{more}). `snakemake all` runs them and rewrites this report."
    )


def report(params, *, mlflow=True):
    """Writes tables and plots; returns {name: path}. Missing evaluations are allowed (interim tables), but the
    tables then say so and complete.json is absent."""
    tables = params.results / "tables" / params.profile
    plots = params.results / "plots" / params.profile
    (tables / "complete.json").unlink(missing_ok=True)
    missing = [p for p in evaluation_files(params) if not p.exists()]
    results = load_results(params)
    out = {"results": atomic_write_text(tables / "results.csv", results.to_csv(index=False))}
    title = f"Table 1 — {params.profile}: ours [95 % bootstrap CI] vs the paper (EMA rows)"
    if not sigma_sweep(results).empty:
        title += (
            "\n\n★ = the run's best post-hoc EMA σ_rel at 1 NFE (first metric with values), "
            "selected on the same samples (optimistic); phema.md has every σ_rel"
        )
    title += provenance_notes(params)
    shown = write_table(
        paper_table(params, results, "1"),
        tables / "table1",
        title + ("\n\n" + partial_banner(params, missing) if missing else ""),
    )
    out["table1"] = tables / "table1.md"
    for labels in other_labels(params):  # e.g. balanced labels: the paper's Table 6
        wide = paper_table(params, results, "1", labels)
        write_table(
            wide,
            tables / f"table1-{labels}",
            f"Table 1 with {labels} labels (the paper's Table 6) — "
            f"{params.profile}: ours [95 % bootstrap CI] vs the paper (EMA rows)" + provenance_notes(params),
        )
        out[f"table1-{labels}"] = tables / f"table1-{labels}.md"
    for table in ("2a", "2b"):
        wide = paper_table(params, results, table)
        if wide is not None:
            write_table(wide, tables / f"table{table}", f"Table {table} — {params.profile}")
            out[f"table{table}"] = tables / f"table{table}.md"
    out["samplers"] = atomic_write_text(
        tables / "samplers.md", f"# Every sampler — {params.profile}\n\n" + samplers_table(results)
    )
    out.update(seeds_report(params, results, tables, plots))
    out.update(phema_report(params, results, tables, plots))
    out["training"] = plot_all_training(params, plots / "training.png")
    out["gradient_conflict"] = plot_gradient_conflict(params, plots / "gradient_conflict.png")
    for metric in params.raw["eval"]["metrics"]:
        out[f"bars_{metric}"] = plot_metric_bars(results, metric, plots / f"{metric}.png")
        out[f"steps_{metric}"] = plot_metric_vs_step(params, results, metric, plots / f"{metric}_vs_step.png")
    for weights in params.raw["eval"]["weights"]:
        out[f"samples_by_group_{weights}"] = group_sample_sheet(
            params, weights, plots / f"samples_by_group_{weights}.png"
        )
    for run_name in params.run_names:
        out[f"samples_{run_name}"] = sample_sheet(params, run_name, plots / f"samples_{run_name}.png")
        curves = params.run_dir(run_name) / "plots" / "training.png"
        if curves.exists():
            atomic_write_bytes(plots / f"training_{run_name}.png", curves.read_bytes())
    if mlflow and not results.empty:
        out["mlflow"] = log_to_mlflow(
            params.tracking_uri(),
            params.profile,
            mlflow_runs(params, results),
            [params.run_dir(r) / "mlflow_run_id" for r in params.run_names],
            tables / "mlflow.md",
        )
    if missing:
        print(f"[alphaflow] warning: {partial_banner(params, missing)}")
    else:
        out["complete"] = write_complete_marker(params, tables)
    print(f"[alphaflow] report → {tables}, {plots}\n\n{markdown(shown)}")
    return {k: v for k, v in out.items() if v is not None}
