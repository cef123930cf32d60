"""The train stage of a run whose weights come from a released file (runs.<run>.checkpoint).

    alphaflow train --params params/released.yaml --run alphaflow-XL-2-plus-cfg

imports the authors' snapshot into `checkpoints/final/` in this project's own format — model.safetensors (raw),
ema.safetensors (EMA), state.json with the file's sha256 as provenance — instead of training. Everything
downstream (sampling, evaluation, the report) reads it as it reads a trained run. The fingerprint holds the
file's sha256: the same file is imported once, a changed file is imported again.
"""

import json
import shutil

from alphaflow import checkpoint as ckpt
from alphaflow.io import sha256_file
from alphaflow.errors import MissingInputError, UserError
from alphaflow.provenance import fingerprint, stage_reads

SOURCE_FORMAT = "alphaflow-official-snapshot"


def released_file(params, run_name, key="checkpoint"):
    """The run's released file (checkpoint or init_from), which must exist."""
    path = params.checkpoint_file(run_name) if key == "checkpoint" else params.init_file(run_name)
    if not path.is_file():
        value = getattr(params.run(run_name), key)
        raise MissingInputError(
            f"params key 'runs.{run_name}.{key}' = {value!r}: {path} does not exist. Download the released "
            "checkpoints (Hugging Face snap-research/alphaflow) on a machine with internet, put them in "
            "released/ of this project or in a folder named by $ALPHAFLOW_RELEASED (see the README, 'Check the "
            "pipeline against the paper')."
        )
    return path


def data_num_classes(params):
    """Classes of the prepared training data (the label table the imported network must have)."""
    manifest = params.data_dir("train") / "manifest.json"
    if not manifest.exists():
        raise MissingInputError(
            f"{manifest} is missing: run `alphaflow prepare --params {params.path}` first "
            "(the imported network's label table is checked against the data's classes)"
        )
    return json.loads(manifest.read_text())["num_classes"]


def import_fingerprint(params, run_name, file_sha):
    return fingerprint("train", stage_reads(params, "train", run=run_name), [f"sha256:{file_sha}"])


def import_released(params, run_name, *, quiet=False):
    """Imports runs.<run>.checkpoint into checkpoints/final/ (once per file content); returns its state."""
    from alphaflow.official import load_official_weight_sets, official_preset

    run = params.run(run_name)
    path = released_file(params, run_name)
    file_sha = sha256_file(path)
    fp = import_fingerprint(params, run_name, file_sha)
    ckpt_dir = params.run_dir(run_name) / "checkpoints"
    finished = ckpt.read_state(ckpt_dir / "final", missing_ok=True)
    if finished is not None and finished.get("fingerprint") == fp:
        if not quiet:
            print(f"[alphaflow] {run_name}: already imported from {path} (sha256 {file_sha[:16]})")
        return finished
    if run.model_overrides:
        raise UserError(
            f"params key 'runs.{run_name}.model_overrides' = {run.model_overrides}: a run imported from "
            "a released file has the shapes of its preset; remove the overrides"
        )
    sets = load_official_weight_sets(path, data_num_classes(params))
    preset = official_preset(sets["ema"], path)
    if preset != run.model:
        raise UserError(
            f"params key 'runs.{run_name}.model' = {run.model!r}, but {path} holds a {preset} network: "
            f"set model: {preset}"
        )
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # whatever was trained or imported here before
    state = {
        "step": run.steps,
        "fingerprint": fp,
        "run": run.to_dict(),
        "source": {"format": SOURCE_FORMAT, "file": str(path), "sha256": file_sha, "preset": preset},
    }
    final = ckpt.write_final(ckpt_dir, sets, state)
    if not quiet:
        print(f"[alphaflow] {run_name}: imported {preset} weights (EMA and raw) from {path} → {final}")
    return ckpt.read_state(final)
