"""The real stages on a real SLURM cluster (bring one up with `bash tests/slurm/setup.sh`; slow).

- `alphaflow launch --stage train --executor slurm`, preempted with SIGUSR2 after its first checkpoints,
  is requeued by SLURM and finishes with exactly the weights of an uninterrupted run;
- `snakemake --profile slurm all` on the tiny profile runs every GPU rule through real sbatch.
"""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from helpers import ROOT
from helpers import BIN, ENV, job_ids, write_profile

pytestmark = pytest.mark.slow


def test_train_preempted_on_slurm_resumes_to_the_uninterrupted_weights(slurm, tiny_latents, tmp_path):
    steps = 60
    params, results = write_profile(tmp_path, tiny_latents, steps=steps, checkpoint_every=10)
    run = "meanflow-tiny"
    # Uninterrupted reference, in-process.
    ref_results = tmp_path / "ref"
    shutil.copytree(results, ref_results)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "alphaflow",
            "train",
            "--params",
            params,
            "--run",
            run,
            "--quiet",
            "--no-tracking",
            "--set",
            f"results={ref_results}",
        ],
        cwd=ROOT,
        env=ENV,
        check=True,
        capture_output=True,
    )
    # The same run through SLURM, sent the preemption signal once it has written a checkpoint.
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "alphaflow",
            "launch",
            "--params",
            params,
            "--stage",
            "train",
            "--run",
            run,
            "--executor",
            "slurm",
            "--",
            "--quiet",
            "--no-tracking",
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    latest = results / "runs" / run / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 180
    while not (latest.exists() and json.loads(latest.read_text())["step"] >= 10):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.1)
    ids = job_ids(f"af-train-{run}")
    assert len(ids) == 1
    # The launcher, blocked on its SLURM job (one per queued job on a login node), stays torch-free and small.
    status = Path(f"/proc/{proc.pid}/status").read_text()
    peak_mb = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
    assert peak_mb < 100 and "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text(), peak_mb
    subprocess.run(["scancel", "--signal=USR2", ids[0]], check=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    log = "\n".join(p.read_text() for p in (results / "logs").rglob("*.out"))
    assert "exiting 75 for requeue" in log, log[-3000:]
    state = json.loads((results / "runs" / run / "checkpoints" / "final" / "state.json").read_text())
    assert state["step"] == steps
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(results / "runs" / run / "checkpoints" / "final" / name)
        b = load_file(ref_results / "runs" / run / "checkpoints" / "final" / name)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name
    print(f"\n[timing] train preempted + requeued on SLURM: {time.monotonic() - t0:.1f}s")


def test_snakemake_slurm_profile_runs_the_tiny_dag_through_sbatch(slurm, tiny_latents, tmp_path):
    params, results = write_profile(tmp_path, tiny_latents)
    d = yaml.safe_load(params.read_text())
    d["runs"] = {"alphaflow-tiny": {"method": "alphaflow"}}
    d["eval"]["weights"] = ["ema"]
    params.write_text(yaml.safe_dump(d, sort_keys=False))
    t0 = time.monotonic()
    # The repository's own slurm/ profile, with this tiny params file instead of the paper's.
    proc = subprocess.run(
        [
            BIN / "snakemake",
            "--profile",
            "slurm",
            "all",
            "--directory",
            tmp_path,
            "-s",
            ROOT / "Snakefile",
            "--cores",
            "4",
            "--config",
            f"params={params}",
            "executor=slurm",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert (results / "tables" / "test" / "table1.md").exists()
    # Every GPU rule went through sbatch: one submitit log folder per job, with a SLURM job id.
    launched = sorted(p.name for p in (results / "logs" / "launch").iterdir())
    assert {"alphaflow-tiny", "classifier", "reference", "sample", "evaluate"} <= set(launched), launched
    job_dirs = [p for p in (results / "logs" / "launch").rglob("*") if p.is_dir() and p.name.split("_")[0].isdigit()]
    assert len(job_dirs) >= 1 + 1 + 1 + 2 + 2
    sacct = subprocess.run(["sacct", "-n", "-X", "-o", "JobName%40,State"], capture_output=True, text=True).stdout
    assert "af-train-alphaflow-tiny" in sacct
    print(f"\n[timing] snakemake --profile slurm all (tiny): {time.monotonic() - t0:.1f}s")
