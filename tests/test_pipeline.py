"""The declarative pipeline: Snakemake plans, DVC ↔ Snakemake consistency, end-to-end DAG runs.

Fast tests dry-run the real Snakefile and dvc.yaml; slow ones (-m slow) run the tiny profile through
`snakemake` and through `dvc repro` in a temporary git repository, for real.
"""

import base64
import csv
import json
import re
import shutil
import sys

import pytest
import yaml

from helpers import ROOT, tiny_params_dict
from helpers import BIN, changed_stages, job_counts, run


def snakemake_commands(*args, cwd=ROOT, env=None):
    """The `alphaflow ...` shell commands of a forced dry run, without the log redirection."""
    out = run([BIN / "snakemake", "-n", "-p", "--forceall", *args], cwd=cwd, env=env).stdout
    cmds = set()
    for line in out.splitlines():
        if line.startswith("Shell command: "):
            cmd = re.sub(r"\s*>\s*\S+\s+2>&1$", "", line[len("Shell command: ") :])
            cmd = re.sub(r"^OMP_NUM_THREADS=\d+\s+", "", cmd)
            if cmd != "None":
                cmds.add(" ".join(cmd.split()))
    return out, cmds


# ----------------------------------------------------------------------------
# Plans (fast)


def test_demo_plan_covers_every_run_weights_sampler():
    # The demo's eval.jobs run: one sample_evaluate job per run writes all 6 of its cells.
    out, cmds = snakemake_commands("all")
    counts = job_counts(out)
    assert counts["train"] == 4 and counts["sample_evaluate"] == 4 and counts["report"] == 1
    assert "sample" not in counts and "evaluate" not in counts
    assert "alphaflow sample-evaluate --params params/default.yaml --quiet --run meanflow-N-4" in cmds
    assert "alphaflow train --params params/default.yaml --quiet --run meanflow-N-4" in cmds
    # The same DAG per cell: 4 runs × ({ema, raw} × 2 samplers + 2 post-hoc EMA sets × the 1-NFE sampler)
    out, cmds = snakemake_commands("all", "--config", "set=[eval.jobs=cell]")
    counts = job_counts(out)
    assert counts["train"] == 4 and counts["sample"] == 24 and counts["evaluate"] == 24 and counts["report"] == 1
    one = "alphaflow sample --params params/default.yaml --set eval.jobs=cell --quiet --run alphaflow-T-4"
    assert f"{one} --weights phema-0.15 --sampler 1nfe" in cmds
    assert not any("phema" in c and "2nfe" in c for c in cmds)


def test_slurm_profile_plans_every_paper_run_through_the_launcher():
    out, cmds = snakemake_commands("--profile", "slurm", "all")
    counts = job_counts(out)
    # 12 training runs × {ema, raw} × 4 samplers, the report.
    assert counts["train"] == 12 and counts["sample"] == 96 and counts["evaluate"] == 96 and counts["report"] == 1
    train = [c for c in cmds if "--stage train" in c]
    assert len(train) == 12 and all("--executor slurm" in c for c in train)
    assert any("--run alphaflow-XL-2-plus-cfg" in c for c in train)
    sample = [c for c in cmds if "--stage sample" in c]
    assert all("--array-parts 8" in c for c in sample)
    report = [c for c in cmds if c.startswith("alphaflow report")]
    assert report and "launch" not in report[0]  # CPU rule runs locally


def test_the_workflow_profile_applies_from_the_repository_root():
    """profiles/default/ (beside the Snakefile) sets rerun-incomplete and the re-run triggers for plain runs
    and for `--profile slurm` alike; it must not set `cores` or `config`, which would override the slurm
    profile's (a workflow profile wins key by key)."""
    plain = run([BIN / "snakemake", "-n", "all"])
    assert "Using workflow specific profile profiles/default" in plain.stdout + plain.stderr
    both = run([BIN / "snakemake", "-n", "--profile", "slurm", "all"])
    assert "Using profiles slurm and workflow specific profile profiles/default" in both.stdout + both.stderr
    default = yaml.safe_load((ROOT / "profiles" / "default" / "config.yaml").read_text())
    assert default["rerun-incomplete"] is True and "code" not in default["rerun-triggers"]
    assert not {"cores", "config", "executor"} & set(default)


