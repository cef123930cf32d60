"""Report aggregation over training seeds: t-intervals, Welch verdicts, per-seed CSV.

The evaluation JSONs here are written by the test with chosen values, so the expected intervals and
verdicts can be computed by hand; the real pipeline writes the same files (tests/test_evaluate.py).
"""

import json

import pandas as pd
import pytest
import yaml

from alphaflow.config import load_params
from alphaflow.report import report
from alphaflow.stats import paired_interval, t_interval, welch_interval
from helpers import tiny_params_dict


def seeded_runs(seeds):
    """α-Flow and MeanFlow runs, one per seed, grouped by method."""
    return {f"{m}-s{s}": {"method": m, "seed": s, "group": m} for m in ("alphaflow", "meanflow") for s in seeds}


def write_eval(params, run, weights, sampler, value):
    path = params.run_dir(run) / "eval" / weights / f"{sampler}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    t_steps = params.samplers[sampler]["t_steps"]
    path.write_text(
        json.dumps(
            {
                "run": run,
                "weights": weights,
                "sampler": sampler,
                "num_samples": 10,
                "t_steps": t_steps,
                "mode": "ode",
                "labels": "balanced",
                "metrics": {"fd_classifier": {"value": value, "low": value - 1, "high": value + 1, "n": 10}},
            }
        )
    )


@pytest.fixture
def seeded(tmp_path):
    d = tiny_params_dict(tmp_path / "results", tmp_path / "images")
    d["runs"] = seeded_runs((1, 2, 3))
    d["comparisons"] = [["alphaflow", "meanflow"]]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(d))
    return load_params(path)


def test_t_interval_and_welch_match_the_textbook():
    mean, half = t_interval([10.0, 12.0, 14.0])
    assert mean == 12.0 and half == pytest.approx(4.302653 * 2.0 / 3**0.5, rel=1e-5)  # t(0.975, 2) · s / √n
    diff, half = welch_interval([10.0, 12.0, 14.0], [20.0, 22.0, 24.0])
    assert diff == -10.0 and half == pytest.approx(2.776445 * (8 / 3) ** 0.5, rel=1e-5)  # equal variances: dof 4
    # Paired: differences −9, −10, −14 (mean −11, s = √7) → t(0.975, 2) · s / √3.
    diff, half = paired_interval(
        pd.Series([11.0, 12.0, 10.0], index=[1, 2, 3]), pd.Series([24.0, 20.0, 22.0], index=[3, 1, 2])
    )
    assert diff == pytest.approx(-11.0) and half == pytest.approx(4.302653 * 7**0.5 / 3**0.5, rel=1e-5)


def test_seed_table_and_verdicts(seeded):
    values = {"alphaflow": [10.0, 12.0, 14.0], "meanflow": [20.0, 22.0, 24.0]}
    for method, vals in values.items():
        for seed, v in zip((1, 2, 3), vals):
            write_eval(seeded, f"{method}-s{seed}", "ema", "1nfe", v)  # clearly separated
            write_eval(seeded, f"{method}-s{seed}", "raw", "1nfe", v if method == "alphaflow" else v - 9)  # overlapping
    out = report(seeded, mlflow=False)
    text = out["seeds"].read_text()
    assert "12.00 [7.03, 16.97]" in text  # mean [t-interval] of 10, 12, 14
    verdicts = pd.read_csv(out["verdicts_csv"]).set_index(["weights", "sampler"])
    assert verdicts.loc[("ema", "1nfe"), "verdict"] == "alphaflow better"
    assert verdicts.loc[("raw", "1nfe"), "verdict"] == "not separable"
    # Paired by seed: raw differences are −1, −1, −1 (every seed favours α-Flow by 1), which Welch cannot see.
    assert verdicts.loc[("raw", "1nfe"), "paired_difference"] == pytest.approx(-1.0)
    assert verdicts.loc[("raw", "1nfe"), "paired_verdict"] == "alphaflow better"
    assert "paired by seed [95 % t-interval]" in text and "-1.00 [-1.00, -1.00]" in text
    per_seed = out["seeds_csv"].read_text().splitlines()
    assert len(per_seed) == 1 + 6 * 2  # 6 runs × 2 weights


def test_group_sample_sheet_uses_each_groups_first_seed(seeded):
    import torch

    from alphaflow.images import save_grid
    from alphaflow.plots import group_sample_sheet

    out = seeded.run_dir("alphaflow-s1").parent.parent / "by_group.png"
    assert group_sample_sheet(seeded, "ema", out) is None  # nothing sampled yet: no figure
    for run in ("alphaflow-s1", "meanflow-s1"):
        for sampler in seeded.samplers:
            grid = seeded.run_dir(run) / "samples" / "ema" / f"{sampler}.png"
            grid.parent.mkdir(parents=True, exist_ok=True)
            save_grid(torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8), grid, nrow=8)
    assert group_sample_sheet(seeded, "ema", out) == out and out.stat().st_size > 1000


