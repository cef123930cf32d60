"""Helpers shared by test modules (imported as `from helpers import ...`; tests never import each other).

Light to import (no conftest, no pytest at the top): DDP tests' spawned workers may import it."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from alphaflow.models.dit import sincos_2d_pos_embed

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------
# A snapshot in the official α-Flow layout (the wrapper's `model.*` names and shapes), random weights (none of
# them zero, so every layer matters).


def official_wrapper_state(depth, hidden, patch=2, channels=4, size=32, rows=1001, seed=0):
    """The wrapper state dict (`net` or `ema`) of a DiT with these shapes."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, std=0.05: torch.randn(*shape, generator=g) * std
    s = {
        "model.pos_embed": sincos_2d_pos_embed(hidden, size // patch)[None],
        "model.x_embedder.proj.weight": rnd(hidden, channels, patch, patch, std=0.2),
        "model.x_embedder.proj.bias": rnd(hidden),
        "model.y_embedder.embedding_table.weight": rnd(rows, hidden, std=0.5),
    }
    for emb in ("noise_labels_embedder", "noise_labels_next_embedder"):
        s[f"model.{emb}.mlp.0.weight"], s[f"model.{emb}.mlp.0.bias"] = rnd(hidden, 256, std=0.2), rnd(hidden)
        s[f"model.{emb}.mlp.2.weight"], s[f"model.{emb}.mlp.2.bias"] = rnd(hidden, hidden, std=0.2), rnd(hidden)
    for i in range(depth):
        b = f"model.blocks.{i}."
        for name, (o, k) in {
            "attn.qkv": (3 * hidden, hidden),
            "attn.proj": (hidden, hidden),
            "mlp.fc1": (4 * hidden, hidden),
            "mlp.fc2": (hidden, 4 * hidden),
            "adaLN_modulation.1": (6 * hidden, hidden),
        }.items():
            s[b + name + ".weight"], s[b + name + ".bias"] = rnd(o, k, std=1 / math.sqrt(k)), rnd(o)
    s["model.final_layer.linear.weight"] = rnd(patch * patch * channels, hidden, std=1 / math.sqrt(hidden))
    s["model.final_layer.linear.bias"] = rnd(patch * patch * channels)
    s["model.final_layer.adaLN_modulation.1.weight"] = rnd(2 * hidden, hidden, std=1 / math.sqrt(hidden))
    s["model.final_layer.adaLN_modulation.1.bias"] = rnd(2 * hidden)
    s["autoencoder_mean"] = torch.randn(1, channels, size, size, generator=g, dtype=torch.float64)
    s["autoencoder_var"] = torch.rand(1, channels, size, size, generator=g, dtype=torch.float64) * 30 + 1
    s["are_ldm_stats_inited"] = torch.tensor(True)
    return s


def write_snapshot(path, depth, hidden, rows=1001, extra=None, seed=0, **kw):
    """A torch.save(d) snapshot dict as the official trainer writes it; returns the dict."""
    snap = {
        "net": official_wrapper_state(depth, hidden, rows=rows, seed=2 * seed + 1, **kw),
        "ema": official_wrapper_state(depth, hidden, rows=rows, seed=2 * seed + 2, **kw),
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
        "cfg": {"model": {"label_dropout": 0.1 if rows > 1000 else 0.0}},
        "stats": {"step": 400000},
        "lr_scheduler": None,
        "grad_scaler": None,
        "dataloader": None,
        **(extra or {}),
    }
    torch.save(snap, path)
    return snap


# ----------------------------------------------------------------------------
# A tiny project with one trained run.


def trained_tiny_project(base, tiny_latents, **eval_keys):
    """Params of a copy of the tiny data under `base` with one α-Flow run ("alphaflow-tiny"), trained; eval_keys
    update the profile's eval section (e.g. protocol="alphaflow")."""
    from alphaflow.config import load_params
    from alphaflow.train import train

    shutil.copytree(tiny_latents / "results", base / "results")
    d = tiny_params_dict(base / "results", tiny_latents / "images")
    d["runs"] = {"alphaflow-tiny": {"method": "alphaflow"}}
    d["eval"].update(eval_keys)
    path = base / "params.yaml"
    path.write_text(yaml.safe_dump(d))
    params = load_params(path)
    train(params, "alphaflow-tiny", device="cpu", quiet=True, tracking=False)
    return params


# ----------------------------------------------------------------------------
# A run's final weights, compared bit for bit.


def final_tensors(results, run):
    d = results / "runs" / run / "checkpoints" / "final"
    return {name: load_file(str(d / f"{name}.safetensors")) for name in ("model", "ema", "optimizer")}


def assert_bit_identical(a, b):
    for group in a:
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), f"{group}/{k} differs"


