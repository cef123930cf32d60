"""The report's inputs: every finished evaluation of the profile as one long table, the evaluations the
profile asks for, and which samplers fill the paper tables' 1- and 2-NFE columns."""

import json

import pandas as pd


def load_results(params):
    """Long-format DataFrame of every finished evaluation of the profile's runs."""
    rows = []
    for run_name in params.run_names:
        run = params.run(run_name)
        for path in sorted((params.run_dir(run_name) / "eval").glob("*/*.json")):
            record = json.loads(path.read_text())
            for metric, m in record["metrics"].items():
                rows.append(
                    {
                        "run": run_name,
                        "method": run.method,
                        "model": run.model,
                        "weights": record["weights"],
                        "sampler": record["sampler"],
                        "nfe": len(record["t_steps"]) - 1,
                        "mode": record["mode"],
                        "metric": metric,
                        "value": m["value"],
                        "low": m["low"],
                        "high": m["high"],
                        "n": m.get("n", record["num_samples"]),
                        "extractor": m.get("extractor", ""),
                        "labels": record.get("labels", ""),
                    }
                )
    columns = [
        "run",
        "method",
        "model",
        "weights",
        "sampler",
        "nfe",
        "mode",
        "metric",
        "value",
        "low",
        "high",
        "n",
        "extractor",
        "labels",
    ]
    return pd.DataFrame(rows, columns=columns)


def evaluation_files(params):
    """Every evaluation the profile asks for (Params.evaluation_cells), as eval JSON paths."""
    return [params.eval_file(*cell) for cell in params.evaluation_cells()]


# ----------------------------------------------------------------------------
# Samplers and label protocols


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
            by_nfe[2] = next(
                (
                    n
                    for n, s in params.samplers.items()
                    if sampler_labels(params, n) == labels and {k: s[k] for k in like} == like
                ),
                None,
            )
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