def test_fine_tune_waits_for_its_source_run():
    target = "results/paper/runs/alphaflow-XL-2-plus-cfg/checkpoints/final/state.json"
    out = run([BIN / "snakemake", "-n", "--forceall", target, "--config", "params=params/paper.yaml"]).stdout
    assert job_counts(out)["train"] == 2


def test_bad_params_fail_before_anything_runs(tmp_path):
    bad = yaml.safe_load((ROOT / "params/default.yaml").read_text())
    bad["defaults"]["fm_ratio"] = 1.5
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = run([BIN / "snakemake", "-n", "all", "--config", f"params={path}"], check=False)
    assert proc.returncode != 0
    assert "defaults.fm_ratio" in proc.stdout + proc.stderr and "1.5" in proc.stdout + proc.stderr


def dvc_stages(dvcfile="dvc.yaml", cwd=ROOT):
    """[(stage name, cmd, outs + metrics)] of every stage of one dvc.yaml, through DVC's own parser."""
    code = (
        "import json, sys; from dvc.repo import Repo; r = Repo('.'); print(json.dumps([(s.name, s.cmd, "
        "[str(o.def_path) if s.wdir == r.root_dir else __import__('os').path.relpath(__import__('os').path.join("
        "s.wdir, str(o.def_path)), r.root_dir) for o in s.outs]) for s in r.index.stages "
        "if __import__('os').path.relpath(s.dvcfile.path, r.root_dir) == sys.argv[1]]))"
    )
    return json.loads(run([sys.executable, "-c", code, dvcfile], cwd=cwd).stdout)


PROFILES = ["default", "small", "small-gpu", "decisive", "paper", "released"]


def released_placeholders(params_file, folder):
    """{ALPHAFLOW_RELEASED: folder} holding an empty file per released checkpoint the profile names: a dry run
    only checks that its inputs exist."""
    raw = yaml.safe_load((ROOT / params_file).read_text())
    for run_cfg in raw["runs"].values():
        if run_cfg.get("checkpoint"):
            (folder / run_cfg["checkpoint"]).touch()
    return {"ALPHAFLOW_RELEASED": str(folder)}


@pytest.mark.parametrize("profile", PROFILES)
def test_each_profiles_dvc_pipeline_is_current_and_declares_snakemakes_stages_and_outputs(profile, tmp_path):
    """`dvc repro dvc.yaml` (demo) or `dvc repro pipelines/<profile>/dvc.yaml`: no file edits. The committed file
    is what `alphaflow dvc-pipeline` writes now, its commands are exactly Snakemake's (executor none: the params'
    executor key routes GPU stages inside `alphaflow`), every Snakemake output lies inside an output of the DVC
    stage of the same rule, and every params key it names exists (DVC refuses missing ones)."""
    from alphaflow.dvc_pipeline import pipeline_path

    params_file = f"params/{profile}.yaml"
    run([BIN / "alphaflow", "dvc-pipeline", "--params", params_file, "--check"])
    dvcfile = str(pipeline_path(params_file))
    env = released_placeholders(params_file, tmp_path)
    _, smk_cmds = snakemake_commands("all", "--config", f"params={params_file}", "executor=none", env=env)
    stages = dvc_stages(dvcfile)
    assert {" ".join(cmd.split()) for _, cmd, _ in stages} == smk_cmds
    outs = {}
    for name, _, paths in stages:
        outs.setdefault(name.split("-")[0], []).extend(paths)
    summary = run(
        [
            BIN / "snakemake",
            "-n",
            "--forceall",
            "--detailed-summary",
            "all",
            "--config",
            f"params={params_file}",
            "executor=none",
        ],
        env=env,
    ).stdout
    checked = 0
    for line in summary.splitlines():
        cols = line.split("\t")
        if len(cols) < 3 or not cols[0].startswith("results/"):
            continue
        path, rule = cols[0], cols[2]
        assert any(path == o or path.startswith(o.rstrip("/") + "/") for o in outs[rule]), (rule, path)
        checked += 1
    assert checked >= len(stages)
    code = (
        "import json, sys; from dvc.repo import Repo; r = Repo('.'); print(json.dumps(sorted({k for s in "
        "r.index.stages if __import__('os').path.relpath(s.dvcfile.path, r.root_dir) == sys.argv[1] "
        "for d in s.deps "
        "if type(d).__name__ == 'ParamsDependency' for k in d.params})))"
    )
    profile_raw = yaml.safe_load((ROOT / params_file).read_text())
    for key in json.loads(run([sys.executable, "-c", code, dvcfile]).stdout):
        if key == params_file:
            continue  # the report watches the whole file
        node = profile_raw
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, (
                f"{dvcfile} names params key {key!r}, missing in {params_file}"
            )
            node = node[part]