# ----------------------------------------------------------------------------
# The pipeline's tools (snakemake, dvc, alphaflow) from this environment's bin/, as a user runs them.

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def run(cmd, cwd=ROOT, check=True, timeout=1200, env=None):
    """The command's CompletedProcess (text); check: an AssertionError with the output's tails on failure."""
    proc = subprocess.run(cmd, cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
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


def changed_stages(repo):
    """Stages `dvc status` lists as changed (directly or through an upstream dependency)."""
    status = json.loads(run([BIN / "dvc", "status", "--json"], cwd=repo).stdout)
    return set(status)


# ----------------------------------------------------------------------------
# A tiny profile that runs its stages on SLURM.

SLURM_RESOURCES = {"default": {"nodes": 1, "gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 10}}


def write_profile(tmp_path, tiny_latents, **defaults):
    """(params path, results dir): a private copy of the tiny data with executor slurm."""

    results = tmp_path / "results"
    shutil.copytree(tiny_latents / "results", results)
    d = tiny_params_dict(results, tiny_latents / "images", **defaults)
    d["executor"] = "slurm"
    d["resources"] = SLURM_RESOURCES
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path, results


def job_ids(name):
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout
    return out.split()


# ----------------------------------------------------------------------------
# Headless Chromium, as a user's browser (.ci/run installs Debian's chromium and sets ALPHAFLOW_REQUIRE_BROWSER=1)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
REQUIRE_BROWSER = os.environ.get("ALPHAFLOW_REQUIRE_BROWSER", "") not in ("", "0")  # .ci/run: fail, never skip


def need_chromium():
    """Fails (ALPHAFLOW_REQUIRE_BROWSER=1) or skips the calling test when no Chromium is installed."""
    import pytest

    if CHROMIUM is None:
        if REQUIRE_BROWSER:
            pytest.fail("ALPHAFLOW_REQUIRE_BROWSER is set but no chromium is installed (apt-get install chromium)")
        pytest.skip("no chromium for the browser check (apt-get install chromium)")


def browser(url, out_png=None, width=1600, height=1400):
    """The DOM of `url` after its scripts ran, in headless Chromium (and a screenshot to out_png)."""
    base = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--virtual-time-budget=20000",
        f"--window-size={width},{height}",
    ]
    if out_png is not None:
        subprocess.run(base + [f"--screenshot={out_png}", url], capture_output=True, timeout=180)
    return subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=180).stdout


def visible_text(dom):
    """The text a page shows: its DOM without scripts, styles and tags, whitespace collapsed."""
    import re

    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return " ".join(re.sub(r"<[^>]+>", " ", dom).split())


# ----------------------------------------------------------------------------
# Local servers and process groups


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------
# A tiny real pipeline input and the CLI as a user types it


def randomized(net, std=0.05, seed=0):
    """Gives a zero-initialised DiT non-trivial outputs (adaLN and output layers are zero at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


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
            img[r0 : r0 + size // 2, c0 : c0 + size // 2] = 200 + rng.integers(0, 55)
            Image.fromarray(img).save(d / f"img{i}.png")
    return Path(root)


def tiny_params_dict(results, folder, **defaults):
    d = {
        "profile": "test",
        "seed": 0,
        "results": str(results),
        "tracking_uri": None,
        "executor": "none",
        "device": "cpu",
        "data": {"name": "tiny", "source": "folder", "path": str(folder), "resolution": 8, "workers": 1},
        "encoder": {"kind": "identity", "batch_size": 64, "parts": 1},
        "defaults": {
            "model": "T/2",
            "model_overrides": {"depth": 1, "hidden_size": 32, "num_heads": 2},
            "steps": 12,
            "batch_size": 8,
            "lr": 1e-3,
            "warmup_steps": 2,
            "ema_halflife": 4,
            "ema_rampup": 0.5,
            "fm_ratio": 0.5,
            "alpha_start": 2,
            "alpha_end": 8,
            "stats_samples": 32,
            "log_every": 2,
            "checkpoint_every": 2,
            "snapshot_every": 1000,
            "conflict_every": None,
            "seed": 3,
            **defaults,
        },
        "runs": {"alphaflow-tiny": {"method": "alphaflow"}, "meanflow-tiny": {"method": "meanflow"}},
        "eval": {
            "num_samples": 24,
            "batch_size": 12,
            "labels": "balanced",
            "weights": ["ema", "raw"],
            "samplers": [
                {"name": "1nfe", "mode": "ode", "t_steps": [1.0, 0.0]},
                {"name": "2nfe-cons-0.5", "mode": "consistency", "t_steps": [1.0, 0.5, 0.0]},
            ],
            "metrics": ["fd_classifier"],
            "n_boot": 20,
            "classifier_epochs": 1,
            "ref_samples": 24,
        },
    }
    return d


def run_cli(*args, check=True, **kw):
    """`python -m alphaflow ...` as a user types it."""
    proc = subprocess.run(
        [sys.executable, "-m", "alphaflow", *map(str, args)], cwd=ROOT, capture_output=True, text=True, **kw
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"alphaflow {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc
