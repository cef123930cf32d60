"""The paper's tables with this project's numbers beside them: the wide table (ours [CI] | paper | Δ per NFE ×
metric), its Markdown / CSV / LaTeX files, every sampler's table and the formatting the other tables share."""

from pathlib import Path

import pandas as pd

from alphaflow import checkpoint as ckpt
from alphaflow.config import eval_protocol, phema_sigma_rel
from alphaflow.io import atomic_write_text
from alphaflow.report.collect import nfe_samplers, table_metrics
from alphaflow.stats import METRIC_LABELS, best_index

NOT_RUN = "not run"
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
            row = {
                "run": run_name,
                "paper row": paper.get("row", "–"),
                "weights": weights,
                "protocol": paper.get("protocol", SAME_PROTOCOL),
            }
            for nfe in (1, 2):
                for metric in metrics:
                    col = f"NFE{nfe} {METRIC_LABELS.get(metric, metric)}"
                    hit = results[
                        (results.run == run_name)
                        & (results.weights == weights)
                        & (results.sampler == samplers[nfe])
                        & (results.metric == metric)
                    ]
                    ours = hit.iloc[0] if len(hit) else None
                    # The paper evaluates EMA weights only (paper Table 1).
                    theirs = paper.get(f"{metric}_{nfe}nfe") if weights == "ema" else None
                    row[f"{col} ours"] = None if ours is None else float(ours.value)
                    row[f"{col} low"] = None if ours is None else float(ours.low)
                    row[f"{col} high"] = None if ours is None else float(ours.high)
                    row[f"{col} paper"] = theirs
                    row[f"{col} Δ"] = None if ours is None or theirs is None else float(ours.value) - theirs
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
            wide.loc[best_index(rows[col], metric), "weights"] += BEST
        break
    return wide


# ----------------------------------------------------------------------------
# Formatting and files


def fmt(x, digits=2):
    return "–" if x is None or (isinstance(x, float) and pd.isna(x)) else f"{x:.{digits}f}"


def interval_strings(df, prefix):
    """'+d [lo, hi]' per row from the columns <prefix>difference/low/high ('–' where missing)."""
    d, lo, hi = df[f"{prefix}difference"], df[f"{prefix}low"], df[f"{prefix}high"]
    return ["–" if pd.isna(x) else f"{x:+.2f} [{l:+.2f}, {h:+.2f}]" for x, l, h in zip(d, lo, hi)]


def display_table(wide):
    """The wide table with 'ours' as 'value [low, high]' (or 'not run'), ready for Markdown/LaTeX."""
    out = pd.DataFrame({"run": wide["run"], "paper row": wide["paper row"], "weights": wide["weights"]})
    if "protocol" in wide and (wide["protocol"] != SAME_PROTOCOL).any():  # rows not comparable like for like
        out["paper numbers' protocol"] = wide["protocol"]
    for col in [c[: -len(" ours")] for c in wide.columns if c.endswith(" ours")]:
        ours = [
            NOT_RUN if pd.isna(v) else f"{v:.2f} [{lo:.2f}, {hi:.2f}]"
            for v, lo, hi in zip(wide[f"{col} ours"], wide[f"{col} low"], wide[f"{col} high"])
        ]
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
    atomic_write_text(f"{base}.md", f"# {title}\n\n{markdown(shown)}")
    atomic_write_text(f"{base}.csv", wide.to_csv(index=False))
    atomic_write_text(f"{base}.tex", latex(shown))
    return shown


def samplers_table(results):
    if results.empty:
        return "no evaluation results yet\n"
    pivot = results.assign(
        cell=[f"{v:.2f} [{lo:.2f}, {hi:.2f}]" for v, lo, hi in zip(results.value, results.low, results.high)]
    )
    pivot = pivot.pivot_table(index=["run", "weights"], columns=["metric", "sampler"], values="cell", aggfunc="first")
    pivot.columns = [f"{METRIC_LABELS.get(m, m)} {s}" for m, s in pivot.columns]
    return markdown(pivot.reset_index().fillna("–"))


# ----------------------------------------------------------------------------
# Notes under the title


PROTOCOL_NOTES = {
    "alphaflow": "the official α-Flow evaluation: per-seed noise generators (seed mod 2³², the consistency "
    "sampler's fresh noise their next float64 draw), uint8 by truncation, real images through "
    "its float32 round trip",
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
            "source"
        )
        if source:
            notes += (
                f"\n\n{run_name}: weights imported from {Path(source['file']).name} "
                f"(sha256 {source['sha256'][:16]}), not trained here."
            )
    return notes