def test_the_demo_pipeline_has_the_demo_cells():
    stages = dvc_stages()
    assert sum(name.startswith("train-") for name, _, _ in stages) == 4
    # one sample_evaluate stage per run (eval.jobs run), each with its ema, raw × 2 samplers and the two post-hoc
    # EMA sets at 1 NFE (eval.phema_samplers): 6 sample folders and 6 evaluations
    joint = {name: paths for name, _, paths in stages if name.startswith("sample_evaluate-")}
    assert len(joint) == 4 and not any(name.startswith(("sample-", "evaluate-")) for name, _, _ in stages)
    demo = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in joint:
        evals = [next(iter(m)) for m in demo[name]["metrics"]]
        assert len(evals) == 2 * 2 + 2 and sum("phema" in e for e in evals) == 2
        assert len(demo[name]["outs"]) == 6
    small = dvc_stages("pipelines/small/dvc.yaml")
    assert sum(name.startswith("train-") for name, _, _ in small) == 13  # 3 methods × 3 seeds + 2 × 2 ablation


# ----------------------------------------------------------------------------
# The DAG for real (slow)


def tiny_profile(path, images, results="results", **defaults):
    d = tiny_params_dict(results, images, **defaults)
    d["eval"]["weights"] = ["ema", "raw"]
    # Every params key dvc.yaml names must exist (DVC refuses missing params).
    d["eval"].update(
        {
            "fid_samples": None,
            "fid_ref_samples": None,
            "slow_metric_weights": None,
            "inception": "inception-fid-ts",
            "parts": 1,
        }
    )
    d["paper_results"] = {}
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return d


@pytest.fixture(scope="module")
def tiny_dag(tmp_path_factory):
    """(snakemake command line, its working directory) after the tiny profile's DAG ran there once."""
    from helpers import write_class_folder

    base = tmp_path_factory.mktemp("dag")
    write_class_folder(base / "images")
    params = base / "params.yaml"
    tiny_profile(params, base / "images", results=str(base / "results"))
    args = [
        BIN / "snakemake",
        "all",
        "-s",
        ROOT / "Snakefile",
        "--directory",
        base,
        "--cores",
        "2",
        "--config",
        f"params={params}",
    ]
    run(args)
    return args, base


