"""What produced a stage output: the params keys the stage reads, its upstream outputs, the code version.

The declarative promise (a changed input never yields a stale result) rests on three things:

1. `stage_reads(params, stage, ...)` is the one list of params values a stage's OUTPUT depends on. The
   Snakefile hands it to each rule as `params: reads=...` (Snakemake re-runs a job whose params changed),
   dvc.yaml lists the same keys (a test checks), and the stage hashes it into its fingerprint.
   Keys that only change how or where a stage runs (resources, executor, workers, log cadence, encoder
   batch size) are not in it: changing them re-runs nothing.
2. `fingerprint(stage, reads, upstream)`: sha256 of the stage name, its CODE_VERSION, the reads and the
   content hashes of its upstream outputs. Every output records it (final/state.json, samples done.json,
   eval JSON); a stage that finds an existing output or partial work with another fingerprint discards it
   and recomputes, one with the same fingerprint reuses it (cheap resume).
3. CODE_VERSION: bump a stage's number when a code change alters what it writes for the same inputs.
   (Hashing the source instead would retrain a 2,000 GPU-hour profile for a comment.)
"""

import json
from pathlib import Path

from alphaflow.config import eval_protocol
from alphaflow.io import sha256_file, sha256_json

# Bump when a change of the code changes the stage's output for the same params and inputs.
CODE_VERSION = {
    "prepare": 1,
    "encode": 1,
    "classifier": 1,
    "reference": 1,
    "train": 2,
    "sample": 2,
    "evaluate": 2,
    "report": 1,
}

# Training settings that do not change the trained weights: cadence of logs/checkpoints/evaluation,
# bookkeeping, resources, and how the same arithmetic is carried out (jvp_mode, compile: they change float
# rounding only, like the number of GPUs). `steps` is handled apart: a larger count extends a finished run.
TRAIN_VOLATILE = frozenset(
    {
        "log_every",
        "checkpoint_every",
        "snapshot_every",
        "conflict_every",
        "conflict_batch",
        "paper_row",
        "resources",
        "steps",
        "eval_every",
        "group",
        "jvp_mode",
        "compile",
        # how a diverging run reacts: a rollback records the batches it skipped in the run
        "divergence",
        "divergence_window",
        "divergence_events",
        "spike_factor",
        "max_rollbacks",
    }
)


def pick(mapping, keys):
    return {k: mapping.get(k) for k in keys}


def stage_reads(params, stage, *, split=None, run=None, weights=None, sampler=None):
    """The params values the output of `stage` (for this split/run/weights/sampler) depends on, with the
    stage's CODE_VERSION (so Snakemake's params trigger re-runs a stage whose code version was bumped)."""
    reads = params_read(params, stage, split=split, run=run, weights=weights, sampler=sampler)
    return {**reads, "code_version": CODE_VERSION[stage]}


