"""Fixtures shared by the tests; plain helpers live in helpers.py (`from helpers import ...`)."""

import os
import shutil
import subprocess
import tempfile

import pytest
import torch
import yaml
from helpers import randomized, tiny_params_dict, write_class_folder

# Deterministic, CPU-friendly defaults for every test.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Tests never write into the project's own MLflow store (subprocesses inherit this).
_MLFLOW_DIR = tempfile.mkdtemp(prefix="alphaflow-test-mlflow-")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_MLFLOW_DIR}/mlflow.db"
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture
def tiny_net64():
    """A 2-block float64 DiT with the same weights in every test, whatever ran before (the default init draws
    from the global RNG, which is forked here and left as it was)."""
    from alphaflow.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_model("T/2", num_classes=3, input_size=8, in_channels=2, depth=2, hidden_size=32, num_heads=2)
    return randomized(net.double())


# ----------------------------------------------------------------------------
# A tiny real pipeline input: an ImageNet-style folder of PNGs → prepared shards → identity latents.


@pytest.fixture(scope="session")
def tiny_latents(tmp_path_factory):
    """results folder with prepared train/test data and identity latents of the tiny folder dataset."""
    from alphaflow.config import Params
    from alphaflow.stages import encode, prepare

    base = tmp_path_factory.mktemp("tiny")
    folder = write_class_folder(base / "images")
    params = Params(raw=tiny_params_dict(base / "results", folder))
    prepare(params, "train")
    prepare(params, "test")
    encode(params)
    return base


@pytest.fixture
def tiny_project(tiny_latents, tmp_path):
    """(params path, results dir) with a private copy of the tiny data; `write(**defaults)` rewrites params."""
    results = tmp_path / "results"
    shutil.copytree(tiny_latents / "results", results)

    def write(runs=None, **defaults):
        d = tiny_params_dict(results, tiny_latents / "images", **defaults)
        if runs is not None:
            d["runs"] = runs
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(d))
        return path

    return write, results


# ----------------------------------------------------------------------------
# A SLURM cluster to run on (tests/slurm/setup.sh brings one up on this machine).

SETUP_HINT = "bring one up, as root: bash tests/slurm/setup.sh"


def _slurm_available():
    """None when a controller answers and a node can run jobs, else why the tests are skipped."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return f"SLURM client tools not installed ({SETUP_HINT})"
    try:  # scontrol ping answers at once; sinfo retries a dead controller for about 10 s
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
        if "UP" not in ping.stdout:
            said = (ping.stdout.strip() or ping.stderr.strip() or f"exit {ping.returncode}").splitlines()[0]
            return f"no SLURM controller answers (scontrol ping: {said}; {SETUP_HINT})"
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired as e:
        return f"{e.cmd[0]} did not answer within 15 s ({SETUP_HINT})"
    states = out.stdout.split()
    if out.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no usable SLURM node (sinfo: {out.stdout.strip() or out.stderr.strip()}; {SETUP_HINT})"
    return None


@pytest.fixture(scope="module")
def slurm():
    reason = _slurm_available()
    if reason and os.environ.get("ALPHAFLOW_REQUIRE_SLURM") == "1":  # CI: a broken cluster must not pass as skips
        pytest.fail(f"ALPHAFLOW_REQUIRE_SLURM=1 but {reason}", pytrace=False)
    if reason:
        pytest.skip(reason)