@pytest.mark.slow
def test_snakemake_runs_the_tiny_dag_end_to_end_and_then_has_nothing_to_do(tiny_dag):
    args, tmp_path = tiny_dag
    tables = tmp_path / "results" / "tables" / "test"
    table = (tables / "table1.md").read_text()
    for run_name in ("alphaflow-tiny", "meanflow-tiny"):
        assert run_name in table
    rows = (tables / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * 2  # header + runs × weights × samplers (one metric)
    assert (tmp_path / "results" / "plots" / "test" / "training.png").exists()
    again = run([*args[:2], "-n", *args[2:]]).stdout
    assert "Nothing to be done" in again


def cell_outputs(results):
    """{cell: (sample chunk sha256s, metric values)} of every evaluated cell under a results folder."""
    out = {}
    for ev in sorted(results.glob("runs/*/eval/*/*.json")):
        run_dir, weights, sampler = ev.parents[2], ev.parent.name, ev.stem
        done = json.loads((run_dir / "samples" / weights / sampler / "done.json").read_text())
        out[f"{run_dir.name}/{weights}/{sampler}"] = (
            [c["sha256"] for c in done["chunks"]],
            json.loads(ev.read_text())["metrics"],
        )
    return out


@pytest.mark.slow
def test_one_job_per_run_writes_what_the_per_cell_jobs_write_and_redoes_only_a_changed_cell(tiny_dag, tmp_path):
    """eval.jobs run on the tiny profile: 2 sample_evaluate jobs instead of 8 sample and 8 evaluate jobs, the same
    samples and metrics as the per-cell DAG (tiny_dag), nothing to do on a second call, and after a sampler's
    t_steps change the run's job redoes that sampler's cells only (the others' samples and metrics are kept)."""
    args, cell_base = tiny_dag
    params = tmp_path / "params.yaml"
    d = tiny_profile(params, cell_base / "images", results=str(tmp_path / "results"))
    d["eval"]["jobs"] = "run"
    params.write_text(yaml.safe_dump(d, sort_keys=False))
    cmd = [
        args[0],
        "all",
        "-s",
        ROOT / "Snakefile",
        "--directory",
        tmp_path,
        "--cores",
        "2",
        "--config",
        f"params={params}",
    ]
    proc = run(cmd)
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["sample_evaluate"] == 2 and "sample" not in counts and "evaluate" not in counts
    assert cell_outputs(tmp_path / "results") == cell_outputs(cell_base / "results")
    assert "Nothing to be done" in run([*cmd[:2], "-n", *cmd[2:]]).stdout

    # Snakemake touches a job's outputs: what was redone shows in the contents (each record's "seconds")
    runs = tmp_path / "results" / "runs"
    files = lambda: {
        f: f.read_bytes() for f in [*runs.glob("*/eval/*/*.json"), *runs.glob("*/samples/*/*/chunks-*/part-*.json")]
    }
    before, outputs = files(), cell_outputs(tmp_path / "results")
    changed = d["eval"]["samplers"][1]["name"]
    d["eval"]["samplers"][1]["t_steps"] = [1.0, 0.4, 0.0]
    params.write_text(yaml.safe_dump(d, sort_keys=False))
    proc = run(cmd)
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["sample_evaluate"] == 2 and counts["report"] == 1
    after, new = files(), cell_outputs(tmp_path / "results")
    rewritten = {str(f.relative_to(runs)) for f in before if after.get(f) != before[f]}
    assert rewritten and all(f"/{changed}" in f for f in rewritten), rewritten  # eval/W/S.json, samples/W/S/…
    assert {c for c in new if new[c] != outputs[c]} == {c for c in new if c.endswith(f"/{changed}")}


# Snakemake's report is one page whose app shows a result after clicks: this script clicks menu entries by their
# text, then the view (eye) or info button in the row of one result, as a user would.
CLICKS = """
function byText(text) {
  return [...document.querySelectorAll("#app *")]
    .find(el => el.children.length === 0 && el.textContent.trim() === text);
}
function click(step) {
  if (typeof step === "string") return byText(step).click();
  const buttons = byText(step[0]).closest("tr").querySelectorAll("a, button");
  buttons[step[1] === "view" ? 0 : buttons.length - 1].click();
}
STEPS.reduce((after, step) => after.then(() => new Promise(done => setTimeout(() => { click(step); done(); }, 500))),
             Promise.resolve());
"""


def report_view(report, steps, out_png):
    """(visible text, DOM) of Snakemake's report after clicking `steps` in headless Chromium; screenshot to out_png."""
    from helpers import browser, visible_text

    page = report.read_text()
    at = page.rindex("</body>")
    clicked = out_png.with_suffix(".html")
    clicked.write_text(f"{page[:at]}<script>const STEPS = {json.dumps(steps)};\n{CLICKS}</script>{page[at:]}")
    dom = browser(clicked.as_uri(), out_png)
    return visible_text(dom), dom


def shown_image(dom, png_name):
    """The bytes of the <img> the report's content pane shows for `png_name` (a data URI)."""
    m = re.search(rf'<img src="data:image/png;charset=utf8;filename={re.escape(png_name)};base64,([^"]+)"', dom)
    assert m, f"{png_name} is not shown"
    return base64.b64decode(m[1])


def not_blank(png, left):
    """The screenshot right of the menu (x ≥ left) holds a picture: many colours, not one background."""
    from PIL import Image

    with Image.open(png) as img:
        pane = img.convert("RGB").crop((left, 0, img.width, img.height))
        return len(pane.getcolors(maxcolors=1 << 20) or []) > 50


@pytest.mark.slow
def test_snakemakes_report_shows_table1_plots_and_sample_sheets_in_a_browser(tiny_dag):
    """`snakemake --report report.html` after the tiny DAG, opened in headless Chromium: Table 1 with its caption and
    numbers, a plot and a run's sample sheet (each the PNG the report stage wrote, on screen), with captions."""
    from helpers import need_chromium

    args, base = tiny_dag
    report = base / "report.html"
    run([*args, "--report", report])
    need_chromium()
    plots, table1 = base / "results" / "plots" / "test", base / "results" / "tables" / "test" / "table1.csv"

    text, _ = report_view(report, ["Tables", ["Table 1", "info"]], base / "table1.png")
    assert "Table 1 in the paper's shape" in text
    header, *rows = csv.reader(table1.read_text().splitlines())
    assert len(rows) == 4 and "NFE1 FD_clf ours" in header  # 2 runs × {ema, raw}
    ours = header.index("NFE1 FD_clf ours")
    assert all(" ".join(row[: ours + 1]) in text for row in rows), text[:3000]  # run, …, its 1-NFE FD_clf

    text, dom = report_view(report, ["Plots", "Figures", ["training", "view"]], base / "training.png")
    assert "training_alphaflow-tiny" in text and "samples_alphaflow-tiny" not in text  # sheets have their own list
    assert shown_image(dom, "training.png") == (plots / "training.png").read_bytes()
    assert not_blank(base / "training.png", left=600)

    text, dom = report_view(report, ["Plots", "Sample sheets", ["samples_alphaflow-tiny", "view"]], base / "sheet.png")
    assert "samples_meanflow-tiny" in text
    assert shown_image(dom, "samples_alphaflow-tiny.png") == (plots / "samples_alphaflow-tiny.png").read_bytes()
    assert not_blank(base / "sheet.png", left=600)
    text, _ = report_view(report, ["Plots", "Sample sheets", ["samples_alphaflow-tiny", "info"]], base / "info.png")
    assert "Sample sheet of run alphaflow-tiny" in text


@pytest.mark.slow
def test_dvc_repro_runs_the_same_dag_in_a_git_repo(tiny_latents, tmp_path):
    from helpers import write_class_folder

    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ("alphaflow", "workflow"):
        shutil.copytree(ROOT / item, repo / item)
    write_class_folder(repo / "images")
    (repo / "params").mkdir()
    tiny_profile(repo / "params" / "default.yaml", repo / "images")
    run([BIN / "alphaflow", "dvc-pipeline", "--params", "params/default.yaml"], cwd=repo)
    for cmd in (["git", "init", "-q"], [BIN / "dvc", "init", "-q"]):
        run(cmd, cwd=repo)
    run(["git", "add", "-A"], cwd=repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"], cwd=repo)
    first = run([BIN / "dvc", "repro"], cwd=repo).stdout
    assert "Running stage 'report'" in first
    assert (repo / "results" / "tables" / "test" / "table1.md").exists()
    second = run([BIN / "dvc", "repro"], cwd=repo).stdout
    assert "Data and pipelines are up to date" in second
    metrics = run([BIN / "dvc", "metrics", "show"], cwd=repo).stdout
    assert "fd_classifier.value" in metrics
    # A metric-only params change invalidates the evaluate stages (and the report, which watches the whole
    # params file) and nothing upstream.
    d = yaml.safe_load((repo / "params" / "default.yaml").read_text())
    d["eval"]["n_boot"] = 7
    (repo / "params" / "default.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    assert changed_stages(repo) == {
        f"evaluate-{r}-{w}-{s}"
        for r in ("alphaflow-tiny", "meanflow-tiny")
        for w in ("ema", "raw")
        for s in ("1nfe", "2nfe-cons-0.5")
    } | {"report"}
    # A key no stage reads (where MLflow is) invalidates nothing but the report, which watches the whole file;
    # the seed (latent statistics, classifier, bootstrap) invalidates encode, and nothing upstream of it.
    d["eval"]["n_boot"] = 20
    d["tracking_uri"] = "sqlite:///elsewhere.db"
    (repo / "params" / "default.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    assert changed_stages(repo) == {"report"}
    d["seed"] = 1
    (repo / "params" / "default.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    changed = changed_stages(repo)
    assert "encode" in changed and not any(s.startswith(("prepare", "reference", "train")) for s in changed)
