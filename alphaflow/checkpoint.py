"""Training checkpoints: safetensors weights, EMA and optimizer + a JSON state, written atomically.

    checkpoints/step-0001000/{model,ema,optimizer,rng}.safetensors + state.json
    checkpoints/latest.json   -> {"dir": "step-0001000"}   (the newest complete checkpoint)
    checkpoints/final/        the finished run (what sampling reads): hard links to the last step-*
                              checkpoint's files, state.json written last (the Snakemake output)

A checkpoint is written into a hidden temporary folder, each file fsync'ed, then the folder is renamed
and `latest.json` replaced atomically: after kill -9 the newest checkpoint is always complete. `latest.json`
only ever names a step-* folder, so deleting `final/state.json` (Snakemake does, before it re-runs a
training job) never strands a resume. state.json records the sha256 of the weight files; loading checks it.
Loading never unpickles: safetensors + JSON only.

A full disk: a save first removes what an interrupted save left (`.tmp-*`), then refuses with OutOfSpace when
the filesystem has less free than the checkpoint's tensors plus a margin; a disk that fills during the write
ends in the same OutOfSpace, after the temporary folder is removed. Either way the previous checkpoint and
latest.json are untouched, so re-running resumes from it.
"""

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from alphaflow.errors import UserError
from alphaflow.io import (
    atomic_write_json,
    ensure_space,
    fsync_file,
    is_out_of_space,
    publish_dir,
    remove_path,
    sha256_file,
    space_guard,
)

LATEST = "latest.json"
WEIGHT_FILES = {"ema": "ema.safetensors", "raw": "model.safetensors"}
PHEMA_FILE = "phema.safetensors"
SPACE_MARGIN = 1 << 20  # bytes free beyond a checkpoint's tensors (plus 1 %): headers, state.json, latest.json


def step_dir_name(step):
    return f"step-{step:07d}"


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete or does not match its recorded checksums."""


def _save_tensors(tensors, path):
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    fsync_file(path)
    return sha256_file(path)


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


def tensor_bytes(tensors) -> int:
    """Bytes of the tensors of a {name: tensor} dict (what safetensors writes, less its header)."""
    return sum(v.numel() * v.element_size() for v in tensors.values())


def space_margin(needed) -> int:
    return SPACE_MARGIN + needed // 100


def clear_partial(ckpt_dir) -> None:
    """Removes what an interrupted save left in `ckpt_dir`: `.tmp-*` folders and `.*.tmp` files (no reader
    opens them; the run lock keeps a second writer out)."""
    for leftover in (*Path(ckpt_dir).glob(".tmp-*"), *Path(ckpt_dir).glob(".*.tmp")):
        remove_path(leftover)


def save_checkpoint(ckpt_dir, name, *, net, ema, optimizer, rng, state, phema=None, what=None):
    """Writes checkpoint `name` (e.g. step-0001000 or final) atomically and points latest.json at it.

    rng: dict of named uint8 generator states; state: JSON-able dict (step, loader, fingerprint, …);
    phema: the tracked post-hoc EMA profiles (alphaflow.phema.PowerEMA), kept in fp32 for exact resume;
    what: names the checkpoint in an OutOfSpace (default "checkpoint <name>").
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    clear_partial(ckpt_dir)
    opt_tensors, param_groups = optimizer_tensors(optimizer)
    files = {
        WEIGHT_FILES["raw"]: net.state_dict(),
        WEIGHT_FILES["ema"]: ema.state_dict(),
        "optimizer.safetensors": opt_tensors,
        "rng.safetensors": rng,
    }
    if phema is not None:
        files[PHEMA_FILE] = phema.state_dict()
    what, tmp = what or f"checkpoint {name}", ckpt_dir / f".tmp-{name}"
    needed = sum(tensor_bytes(t) for t in files.values())
    ensure_space(ckpt_dir / name, needed, what, space_margin(needed))
    with space_guard(ckpt_dir / name, needed, what, cleanup=[tmp]):
        tmp.mkdir()
        sha = {f: _save_tensors(tensors, tmp / f) for f, tensors in files.items()}
        weights = {w: sha[WEIGHT_FILES[w]] for w in ("raw", "ema")}
        atomic_write_json(tmp / "state.json", {**state, "sha256": weights, "param_groups": param_groups})
        final = publish_dir(tmp, ckpt_dir / name)
        atomic_write_json(ckpt_dir / LATEST, {"dir": name, "step": state["step"]})
    return final


