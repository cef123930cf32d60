"""The declarative promise through the real tools: edit params, re-run, get what a from-scratch run gives.

The change-propagation matrix: for each stage, a representative key it reads is changed on a finished tiny
DAG; the re-run through `snakemake` must run exactly the jobs that depend on the key and its outputs must
equal a from-scratch run with the new params (bit-equal weights, samples, classifier and reference
statistics; equal metric values and tables). A key no stage reads re-runs nothing. Then a kill -9 of the
whole DAG at a random moment, and `dvc repro` on a subset of the matrix.
"""

import copy
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from alphaflow.provenance import latents_content_hash
from helpers import ROOT, tiny_params_dict, write_class_folder
from helpers import BIN, ENV, changed_stages, job_counts, run

pytestmark = pytest.mark.slow

RUNS = ("alphaflow-tiny",)  # α-Flow: flow matching, α-Flow and MeanFlow (JVP) steps in 12 steps


def matrix_profile(images):
    """One run, EMA weights, two samplers, FD_clf: every stage of the DAG in 11 jobs (each job pays ~4 s of
    Python start-up on the 2-core machine; the matrix runs 18 such DAGs)."""
    d = tiny_params_dict("results", images)
    d["runs"] = {name: d["runs"][name] for name in RUNS}
    d["eval"].update(
        {
            "weights": ["ema"],
            "fid_samples": None,
            "fid_ref_samples": None,
            "slow_metric_weights": None,
            "inception": "inception-fid-ts",
            "parts": 1,
        }
    )
    d["eval"]["samplers"][1] = {"name": "2nfe-ode-0.5", "mode": "ode", "t_steps": [1.0, 0.5, 0.0]}
    d["paper_results"] = {}
    d["resources"] = {"train": {"timeout_min": 60}}
    return d


def snakemake(workdir, *extra, config=(), check=True):
    args = [
        BIN / "snakemake",
        "all",
        "-s",
        ROOT / "Snakefile",
        "--directory",
        workdir,
        "--cores",
        "2",
        *extra,
        "--config",
        f"params={workdir / 'params.yaml'}",
        *config,
    ]
    return run(args, check=check)


