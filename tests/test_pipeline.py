"""The declarative pipeline: Snakemake plans, DVC ↔ Snakemake consistency, end-to-end DAG runs.

Fast tests dry-run the real Snakefile and dvc.yaml; slow ones (-m slow) run the tiny profile through
`snakemake` and through `dvc repro` in a temporary git repository, for real.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_params_dict

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def run(cmd, cwd=ROOT, check=True, timeout=1200):
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def job_counts(output):
    """{rule: count} from Snakemake's 'Job stats' table."""
    block = output.split("Job stats:", 1)[1]
    counts = {}
    for line in block.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def snakemake_commands(*args, cwd=ROOT):
    """The `alphaflow ...` shell commands of a forced dry run, without the log redirection."""
    out = run([BIN / "snakemake", "-n", "-p", "--forceall", *args], cwd=cwd).stdout
    cmds = set()
    for line in out.splitlines():
        if line.startswith("Shell command: "):
            cmd = re.sub(r"\s*>\s*\S+\s+2>&1$", "", line[len("Shell command: "):])
            cmd = re.sub(r"^OMP_NUM_THREADS=\d+\s+", "", cmd)
            if cmd != "None":
                cmds.add(" ".join(cmd.split()))
    return out, cmds


#----------------------------------------------------------------------------
# Plans (fast)


def test_demo_plan_covers_every_run_weights_sampler():
    out, cmds = snakemake_commands("all")
    counts = job_counts(out)
    assert counts["train"] == 4 and counts["sample"] == 16 and counts["evaluate"] == 16 and counts["report"] == 1
    assert "alphaflow train --params params/default.yaml --quiet --run meanflow-N-4" in cmds


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
    out = run([BIN / "snakemake", "-n", "--forceall", "results/runs/alphaflow-XL-2-plus-cfg/checkpoints/final/state.json",
               "--config", "params=params/paper.yaml"]).stdout
    assert job_counts(out)["train"] == 2


def test_bad_params_fail_before_anything_runs(tmp_path):
    bad = yaml.safe_load((ROOT / "params/default.yaml").read_text())
    bad["defaults"]["fm_ratio"] = 1.5
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = run([BIN / "snakemake", "-n", "all", "--config", f"params={path}"], check=False)
    assert proc.returncode != 0
    assert "defaults.fm_ratio" in proc.stdout + proc.stderr and "1.5" in proc.stdout + proc.stderr


def dvc_stages(cwd=ROOT):
    """[(stage name, cmd, outs + metrics)] of every stage in dvc.yaml, through DVC's own parser."""
    code = ("import json; from dvc.repo import Repo; r = Repo('.'); "
            "print(json.dumps([(s.addressing, s.cmd, [str(o.def_path) for o in s.outs]) for s in r.index.stages]))")
    return json.loads(run([sys.executable, "-c", code], cwd=cwd).stdout)


def test_dvc_and_snakemake_declare_the_same_stages_and_outputs():
    _, smk_cmds = snakemake_commands("all")
    stages = dvc_stages()
    assert {cmd for _, cmd, _ in stages} == smk_cmds
    # Every Snakemake output lies inside an output of the DVC stage of the same rule name.
    outs = {}
    for name, _, paths in stages:
        outs.setdefault(name.split("@")[0], []).extend(paths)
    summary = run([BIN / "snakemake", "-n", "--forceall", "--detailed-summary", "all"]).stdout
    checked = 0
    for line in summary.splitlines():
        cols = line.split("\t")
        if len(cols) < 3 or not cols[0].startswith("results/"):
            continue
        path, rule = cols[0], cols[2]
        assert any(path == o or path.startswith(o.rstrip("/") + "/") for o in outs[rule]), (rule, path)
        checked += 1
    assert checked == 2 + 1 + 1 + 1 + 4 + 16 + 16 + 3  # prepare×2, encode, classifier, reference, train, …, report


