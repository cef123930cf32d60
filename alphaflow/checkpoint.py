"""Training checkpoints: safetensors weights, EMA and optimizer + a JSON state, written atomically.

    checkpoints/step-0001000/{model,ema,optimizer,rng}.safetensors + state.json
    checkpoints/latest.json   -> {"dir": "step-0001000"}   (the newest complete checkpoint)
    checkpoints/final/        the finished run (what sampling reads)

A checkpoint is written into a hidden temporary folder, each file fsync'ed, then the folder is renamed
and `latest.json` replaced atomically: after kill -9 the newest checkpoint is always complete.
Loading never unpickles: safetensors + JSON only.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alphaflow.data.shards import _fsync_dir, atomic_write_json

LATEST = "latest.json"


def step_dir_name(step):
    return f"step-{step:07d}"


def _save_tensors(tensors, path):
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def optimizer_tensors(optimizer):
    """Adam state → flat tensors {"state.<i>.<key>"} and the JSON-able param_groups."""
    sd = optimizer.state_dict()
    tensors = {f"state.{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def load_optimizer(optimizer, tensors, param_groups):
    state = {}
    for key, value in tensors.items():
        _, i, k = key.split(".", 2)
        state.setdefault(int(i), {})[k] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def save_checkpoint(ckpt_dir, name, *, net, ema, optimizer, rng, state):
    """Writes checkpoint `name` (e.g. step-0001000 or final) atomically and points latest.json at it.

    rng: dict of named uint8 generator states; state: JSON-able dict (step, loader, fingerprint, …).
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _save_tensors(net.state_dict(), tmp / "model.safetensors")
    _save_tensors(ema.state_dict(), tmp / "ema.safetensors")
    opt_tensors, param_groups = optimizer_tensors(optimizer)
    _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    _save_tensors(rng, tmp / "rng.safetensors")
    atomic_write_json(tmp / "state.json", {**state, "param_groups": param_groups})
    final = ckpt_dir / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    atomic_write_json(ckpt_dir / LATEST, {"dir": name, "step": state["step"]})
    return final


def latest_checkpoint(ckpt_dir):
    """The newest complete checkpoint folder, or None."""
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.exists():
        return None
    path = Path(ckpt_dir) / json.loads(pointer.read_text())["dir"]
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{pointer} points at {path}, which is incomplete; delete {pointer} to "
                                "fall back to an older checkpoint or start over")
    return path


def read_state(path):
    return json.loads((Path(path) / "state.json").read_text())


def load_checkpoint(path, *, net, ema, optimizer, device="cpu"):
    """Restores net, EMA and optimizer in place; returns (state dict, rng tensors)."""
    path = Path(path)
    net.load_state_dict(load_file(str(path / "model.safetensors"), device=str(device)))
    ema.load_state_dict(load_file(str(path / "ema.safetensors"), device=str(device)))
    state = read_state(path)
    if optimizer is not None:
        load_optimizer(optimizer, load_file(str(path / "optimizer.safetensors"), device=str(device)),
                       state["param_groups"])
    return state, load_file(str(path / "rng.safetensors"))


def load_weights(path, which="ema", device="cpu"):
    """The EMA or raw weights of a checkpoint folder, for sampling."""
    files = {"ema": "ema.safetensors", "raw": "model.safetensors"}
    if which not in files:
        raise ValueError(f"weights must be one of {sorted(files)}, got {which!r}")
    file = Path(path) / files[which]
    if not file.exists():
        raise FileNotFoundError(f"{file} is missing: train the run first (`alphaflow train --run ...`)")
    return load_file(str(file), device=str(device))


def prune(ckpt_dir, keep_steps, keep_last=2):
    """Deletes step-* folders except the newest `keep_last` and the snapshot steps in keep_steps."""
    dirs = sorted(p for p in Path(ckpt_dir).glob("step-*") if p.is_dir())
    for p in dirs[:-keep_last]:
        if int(p.name.split("-")[1]) not in keep_steps:
            shutil.rmtree(p, ignore_errors=True)