def params_read(params, stage, *, split=None, run=None, weights=None, sampler=None):
    raw, ev = params.raw, params.raw["eval"]
    if stage == "prepare":
        return {
            "data": pick(raw["data"], ("name", "source", "path", "ref_path", "resolution", "limit_per_class")),
            "split": split,
        }
    if stage == "encode":  # the seed picks the latent-statistics samples
        return {"seed": raw["seed"], "encoder": pick(raw["encoder"], ("kind", "path"))}
    if stage == "classifier":
        return {"seed": raw["seed"], "classifier_epochs": ev.get("classifier_epochs", 2)}
    if stage == "reference":
        reads = {"eval": pick(ev, ("metrics", "ref_samples", "fid_ref_samples", "inception"))}
        if eval_protocol(ev) == "alphaflow":  # real images take the official round trip (the others: as before)
            reads["protocol"] = "alphaflow"
        return reads
    if stage == "train":  # + what the in-training FD_clf records in metrics.jsonl depend on, when on
        cfg = params.run(run)
        reads = {"run": train_settings(cfg)}
        if cfg.eval_every:
            reads["in_training_eval"] = pick(ev, ("train_eval_samples", "labels", "samplers", "ref_samples"))
        return reads
    if stage == "sample":
        chosen = params.samplers[sampler]
        keys = ("t_steps", "mode", "labels") if "labels" in chosen else ("t_steps", "mode")  # others: as before
        reads = {
            "sampler": pick(chosen, keys),
            "weights": weights,
            "eval": pick(ev, ("num_samples", "labels", "batch_size", "parts")),
            "decoder": params_read(params, "encode")["encoder"],
        }
        if eval_protocol(ev) != "default":  # only then (the default protocol's samples keep their fingerprint)
            reads["protocol"] = "alphaflow"  # alphaflow and adm sample alike (noise streams, uint8 truncation)
        return reads
    if stage == "evaluate":
        slow = ev.get("slow_metric_weights") or ev["weights"]
        reads = {
            "seed": raw["seed"],
            "slow_metrics": weights in slow,
            "eval": pick(ev, ("metrics", "n_boot", "fid_samples", "fid_ref_samples", "ref_samples", "inception")),
        }
        if eval_protocol(ev) == "adm":  # FID against the ADM reference batch
            reads["adm_reference"] = ev["adm_reference"]
        return reads
    if stage == "report":  # tables and plots name runs, their settings, groups, seeds, samplers, metrics
        shown = TRAIN_VOLATILE - {"steps", "group", "paper_row"}
        runs = {
            name: {
                k: v
                for k, v in params.run(name).to_dict().items()
                if k not in shown
                and not (k == "checkpoint" and v is None)  # trained runs: as before
                and not (k == "skip_batches" and not v)
            }
            for name in params.run_names
        }
        reads = {
            "profile": raw["profile"],
            "paper_results": raw.get("paper_results", {}),
            "comparisons": raw.get("comparisons"),
            "runs": runs,
            "eval": pick(ev, ("samplers", "metrics", "weights")),
        }
        if ev.get("phema_samplers"):  # only profiles that restrict them (the others' reads stay as they were)
            reads["eval"]["phema_samplers"] = ev["phema_samplers"]
        if "preregistered" in raw:  # only profiles that declare a test (the others' reads stay as they were)
            reads["preregistered"] = raw["preregistered"]
        return reads
    raise ValueError(f"unknown stage {stage!r}")


PHEMA_KEYS = ("phema_every", "phema_sigma_rels", "phema_dtype")


def train_settings(run):
    """A run's settings that change its outputs (everything but TRAIN_VOLATILE; the post-hoc EMA keys only
    when its snapshots are on, so runs without them keep their fingerprint)."""
    if run.checkpoint is not None:  # imported, not trained: only the file (its sha256 is upstream) and the model
        return {"model": run.model, "checkpoint": run.checkpoint}
    skip = TRAIN_VOLATILE if run.phema_every else TRAIN_VOLATILE | set(PHEMA_KEYS)
    skip = skip | {"checkpoint"}  # None here: runs without one keep their fingerprint
    if not run.skip_batches:  # runs that skip nothing keep their fingerprint
        skip = skip | {"skip_batches"}
    return {k: v for k, v in run.to_dict().items() if k not in skip}


def fingerprint(stage, reads, upstream=()):
    """sha256 (16 hex) of the stage, what it reads (stage_reads: with its code version) and its upstream
    content hashes."""
    record = {"stage": stage, "reads": reads, "upstream": list(upstream)}
    return sha256_json(record)[:16]


def file_hash(path):
    """Content hash of a small marker/manifest file (manifests carry their shards' checksums)."""
    return sha256_file(path)[:16]


def latents_content_hash(latent_dir):
    """Hash of what training reads from the latents (shard and statistics checksums, shapes), not of
    where the data came from: the same latents rebuilt elsewhere keep their hash."""
    manifest = json.loads((Path(latent_dir) / "manifest.json").read_text())
    keep = {k: manifest.get(k) for k in ("count", "latent_shape", "num_classes", "encoder_fingerprint", "dtype")}
    keep["shards"] = [s["sha256"] for s in manifest["shards"]]
    keep["stats"] = manifest["stats"]["sha256"]
    return sha256_json(keep)[:16]