def write_params(workdir, d):
    (workdir / "params.yaml").write_text(yaml.safe_dump(d, sort_keys=False))


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs(workdir):
    """What every stage produced, as content hashes and metric values (paths differ between folders)."""
    res = workdir / "results"
    snap = {
        "latents": latents_content_hash(res / "latents" / "tiny-identity"),
        "classifier": sha(res / "classifier" / "tiny.safetensors"),
        "reference": sorted(sha(f) for f in (res / "reference").glob("*.safetensors")),
        "results.csv": (res / "tables" / "test" / "results.csv").read_text(),
        "table1.md": (res / "tables" / "test" / "table1.md").read_text(),
    }
    for name in RUNS:
        run_dir = res / "runs" / name
        for f in ("model", "ema"):
            snap[f"{name}/{f}"] = sha(run_dir / "checkpoints" / "final" / f"{f}.safetensors")
        for done in sorted(run_dir.glob("samples/*/*/done.json")):
            snap[f"{name}/samples/{done.parent.name}"] = [c["sha256"] for c in json.loads(done.read_text())["chunks"]]
        for ev in sorted(run_dir.glob("eval/*/*.json")):
            snap[f"{name}/eval/{ev.stem}"] = json.loads(ev.read_text())["metrics"]
    return snap


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A finished tiny DAG (workdir with params.yaml, results/ and Snakemake's metadata) and its params."""
    base = tmp_path_factory.mktemp("declarative")
    images = write_class_folder(base / "images")
    work = base / "baseline"
    work.mkdir()
    d = matrix_profile(images)
    write_params(work, d)
    snakemake(work)
    return work, d, base


def scratch(base, d, name):
    work = base / f"scratch-{name}"
    work.mkdir()
    write_params(work, d)
    snakemake(work)
    return outputs(work)


def set_key(d, dotted, value):
    node = d
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[parts[-1]] = value


JOBS_ALL = {
    "prepare": 2,
    "encode": 1,
    "classifier": 1,
    "reference": 1,
    "train": 1,
    "sample": 2,
    "evaluate": 2,
    "report": 1,
}
MATRIX = [  # (stage, key, new value, the jobs that must re-run)
    ("report", "paper_results", {"alphaflow-tiny": {"table": "1", "fid_1nfe": 1.0}}, {"report": 1}),
    ("evaluate", "eval.n_boot", 10, {"evaluate": 2, "report": 1}),
    ("sample", "eval.samplers.1.t_steps", [1.0, 0.4, 0.0], {"sample": 1, "evaluate": 1, "report": 1}),
    ("train", "runs.alphaflow-tiny.lr", 5e-4, {"train": 1, "sample": 2, "evaluate": 2, "report": 1}),
    ("train-steps", "defaults.steps", 16, {"train": 1, "sample": 2, "evaluate": 2, "report": 1}),
    ("reference", "eval.ref_samples", 18, {"reference": 1, "evaluate": 2, "report": 1}),
    ("classifier", "eval.classifier_epochs", 2, {"classifier": 1, "reference": 1, "evaluate": 2, "report": 1}),
    ("prepare", "data.limit_per_class", 20, JOBS_ALL),
]


@pytest.mark.parametrize("stage,key,value,jobs", MATRIX, ids=[m[0] for m in MATRIX])
def test_a_changed_key_reruns_its_stage_and_downstream_and_equals_a_fresh_run(baseline, stage, key, value, jobs):
    work0, d0, base = baseline
    work = base / f"changed-{stage}"
    shutil.copytree(work0, work, symlinks=True)  # copy2 keeps mtimes: Snakemake sees a finished DAG
    d = copy.deepcopy(d0)
    set_key(d, key, value)
    write_params(work, d)
    out = snakemake(work)
    ran = job_counts(out.stdout + out.stderr)
    ran.pop("total", None)
    assert ran == {**jobs, "all": 1}, out.stderr[-3000:]
    assert outputs(work) == scratch(base, d, stage)
    assert "Nothing to be done" in snakemake(work, "-n").stdout


def test_keys_no_stage_reads_rerun_nothing(baseline):
    work0, d0, base = baseline
    work = base / "unread"
    shutil.copytree(work0, work, symlinks=True)
    d = copy.deepcopy(d0)
    d["resources"] = {"train": {"timeout_min": 5, "gpus_per_node": 8}}  # how/where stages run
    d["runs"]["alphaflow-tiny"]["resources"] = {"mem_gb": 64}
    d["tracking_uri"] = "sqlite:///elsewhere.db"
    d["data"]["workers"] = 2  # parallelism only
    d["encoder"]["batch_size"] = 16
    write_params(work, d)
    assert "Nothing to be done" in snakemake(work, "-n").stdout
    # `--set` overrides of such keys change the command line, not the outputs: still nothing to do.
    assert "Nothing to be done" in snakemake(work, "-n", config=["set=[resources.train.timeout_min=7]"]).stdout


def test_a_report_run_by_hand_on_partial_results_does_not_hide_the_missing_work(baseline):
    """Snakemake does not re-run a job whose outputs exist just because one of its inputs is missing. A report
    written by hand (`alphaflow report`) while evaluations are missing must therefore not produce the report
    rule's outputs: its complete.json marker is absent and `snakemake all` runs the missing cell and the report."""
    work0, d0, base = baseline
    work = base / "partial-report"
    shutil.copytree(work0, work, symlinks=True)
    cell = work / "results" / "runs" / RUNS[0]
    (cell / "eval" / "ema" / "2nfe-ode-0.5.json").unlink()
    shutil.rmtree(cell / "samples" / "ema" / "2nfe-ode-0.5")
    out = run([BIN / "alphaflow", "report", "--params", work / "params.yaml", "--quiet"], cwd=work)
    assert "1 of 2 evaluations are missing" in out.stdout + out.stderr
    again = snakemake(work)
    ran = job_counts(again.stdout + again.stderr)
    ran.pop("total", None)
    assert ran == {"sample": 1, "evaluate": 1, "report": 1, "all": 1}
    assert outputs(work) == outputs(work0)


def test_kill_9_of_the_whole_dag_then_the_documented_rerun_equals_an_uninterrupted_run(baseline):
    """kill -9 Snakemake and every job at a random moment; `snakemake --unlock` (Snakemake asks for it after
    a kill) and the same command again must finish with outputs equal to the uninterrupted run's."""
    work0, d0, base = baseline
    work = base / "killed"
    work.mkdir()
    write_params(work, d0)
    args = [
        BIN / "snakemake",
        "all",
        "-s",
        ROOT / "Snakefile",
        "--directory",
        work,
        "--cores",
        "2",
        "--config",
        f"params={work / 'params.yaml'}",
    ]
    proc = subprocess.Popen(
        list(map(str, args)),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    delay = random.Random().uniform(3, 30)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = snakemake(work, check=False)
    if first.returncode != 0:
        assert "--unlock" in first.stdout + first.stderr, (delay, first.stdout[-3000:], first.stderr[-3000:])
        run([*map(str, args), "--unlock"])
        snakemake(work)
    assert outputs(work) == outputs(work0), f"killed after {delay:.1f} s"


def stage_pid(stage, cwd):
    """The pid of a running `alphaflow <stage>` process working in `cwd` (a scan of /proc), or None."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv, where = (proc / "cmdline").read_bytes().split(b"\0"), os.readlink(proc / "cwd")
        except OSError:
            continue  # gone meanwhile, or not ours
        if where == str(cwd) and stage.encode() in argv and any(a.endswith(b"/alphaflow") for a in argv):
            return int(proc.name)
    return None


def kill_9_during(args, cwd, stage, timeout=900):
    """Starts `args` in its own session and kill -9s all of it 0.2–1.5 s into the first `alphaflow <stage>`."""
    log = Path(cwd) / f"killed-during-{stage}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            list(map(str, args)), cwd=cwd, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.time() + timeout
    while stage_pid(stage, cwd) is None:
        assert proc.poll() is None, f"it ended before any `alphaflow {stage}` ran:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no `alphaflow {stage}` within {timeout} s"
        time.sleep(0.05)
    time.sleep(random.Random().uniform(0.2, 1.5))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("stage", ["sample", "evaluate", "report"])
def test_kill_9_during_a_stage_then_the_documented_rerun_equals_an_uninterrupted_run(baseline, stage):
    """The fault matrix's kill -9 rows: Snakemake and its jobs killed while `alphaflow <stage>` writes; then
    `snakemake --unlock` and the same command (docs/faults.md) give the uninterrupted run's outputs."""
    work0, d0, base = baseline
    work = base / f"killed-in-{stage}"
    work.mkdir()
    write_params(work, d0)
    args = [
        BIN / "snakemake",
        "all",
        "-s",
        ROOT / "Snakefile",
        "--directory",
        work,
        "--cores",
        "2",
        "--config",
        f"params={work / 'params.yaml'}",
    ]
    kill_9_during(args, work, stage)
    run([*map(str, args), "--unlock"])
    snakemake(work)
    assert outputs(work) == outputs(work0)


# ----------------------------------------------------------------------------
# DVC on a subset of the matrix


@pytest.fixture(scope="module")
def dvc_repo(baseline):
    _, d0, base = baseline
    repo = base / "dvc"
    repo.mkdir()
    for item in ("alphaflow", "workflow"):
        shutil.copytree(ROOT / item, repo / item)
    (repo / "params").mkdir()
    (repo / "params" / "default.yaml").write_text(yaml.safe_dump(d0, sort_keys=False))
    run([BIN / "alphaflow", "dvc-pipeline", "--params", "params/default.yaml"], cwd=repo)
    for cmd in (["git", "init", "-q"], [BIN / "dvc", "init", "-q"]):
        run(cmd, cwd=repo)
    run(["git", "add", "-A"], cwd=repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"], cwd=repo)
    run([BIN / "dvc", "repro"], cwd=repo)
    return repo


DVC_MATRIX = [MATRIX[1], MATRIX[3]]  # evaluate, train (each case costs a DVC repro there and back)


@pytest.mark.parametrize("stage,key,value,jobs", DVC_MATRIX, ids=[m[0] for m in DVC_MATRIX])
def test_dvc_repro_after_a_change_equals_a_fresh_run(baseline, dvc_repo, stage, key, value, jobs):
    work0, d0, base = baseline
    d = copy.deepcopy(d0)
    set_key(d, key, value)
    (dvc_repo / "params" / "default.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    # `dvc status` lists the stages whose own params, definition or deps changed; those below them follow
    # once their inputs change during the repro.
    changed = {s.split("-")[0] for s in changed_stages(dvc_repo)}
    assert stage in changed and changed <= set(jobs), changed
    run([BIN / "dvc", "repro"], cwd=dvc_repo)
    fresh = base / f"scratch-{stage}"
    expected = outputs(fresh) if fresh.exists() else scratch(base, d, stage)
    assert_same_outputs(outputs(dvc_repo), expected)
    assert "Data and pipelines are up to date" in run([BIN / "dvc", "repro"], cwd=dvc_repo).stdout
    (dvc_repo / "params" / "default.yaml").write_text(yaml.safe_dump(d0, sort_keys=False))
    run([BIN / "dvc", "repro"], cwd=dvc_repo)  # back to the baseline for the next case
    assert_same_outputs(outputs(dvc_repo), outputs(work0))


def assert_same_outputs(dvc, snakemake_):
    """DVC runs stages with all cores, Snakemake evaluate jobs with one: float64 FD/bootstrap sums then
    differ in the last bits (1e-11 seen); everything else must be bit-equal."""
    metrics = {k for k in snakemake_ if "/eval/" in k}
    exact = set(snakemake_) - metrics - {"results.csv"}  # results.csv: the same values at full precision
    assert {k: dvc[k] for k in exact} == {k: snakemake_[k] for k in exact}
    assert dvc.keys() == snakemake_.keys()
    for k in metrics:
        for name, m in snakemake_[k].items():
            for field in ("value", "low", "high"):
                assert dvc[k][name][field] == pytest.approx(m[field], rel=1e-9), (k, name, field)


def test_kill_9_during_dvc_repro_then_dvc_repro_equals_an_uninterrupted_run(baseline, dvc_repo):
    """The fault matrix's DVC row: `dvc repro --force` killed while a sample stage writes; `dvc repro` again
    finishes with the uninterrupted run's outputs."""
    work0, _, _ = baseline
    kill_9_during([BIN / "dvc", "repro", "--force"], dvc_repo, "sample")
    run([BIN / "dvc", "repro"], cwd=dvc_repo)
    assert_same_outputs(outputs(dvc_repo), outputs(work0))
    assert "Data and pipelines are up to date" in run([BIN / "dvc", "repro"], cwd=dvc_repo).stdout