def test_curves_by_group_collect_every_seed_and_plot(seeded):
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    from alphaflow.plots import curves_by_group, gradient_conflict_figure, plot_gradient_conflict, save_figure

    keys = ("cos(TFM,TC)", "cos(FM',TC)", "cos(TFM,FM')")
    for method, sign in (("alphaflow", -1), ("meanflow", 1)):
        for seed in (1, 2, 3):
            path = seeded.run_dir(f"{method}-s{seed}") / "metrics.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = [{"step": 10, "alpha": 1.0}]  # a training record without the key is skipped
            lines += [
                {"step": k, **{key: sign * 0.1 * seed**2 * k * (i + 1) for i, key in enumerate(keys)}}
                for k in (250, 500)
            ]
            path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    curves = curves_by_group(seeded, "cos(TFM,TC)")
    assert sorted(curves) == ["alphaflow", "meanflow"] and len(curves["meanflow"]) == 3
    assert [c[500] for c in curves["alphaflow"]] == pytest.approx([-50.0, -200.0, -450.0])
    # The figure: one axes per cosine, per group the mean over seeds as a line and the min–max band over seeds.
    fig = gradient_conflict_figure(seeded)
    assert [ax.get_title() for ax in fig.axes] == ["cos ∇(TFM,TC)", "cos ∇(FM',TC)", "cos ∇(TFM,FM')"]
    for i, ax in enumerate(fig.axes):  # key i's values are (i + 1) × those of key 0
        lines = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
        assert sorted(lines) == ["alphaflow (n=3)", "meanflow (n=3)"]
        assert len(ax.collections) == 2
        for method, sign in (("alphaflow", -1), ("meanflow", 1)):
            line = lines[f"{method} (n=3)"]
            assert list(line.get_xdata()) == [250, 500]
            scale = sign * (i + 1)
            assert list(line.get_ydata()) == pytest.approx([scale * 350 / 3, scale * 700 / 3])  # mean, not median
            (band,) = [c for c in ax.collections if tuple(c.get_facecolor()[0][:3]) == to_rgb(line.get_color())]
            ys = {round(float(v), 9) for v in band.get_paths()[0].vertices[:, 1]}
            assert ys == {scale * 25.0, scale * 225.0, scale * 50.0, scale * 450.0}  # seeds 1, 3 at steps 250, 500
    plt.close(fig)
    out = seeded.run_dir("alphaflow-s1").parent.parent / "conflict.png"
    assert plot_gradient_conflict(seeded, out) == out
    reference = save_figure(gradient_conflict_figure(seeded), out.with_name("reference.png"))
    assert out.read_bytes() == reference.read_bytes()


def test_paired_interval_uses_the_seeds_both_groups_ran():
    from types import SimpleNamespace

    from alphaflow.report.seeds import verdicts

    rows = [("a", s, v) for s, v in zip((1, 2, 3), (10.0, 12.0, 11.0))]
    rows += [("b", s, v) for s, v in zip((1, 2, 3, 4, 5), (20.0, 21.0, 23.0, 99.0, 99.0))]
    grouped = pd.DataFrame(
        [
            {"group": g, "seed": s, "value": v, "weights": "ema", "sampler": "1nfe", "metric": "fd_classifier"}
            for g, s, v in rows
        ]
    )
    line = verdicts(SimpleNamespace(raw={"comparisons": [["a", "b"]]}), grouped).iloc[0]
    assert line.paired_seeds == 3
    assert line.paired_difference == pytest.approx(-31.0 / 3)  # −10, −9, −12 on seeds 1–3; seeds 4, 5 unpaired
    assert line.difference == pytest.approx(11.0 - 52.4)  # Welch keeps every seed


def test_detectable_difference_matches_the_power_of_a_paired_t_test():
    """At the returned difference, a noncentral-t computation gives the requested power."""
    from scipy import stats as st

    from alphaflow.stats import detectable_difference

    sd, n = 5.0, 8
    delta = detectable_difference(sd, n, level=0.95, power=0.8)
    crit = st.t.ppf(0.975, n - 1)
    power = 1 - st.nct.cdf(crit, n - 1, delta / (sd / n**0.5)) + st.nct.cdf(-crit, n - 1, delta / (sd / n**0.5))
    assert power == pytest.approx(0.8, abs=0.02)  # the usual (t + t) approximation of the exact power
    assert detectable_difference(sd, 1) != detectable_difference(sd, 1)  # NaN for one seed