def write_final(ckpt_dir, weight_sets, state):
    """`final/` holding only weights (imported, not trained): {"raw": tensors, "ema": tensors} + state.json,
    written into a temporary folder and renamed, so a kill leaves the previous final/ or none."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    clear_partial(ckpt_dir)
    tmp = ckpt_dir / ".tmp-final"
    needed = sum(tensor_bytes(weight_sets[w]) for w in ("raw", "ema"))
    ensure_space(ckpt_dir / "final", needed, "the imported weights", space_margin(needed))
    with space_guard(ckpt_dir / "final", needed, "the imported weights", cleanup=[tmp]):
        tmp.mkdir()
        files = {w: _save_tensors(weight_sets[w], tmp / WEIGHT_FILES[w]) for w in ("raw", "ema")}
        atomic_write_json(tmp / "state.json", {**state, "sha256": files})
        return publish_dir(tmp, ckpt_dir / "final")


def publish_final(ckpt_dir, name):
    """`final/` = the complete checkpoint `name` (hard links, a copy where links fail); state.json last."""
    ckpt_dir = Path(ckpt_dir)
    src, tmp = ckpt_dir / name, ckpt_dir / ".tmp-final"
    clear_partial(ckpt_dir)
    needed = sum(f.stat().st_size for f in src.iterdir())  # what a copy needs; links need next to nothing
    with space_guard(ckpt_dir / "final", needed, f"the final checkpoint (from {name})", cleanup=[tmp]):
        tmp.mkdir()
        for f in sorted(src.iterdir()):
            if f.name != "state.json":
                _link_or_copy(f, tmp / f.name)
        publish_dir(tmp, ckpt_dir / "final")
        atomic_write_json(ckpt_dir / "final" / "state.json", read_state(src))
    return ckpt_dir / "final"


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError as err:
        if is_out_of_space(err):
            raise
        shutil.copy2(src, dst)


def complete_checkpoints(ckpt_dir):
    """{step: folder} of the complete step-* checkpoints (state.json present and readable)."""
    out = {}
    for path in Path(ckpt_dir).glob("step-*"):
        state = read_state(path, missing_ok=True)
        if state is not None:
            out[state["step"]] = path
    return out


def latest_checkpoint(ckpt_dir, max_step=None):
    """The newest complete checkpoint folder (at most `max_step`), or None.

    latest.json names it; when that folder is gone or incomplete (a kill, a deleted marker), or is past
    `max_step` (a run shortened in params), the newest complete step-* folder that fits is used instead.
    """
    pointer = Path(ckpt_dir) / LATEST
    if pointer.exists():
        try:
            path = Path(ckpt_dir) / json.loads(pointer.read_text())["dir"]
        except (OSError, ValueError, KeyError):
            path = None  # a torn pointer: fall back to scanning
        state = read_state(path, missing_ok=True) if path is not None else None
        if state is not None and (max_step is None or state["step"] <= max_step):
            return path
    found = {s: p for s, p in complete_checkpoints(ckpt_dir).items() if max_step is None or s <= max_step}
    return found[max(found)] if found else None


def read_state(path, missing_ok=False):
    """A checkpoint's state.json; None for a missing/unreadable one when missing_ok."""
    try:
        return json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError):
        if missing_ok:
            return None
        raise CheckpointError(
            f"{Path(path) / 'state.json'} is missing or unreadable: the checkpoint is "
            "incomplete; re-run `alphaflow train` for this run (it resumes from the newest "
            "complete checkpoint)"
        ) from None


def load_checkpoint(path, *, net, ema, optimizer, device="cpu", phema=None):
    """Restores net, EMA, optimizer (and the post-hoc EMA profiles) in place; returns (state dict, rng tensors)."""
    path = Path(path)
    net.load_state_dict(load_file(str(path / "model.safetensors"), device=str(device)))
    ema.load_state_dict(load_file(str(path / "ema.safetensors"), device=str(device)))
    if phema is not None:
        if not (path / PHEMA_FILE).exists():
            raise CheckpointError(
                f"{path / PHEMA_FILE} is missing: this checkpoint was written without post-hoc "
                "EMA tracking, so the run cannot resume with it"
            )
        phema.load_state_dict(load_file(str(path / PHEMA_FILE), device=str(device)))
    state = read_state(path)
    if optimizer is not None:
        load_optimizer(
            optimizer, load_file(str(path / "optimizer.safetensors"), device=str(device)), state["param_groups"]
        )
    return state, load_file(str(path / "rng.safetensors"))


def load_weights(path, which="ema", device="cpu"):
    """The EMA or raw weights of a checkpoint folder, for sampling."""
    if which not in WEIGHT_FILES:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_FILES)}, got {which!r}")
    file = Path(path) / WEIGHT_FILES[which]
    if not file.exists():
        raise CheckpointError(f"{file} is missing: train the run first (`alphaflow train --run ...`)")
    expected = read_state(path).get("sha256", {}).get(which)
    if expected is not None and sha256_file(file) != expected:
        raise CheckpointError(
            f"{file} does not match the sha256 in {Path(path) / 'state.json'}: the weights "
            "were changed or damaged after training; delete the run's checkpoints/final and "
            "re-run `alphaflow train` (it resumes from the last step checkpoint)"
        )
    return load_file(str(file), device=str(device))


def rewind(ckpt_dir, path):
    """Makes checkpoint folder `path` the latest (a rollback): latest.json names it first, then the step-* folders
    after it, an abandoned trajectory's, are deleted; a kill in between resumes from `path` all the same."""
    ckpt_dir, step = Path(ckpt_dir), read_state(path)["step"]
    atomic_write_json(ckpt_dir / LATEST, {"dir": Path(path).name, "step": step})
    for later, folder in complete_checkpoints(ckpt_dir).items():
        if later > step:
            shutil.rmtree(folder, ignore_errors=True)


def prune(ckpt_dir, keep_steps, keep_last=2):
    """Deletes step-* folders except the newest `keep_last` and the snapshot steps in keep_steps."""
    dirs = sorted(p for p in Path(ckpt_dir).glob("step-*") if p.is_dir())
    for p in dirs[:-keep_last]:
        if int(p.name.split("-")[1]) not in keep_steps:
            shutil.rmtree(p, ignore_errors=True)
