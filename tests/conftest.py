import os

import pytest
import torch

# Deterministic, CPU-friendly defaults for every test.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Tests never write into the project's own MLflow store (subprocesses inherit this).
import tempfile  # noqa: E402

_MLFLOW_DIR = tempfile.mkdtemp(prefix="alphaflow-test-mlflow-")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_MLFLOW_DIR}/mlflow.db"
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def randomized(net, std=0.05, seed=0):
    """Gives a zero-initialised DiT non-trivial outputs (adaLN and output layers are zero at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


@pytest.fixture
def tiny_net64():
    """A 2-block float64 DiT with the same weights in every test, whatever ran before (the default init draws
    from the global RNG, which is forked here and left as it was)."""
    from alphaflow.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_model("T/2", num_classes=3, input_size=8, in_channels=2, depth=2, hidden_size=32, num_heads=2)
    return randomized(net.double())


#----------------------------------------------------------------------------
# A tiny real pipeline input: an ImageNet-style folder of PNGs → prepared shards → identity latents.

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write_class_folder(root, classes=3, per_class=24, size=12, seed=0):
    """Class-structured images: class k is a bright blob in quadrant k on noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(classes):
        d = Path(root) / f"class{k}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            r0, c0 = (k // 2) * size // 2, (k % 2) * size // 2
            img[r0:r0 + size // 2, c0:c0 + size // 2] = 200 + rng.integers(0, 55)
            Image.fromarray(img).save(d / f"img{i}.png")
    return Path(root)


def tiny_params_dict(results, folder, **defaults):
    d = {
        "profile": "test", "seed": 0, "results": str(results), "tracking_uri": None, "executor": "none",
        "device": "cpu",
        "data": {"name": "tiny", "source": "folder", "path": str(folder), "resolution": 8, "workers": 1},
        "encoder": {"kind": "identity", "batch_size": 64, "parts": 1},
        "defaults": {"model": "T/2", "model_overrides": {"depth": 1, "hidden_size": 32, "num_heads": 2},
                     "steps": 12, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "ema_halflife": 4,
                     "ema_rampup": 0.5, "fm_ratio": 0.5, "alpha_start": 2, "alpha_end": 8,
                     "stats_samples": 32, "log_every": 2, "checkpoint_every": 2, "snapshot_every": 1000,
                     "conflict_every": None, "seed": 3, **defaults},
        "runs": {"alphaflow-tiny": {"method": "alphaflow"}, "meanflow-tiny": {"method": "meanflow"}},
        "eval": {"num_samples": 24, "batch_size": 12, "labels": "balanced", "weights": ["ema", "raw"],
                 "samplers": [{"name": "1nfe", "mode": "ode", "t_steps": [1.0, 0.0]},
                              {"name": "2nfe-cons-0.5", "mode": "consistency", "t_steps": [1.0, 0.5, 0.0]}],
                 "metrics": ["fd_classifier"], "n_boot": 20, "classifier_epochs": 1, "ref_samples": 24},
    }
    return d


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


def run_cli(*args, check=True, **kw):
    """`python -m alphaflow ...` as a user types it."""
    proc = subprocess.run([sys.executable, "-m", "alphaflow", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"alphaflow {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


#----------------------------------------------------------------------------
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