def test_dvc_runs_the_small_profile_after_the_documented_switch(tmp_path):
    """README: `sed -i 's#params/default.yaml#params/small.yaml#g' dvc.yaml` turns DVC to the small profile."""
    _, smk_cmds = snakemake_commands("all", "--config", "params=params/small.yaml")
    shutil.copytree(ROOT / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    shutil.copytree(ROOT / "params", tmp_path / "params")
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text().replace("params/default.yaml",
                                                                                "params/small.yaml"))
    run(["git", "init", "-q"], cwd=tmp_path)
    stages = dvc_stages(cwd=tmp_path)
    assert {cmd for _, cmd, _ in stages} == smk_cmds
    assert sum(name.startswith("train@") for name, _, _ in stages) == 13  # 3 methods × 3 seeds + 2 × 2 ablation
    # Every params key dvc.yaml names exists in the profile (`dvc repro` refuses to run otherwise).
    code = ("import json; from dvc.repo import Repo; r = Repo('.'); print(json.dumps(sorted({k for s in r.index.stages "
            "for d in s.deps if type(d).__name__ == 'ParamsDependency' for k in d.params})))")
    profile = yaml.safe_load((tmp_path / "params" / "small.yaml").read_text())
    for key in json.loads(run([sys.executable, "-c", code], cwd=tmp_path).stdout):
        node = profile
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"dvc.yaml names params key {key!r}, missing in small.yaml"
            node = node[part]


#----------------------------------------------------------------------------
# The DAG for real (slow)


def tiny_profile(path, images, results="results", **defaults):
    d = tiny_params_dict(results, images, **defaults)
    d["eval"]["weights"] = ["ema", "raw"]
    # Every params key dvc.yaml names must exist (DVC refuses missing params).
    d["eval"].update({"fid_samples": None, "fid_ref_samples": None, "slow_metric_weights": None,
                      "inception": "inception-fid-ts", "parts": 1})
    d["paper_results"] = {}
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return d


@pytest.mark.slow
def test_snakemake_runs_the_tiny_dag_end_to_end_and_then_has_nothing_to_do(tiny_latents, tmp_path):
    from conftest import write_class_folder

    write_class_folder(tmp_path / "images")
    params = tmp_path / "params.yaml"
    tiny_profile(params, tmp_path / "images", results=str(tmp_path / "results"))
    args = [BIN / "snakemake", "all", "-s", ROOT / "Snakefile", "--directory", tmp_path, "--cores", "2",
            "--config", f"params={params}"]
    run(args)
    tables = tmp_path / "results" / "tables" / "test"
    table = (tables / "table1.md").read_text()
    for run_name in ("alphaflow-tiny", "meanflow-tiny"):
        assert run_name in table
    rows = (tables / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * 2  # header + runs × weights × samplers (one metric)
    assert (tmp_path / "results" / "plots" / "test" / "training.png").exists()
    again = run([*args[:2], "-n", *args[2:]]).stdout
    assert "Nothing to be done" in again


@pytest.mark.slow
def test_dvc_repro_runs_the_same_dag_in_a_git_repo(tiny_latents, tmp_path):
    from conftest import write_class_folder

    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ("dvc.yaml", "alphaflow", "workflow"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item)
    write_class_folder(repo / "images")
    (repo / "params").mkdir()
    tiny_profile(repo / "params" / "default.yaml", repo / "images")
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
    # A metric-only params change invalidates the evaluate stages and nothing upstream.
    d = yaml.safe_load((repo / "params" / "default.yaml").read_text())
    d["eval"]["n_boot"] = 7
    (repo / "params" / "default.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    assert changed_stages(repo) == {f"evaluate@{r}-{w}-sampler{i}" for r in ("alphaflow-tiny", "meanflow-tiny")
                                    for w in ("ema", "raw") for i in (0, 1)}
    # An encoder param invalidates encode and everything downstream of it, and nothing upstream.
    d["eval"]["n_boot"] = 20
    d["encoder"]["batch_size"] = 32
    (repo / "params" / "default.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    changed = changed_stages(repo)
    assert "encode" in changed and not any(s.startswith(("prepare", "classifier", "reference")) for s in changed)


def changed_stages(repo):
    """Stages `dvc status` lists as changed (directly or through an upstream dependency)."""
    status = json.loads(run([BIN / "dvc", "status", "--json"], cwd=repo).stdout)
    return set(status)