def test_preregistered_report_states_the_primary_endpoint_and_power(tmp_path):
    d = tiny_params_dict(tmp_path / "results", tmp_path / "images")
    d["runs"] = seeded_runs(range(1, 5))
    d["runs"]["fm-s1"] = {"method": "fm", "seed": 1, "group": "fm"}  # an arm not evaluated yet
    d["preregistered"] = {
        "statement": "Declared before the run.",
        "primary": {
            "contrast": ["alphaflow", "meanflow"],
            "metric": "fd_classifier",
            "weights": "ema",
            "sampler": "1nfe",
        },
        "secondary": [
            {
                "contrast": ["alphaflow", "meanflow"],
                "metric": "fd_classifier",
                "weights": "ema",
                "sampler": "2nfe-cons-0.5",
            },
            {"contrast": ["meanflow", "fm"], "metric": "fd_classifier", "weights": "ema", "sampler": "1nfe"},
        ],
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(d))
    params = load_params(path)
    diffs = [-2.0, -4.0, -3.0, -5.0]  # α-Flow better on every seed: mean −3.5, SD √(5/3)
    for seed, dd in zip(range(1, 5), diffs):
        for weights in ("ema", "raw"):
            for sampler in ("1nfe", "2nfe-cons-0.5"):
                write_eval(params, f"meanflow-s{seed}", weights, sampler, 50.0 + seed)
                value = 50.0 + seed + (dd if sampler == "1nfe" else 1.0)
                write_eval(params, f"alphaflow-s{seed}", weights, sampler, value)
    out = report(params, mlflow=False)
    table = pd.read_csv(out["preregistered_csv"])
    assert list(table.role) == ["primary", "secondary", "secondary", "post hoc", "post hoc", "post hoc"]
    primary = table.iloc[0]
    sd = pd.Series(diffs).std()
    assert primary.difference == pytest.approx(-3.5) and primary.sd == pytest.approx(sd)
    assert primary.high < 0 and primary.verdict == "alphaflow better"
    assert primary.detectable == pytest.approx((3.182446 + 0.978472) * sd / 2, rel=1e-4)  # t(.975,3) + t(.8,3)
    assert table.iloc[1].verdict == "meanflow better"  # +1 on every seed at 2-NFE
    assert table.iloc[2].seeds == 0 and table.iloc[2].verdict == "not run yet"  # never "not separable" without data
    text = out["preregistered"].read_text()
    assert "Declared before the run." in text and "**Primary endpoint**" in text and "80% power" in text
    assert pd.read_csv(out["primary_per_seed_csv"]).difference.tolist() == diffs
    assert out["primary_endpoint"].exists()


def test_matched_time_contrast_interpolates_the_slower_arm(tmp_path):
    """A (cheap steps) is compared at its last in-training evaluation with B at the same training seconds."""
    from alphaflow.report.seeds import matched_time_endpoint, training_seconds, with_groups

    d = tiny_params_dict(tmp_path / "results", tmp_path / "images")
    d["runs"] = seeded_runs((1, 2, 3))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(d))
    params = load_params(path)
    batch = params.run("alphaflow-s1").batch_size
    key = "fd_classifier_1nfe_ema"
    for seed in (1, 2, 3):
        for method, img_s, offset in (("alphaflow", 2 * batch, 0.0), ("meanflow", batch, 1.0 * seed)):
            # Steps 0–10 logged every 5 steps at img_s images/s; metric falls linearly with step.
            lines = []
            for step in (5, 10):
                lines.append({"step": step, "images_per_s": img_s, "loss": 1.0})
                lines.append({"step": step, key: 100.0 - step + offset})
            run_dir = params.run_dir(f"{method}-s{seed}")
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
            write_eval(params, f"{method}-s{seed}", "ema", "1nfe", 1.0)
    assert training_seconds([{"step": 5, "images_per_s": 2 * batch}, {"step": 10, "images_per_s": batch}], batch) == {
        5: 2.5,
        10: 7.5,
    }
    grouped = with_groups(params, report_results(params))
    spec = {
        "contrast": ["alphaflow", "meanflow"],
        "metric": "fd_classifier",
        "weights": "ema",
        "sampler": "1nfe",
        "at": "matched_time",
    }
    line = matched_time_endpoint(params, grouped, spec)
    # α-Flow: 10 steps in 5 s, value 90. MeanFlow reaches 5 s at step 5: value 95 + seed. Differences −6, −7, −8.
    assert line["per_seed"].tolist() == pytest.approx([-6.0, -7.0, -8.0])
    assert line["difference"] == pytest.approx(-7.0) and line["verdict"] == "alphaflow better"


def report_results(params):
    from alphaflow.report.collect import load_results

    return load_results(params)


