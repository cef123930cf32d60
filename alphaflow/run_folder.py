"""A training run's folder: the fingerprint its outputs carry, and clearing what other params left there.

`train_fingerprint` is what a run's weights depend on (its settings, the latents' content, a fine-tune source's
weights, and with eval_every the in-training metric's inputs); `discard_stale` moves the final weights of another
fingerprint to `superseded/` and clears the rest, so nothing trained with other settings is resumed or reported.
"""

import json
import os
import shutil

from alphaflow import checkpoint as ckpt
from alphaflow import runlock
from alphaflow.io import sha256_file
from alphaflow.provenance import TRAIN_VOLATILE, file_hash, fingerprint, latents_content_hash, stage_reads
from alphaflow.released import released_file


def changed_keys(saved, current):
    keys = set(saved) | set(current)
    return sorted(
        k
        for k in keys - TRAIN_VOLATILE
        if json.dumps(saved.get(k), default=list) != json.dumps(current.get(k), default=list)
    )


def train_fingerprint(params, run):
    """What the run's outputs depend on: its settings, the latents' content, the fine-tune source's weights
    (and with eval_every, the classifier and reference images of the in-training FD_clf)."""
    upstream = [latents_content_hash(params.latent_dir())]
    if run.eval_every:  # in-training FD_clf: the classifier and the held-out images it is measured against
        needed = (params.classifier_path(), params.data_dir(params.reference_split()) / "manifest.json")
        upstream += [file_hash(p) if p.exists() else None for p in needed]  # missing: the evaluation says so
    if params.init_file(run.name) is not None:  # a released file: its content
        upstream.append("sha256:" + sha256_file(released_file(params, run.name, "init_from")))
    elif run.init_from is not None:
        source = ckpt.read_state(params.run_dir(run.init_from) / "checkpoints" / "final")
        upstream.append(source["fingerprint"] + f"@{source['step']}")
    return fingerprint("train", stage_reads(params, "train", run=run.name), upstream)


def discard_stale(run_dir, latest, fp, run, quiet):
    """Returns the checkpoint to resume from (`latest` when it has this fingerprint), or None after
    clearing the run folder of what other params or data produced.

    Checkpoints, metrics, samples and evaluations of other settings would otherwise be resumed or
    reported under the new ones. Old final weights are kept in superseded/<fingerprint>/ (a rename).
    """
    ckpt_dir = run_dir / "checkpoints"
    old = ckpt.read_state(latest if latest is not None else ckpt_dir / "final", missing_ok=True)
    if latest is not None and old is not None and old.get("fingerprint") == fp:
        return latest
    if not ckpt_dir.exists() and not (run_dir / "metrics.jsonl").exists():
        return None  # a fresh run
    if not quiet:
        why = (
            f"no checkpoint at or before step {run.steps}"
            if old is None or old.get("fingerprint") == fp
            else f"trained with other params or data (changed keys: "
            f"{changed_keys(old.get('run', {}), run.to_dict()) or 'none: upstream data or code'})"
        )
        print(f"[alphaflow] {run.name}: {run_dir}: {why}; starting over", flush=True)
    for lock, holder in runlock.live_locks(run_dir / "samples"):  # clearing samples/ under a live sampler
        raise runlock.RunLocked(
            f"{run.name}: {lock} is held by {runlock.describe(holder)} ({holder.get('what')}): "
            "it still samples the old weights, which this start would clear; wait for it to "
            "end (or stop it), then start again"
        )
    final = ckpt.read_state(ckpt_dir / "final", missing_ok=True)
    if final is not None:
        keep = run_dir / "superseded" / f"{final.get('fingerprint')}-step{final['step']}"
        shutil.rmtree(keep, ignore_errors=True)
        keep.parent.mkdir(parents=True, exist_ok=True)
        os.replace(ckpt_dir / "final", keep)
    for path in (ckpt_dir, run_dir / "samples", run_dir / "eval", run_dir / "plots", run_dir / "phema"):
        shutil.rmtree(path, ignore_errors=True)
    for path in (run_dir / "metrics.jsonl", run_dir / "mlflow_run_id"):
        path.unlink(missing_ok=True)
    return None
