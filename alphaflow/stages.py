"""Data-side stages from a params profile: prepare, encode, classifier; and `launch`.

Each function reads what it needs from the validated params and calls the library (alphaflow.data,
alphaflow.metrics, alphaflow.launch). Paths follow docs/architecture.md.
"""

import os
import sys
from pathlib import Path

from alphaflow.config import PROJECT_ROOT
from alphaflow.errors import MissingInputError

# The library is imported inside each function (lazily): the Snakefile imports this module on a login node,
# where torch must not load (tests/test_cli_errors.py).


# ----------------------------------------------------------------------------
# prepare / encode


def folder_path(params, split):
    data = params.raw["data"]
    path = data.get("ref_path") if split == "test" and data.get("ref_path") else data.get("path")
    path = path or os.environ.get("ALPHAFLOW_IMAGENET")
    if not path:
        raise MissingInputError(
            "params data.path is unset and ALPHAFLOW_IMAGENET is not set: point either at an "
            "ImageNet-style folder (one sub-folder per class)"
        )
    return path


def prepare(params, split="train"):
    from alphaflow.data import prepare_embedded, prepare_folder

    data = params.raw["data"]
    out = params.data_dir(split)
    if data["source"] == "folder":
        manifest = prepare_folder(
            folder_path(params, split),
            out,
            resolution=data.get("resolution") or 256,
            workers=data.get("workers", 2),
            limit_per_class=data.get("limit_per_class"),
        )
    else:
        manifest = prepare_embedded(data["source"], out, split=split, resolution=data.get("resolution"))
    print(f"[alphaflow] prepare {split}: {manifest['count']} images → {out}")
    return manifest


def encode(params, part=0, num_parts=1, finalize=False, device=None):
    from alphaflow.data import build_encoder, encode_dataset, finalize_latents
    from alphaflow.distributed import resolve_device

    # Lazy imports in the stage functions keep torch off the login node (the Snakefile imports this module).
    out, device = params.latent_dir(), resolve_device(device)
    if not finalize:
        encode_dataset(
            params.data_dir("train"),
            out,
            build_encoder(**params.encoder_args(), device=device),
            batch_size=params.raw["encoder"].get("batch_size", 64),
            part=part,
            num_parts=num_parts,
            device=device,
        )
    if finalize or num_parts == 1:
        manifest = finalize_latents(out, num_parts=num_parts, seed=params.raw["seed"])
        print(f"[alphaflow] encode: {manifest['count']} latents {manifest['latent_shape']} → {out}")


# ----------------------------------------------------------------------------
# The FD_classifier network


def classifier(params, device=None):
    """Trains the small CNN whose features give the fast, clearly labelled demo metric (FD_classifier)."""
    from alphaflow.classifier import train_classifier
    from alphaflow.data import load_prepared
    from alphaflow.distributed import resolve_device

    images, labels, _ = load_prepared(params.data_dir("train"))
    val_images, val_labels, _ = load_prepared(params.data_dir("test"))
    info = train_classifier(
        images,
        labels,
        out_path=params.classifier_path(),
        epochs=params.raw["eval"].get("classifier_epochs", 2),
        seed=params.raw["seed"],
        device=resolve_device(device),
        val_images=val_images,
        val_labels=val_labels,
    )
    print(f"[alphaflow] classifier: {info}")
    return info


# ----------------------------------------------------------------------------
# launch: a stage as a submitit job


def launch_stage(params, stage, stage_args, *, params_path, overrides=(), executor=None, run=None, array_parts=None):
    """Runs `alphaflow <stage> --params ... <stage_args>` in-process (executor none) or as a submitit job."""
    from alphaflow.launch import Resources, launch

    executor = executor or params.raw.get("executor", "none")
    base = [sys.executable, "-m", "alphaflow", stage, "--params", str(params_path)]
    for item in overrides:
        base += ["--set", item]
    if stage == "train" and run and "--run" not in stage_args:
        base += ["--run", run]
    command = base + list(stage_args)
    array = None
    if array_parts:
        array = [["--part", str(i), "--num-parts", str(array_parts)] for i in range(array_parts)]
    if executor == "none":
        import subprocess

        todo = array or [[]]
        codes = [subprocess.run(command + extra, cwd=PROJECT_ROOT).returncode for extra in todo]
        return next((c for c in codes if c), 0)
    resources = Resources(**params.resources(stage, run))
    name = f"af-{stage}" + (f"-{run}" if run else "")
    log_dir = Path(params.results) / "logs" / "launch" / (run or stage)
    return launch(command, executor=executor, resources=resources, log_dir=log_dir, job_name=name, array=array)