def test_a_report_on_partial_results_says_so_and_leaves_no_complete_marker(seeded):
    """A report run by hand before every evaluation exists must not look finished: the table says which
    evaluations are missing and complete.json (the Snakemake report rule's marker output) is absent, so
    `snakemake all` still schedules the missing evaluations (tests/test_declarative.py runs that for real)."""
    weights, samplers = seeded.raw["eval"]["weights"], list(seeded.samplers)
    cells = [(r, w, s) for r in seeded.run_names for w in weights for s in samplers]
    for i, cell in enumerate(cells[:-1]):
        write_eval(seeded, *cell, 80.0 + i)
    tables = seeded.results / "tables" / seeded.profile
    report(seeded, mlflow=False)
    table = (tables / "table1.md").read_text()
    assert f"Partial: 1 of {len(cells)} evaluations are missing" in table
    assert "/".join(cells[-1][:2]) in table.replace("/eval/", "/")
    assert not (tables / "complete.json").exists()

    write_eval(seeded, *cells[-1], 99.0)
    report(seeded, mlflow=False)
    assert "Partial" not in (tables / "table1.md").read_text()
    marker = json.loads((tables / "complete.json").read_text())
    assert len(marker["evaluations"]) == len(cells)

    (seeded.run_dir(cells[0][0]) / "eval" / cells[0][1] / f"{cells[0][2]}.json").unlink()
    report(seeded, mlflow=False)  # a later partial report removes the marker of the earlier complete one
    assert not (tables / "complete.json").exists()


def test_best_ema_verdicts_compare_each_group_at_its_own_best_sigma_rel(tmp_path):
    """α-Flow is best at σ_rel 0.15, MeanFlow at 0.05; the verdict pairs those per seed."""
    d = tiny_params_dict(tmp_path / "results", tmp_path / "images", phema_every=2)
    d["runs"] = seeded_runs((1, 2, 3))
    d["comparisons"] = [["alphaflow", "meanflow"]]
    d["eval"]["weights"] = ["ema", "phema-0.05", "phema-0.15"]
    d["eval"]["phema_samplers"] = ["1nfe"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(d))
    params = load_params(path)
    values = {
        "alphaflow": {"ema": (88, 89, 90), "phema-0.05": (90, 91, 92), "phema-0.15": (80, 81, 83)},
        "meanflow": {"ema": (86, 87, 88), "phema-0.05": (85, 85, 86), "phema-0.15": (95, 96, 97)},
    }
    for method, by_weights in values.items():
        for weights, per_seed in by_weights.items():
            for seed, v in zip((1, 2, 3), per_seed):
                write_eval(params, f"{method}-s{seed}", weights, "1nfe", float(v))
                if weights == "ema":
                    write_eval(params, f"{method}-s{seed}", weights, "2nfe-cons-0.5", float(v))
    out = report(params, mlflow=False)
    assert (params.results / "tables" / "test" / "complete.json").exists()  # phema cells: 1nfe only
    line = pd.read_csv(out["phema_verdicts_csv"]).iloc[0]
    assert (line["best σ_rel A"], line["best σ_rel B"]) == (0.15, 0.05)
    assert line["difference"] == pytest.approx(-4.0) and line["seeds"] == 3
    assert line["high"] == pytest.approx(-4.0 + 4.302653 / 3**0.5, rel=1e-5) and line["verdict"] == "alphaflow better"
    # Held out: every seed's σ_rel is chosen on the other two seeds (here the same σ for all), same difference.
    assert line["held-out difference"] == pytest.approx(-4.0) and line["held-out seeds"] == 3
    text = out["phema"].read_text()
    assert "Verdicts at each group's best σ_rel" in text and "| alphaflow | 1nfe | FD_clf |" in text
    assert "Verdicts with σ_rel held out" in text


def test_leave_one_seed_out_scores_each_seed_at_the_others_best_sigma_rel():
    """σ_rel 0.05 is best on the mean (83.3 vs 85) only because seed 1 is lucky there; seed 1 held out picks
    0.15 from seeds 2 and 3, and seeds 2, 3 pick 0.05 from the mean that includes seed 1."""
    from alphaflow.report.posthoc import leave_one_seed_out

    rows = pd.DataFrame(
        {
            "seed": [1, 2, 3, 1, 2, 3],
            "sigma_rel": [0.05] * 3 + [0.15] * 3,
            "value": [70.0, 90.0, 90.0, 85.0, 85.0, 85.0],
        }
    )
    assert leave_one_seed_out(rows, "fd_classifier").to_dict() == {1: 85.0, 2: 90.0, 3: 90.0}
    assert leave_one_seed_out(rows, "is_classifier").to_dict() == {1: 70.0, 2: 85.0, 3: 85.0}  # higher is better
    assert leave_one_seed_out(rows[rows.seed == 1], "fd_classifier").empty
