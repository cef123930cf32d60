"""The sample stage: generated images of one run × weights × sampler (paper Alg. 3; the official protocol).

    alphaflow sample --params P --run R --weights ema --sampler 1nfe [--part I --num-parts N]

Sample i uses seed i (noise from its own generator) and label RandomState(i).choice(num_classes)
("random", paper Table 1) or i mod num_classes ("balanced", Table 6 †), so a sample is the same
whichever part or batch it is generated in. Samples go to uint8 safetensors chunks, each checksummed,
in a folder named by the samples' fingerprint (the weights' sha256, the sampler, labels, counts, decoder:
`sample_fingerprint`): finished chunks of the same fingerprint are skipped on restart, chunks of any other
(a retrained run, a changed sampler) are never read and are removed when the new set is done.
"""

import contextlib
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from tqdm import tqdm

from alphaflow import checkpoint as ckpt
from alphaflow import runlock
from alphaflow.adm import write_adm_npz
from alphaflow.config import ParamsError, eval_protocol, phema_sigma_rel, protocol_rounding
from alphaflow.data import build_encoder
from alphaflow.data.shards import ShardError
from alphaflow.distributed import resolve_device
from alphaflow.io import atomic_write_bytes, atomic_write_json, sha256_file
from alphaflow.phema import ensure_posthoc
from alphaflow.provenance import fingerprint, stage_reads
from alphaflow.sampling import protocol_noise, sample

# ----------------------------------------------------------------------------
# Labels and seeds


def labels_for_seeds(seeds, num_classes, protocol):
    """Class label per seed: "random" = RandomState(seed).choice(C) (EDM convention), "balanced" = seed mod C."""
    if protocol == "balanced":
        return np.asarray([s % num_classes for s in seeds], dtype=np.int64)
    return np.asarray([np.random.RandomState(s).choice(num_classes) for s in seeds], dtype=np.int64)


def part_range(n, part, num_parts):
    if not 0 <= part < num_parts:
        raise ValueError(f"need 0 <= part < num_parts, got part={part}, num_parts={num_parts}")
    return n * part // num_parts, n * (part + 1) // num_parts


# ----------------------------------------------------------------------------
# Loading a trained run


def weight_set_file(params, run_name, weights):
    """The file of a weight set: checkpoints/final/{ema,model}.safetensors, or for `phema-<σ_rel>` the post-hoc
    EMA reconstructed from the run's snapshots (alphaflow.phema, made on first use)."""
    sigma_rel = phema_sigma_rel(weights)
    if sigma_rel is not None:
        return ensure_posthoc(params, run_name, sigma_rel)
    return params.run_dir(run_name) / "checkpoints" / "final" / ckpt.WEIGHT_FILES[weights]


def load_weight_set(params, run_name, weights, device):
    if phema_sigma_rel(weights) is not None:
        return load_file(str(weight_set_file(params, run_name, weights)), device=str(device))
    return ckpt.load_weights(params.run_dir(run_name) / "checkpoints" / "final", weights, device)


def load_run_net(params, run_name, weights, device):
    """The run's DiT with one weight set (ema, raw, phema-<σ_rel>) and its latent statistics."""
    from alphaflow.models import build_model  # (timm) only where a network is built

    run = params.run(run_name)
    state = load_weight_set(params, run_name, weights, device)
    c, h, _ = state["latent_mean"].shape[1:]
    num_classes = state["y_embedder.table.weight"].shape[0] - 1
    net = build_model(run.model, num_classes=num_classes, input_size=h, in_channels=c, **run.model_overrides)
    net.load_state_dict(state)
    return net.to(device).eval()


def generate(net, encoder, seeds, labels, sampler, device, autocast, protocol="default"):
    """uint8 images for the given seeds/labels with one sampler entry of params, under an evaluation protocol
    (params eval.protocol): its noise streams (sampling.protocol_noise) and its uint8 conversion."""
    shape = (net.in_channels, net.latent_mean.shape[-2], net.latent_mean.shape[-1])
    # default: fresh noise of consistency sampling from its own per-sample stream, offset from the initial
    # noise; alphaflow/adm: the next draws of each seed's own generator (the official code's).
    noise, fresh = protocol_noise(seeds, shape, device=device, protocol=protocol)
    y = torch.as_tensor(labels, device=device)
    with autocast():
        x = sample(net, noise, y, sampler["t_steps"], mode=sampler["mode"], generator=fresh)
        latents = net.denormalize(x.float())
        if protocol == "default":
            return encoder.decode(latents)
        return encoder.decode(latents, rounding=protocol_rounding(protocol))


def sample_fingerprint(params, run_name, weights, sampler_name, num_parts=None):
    """What a sample set depends on: the weights file's sha256 (recorded at training), the sampler,
    labels, counts and batching (batch size, parts: batched kernels need not be bit-equal across batch
    shapes), the decoder. num_parts: the parts it is sampled in (None = params eval.parts)."""

    final = params.run_dir(run_name) / "checkpoints" / "final"
    weights_sha = ckpt.read_state(final).get("sha256", {}).get(weights)
    if weights_sha is None:  # a post-hoc EMA, or a checkpoint from before checksums were recorded
        weights_sha = sha256_file(weight_set_file(params, run_name, weights))
    reads = stage_reads(params, "sample", weights=weights, sampler=sampler_name)
    if num_parts is not None:
        reads["eval"]["parts"] = num_parts
    reads["eval"]["parts"] = reads["eval"]["parts"] or 1
    return fingerprint("sample", reads, [weights_sha])


def sample_run(params, run_name, weights, sampler_name, *, part=0, num_parts=1, device=None, quiet=False):
    """Generates this part's seeds into checksummed chunks; writes done.json when every part is there.

    Holds the part's lock `<samples folder>/.lock-part-<i>-of-<n>` (alphaflow.runlock) meanwhile: the parts
    of one cell write the folder in parallel, two writers of one part end with runlock.RunLocked (exit 2)."""
    if sampler_name not in params.samplers:
        raise ParamsError(f"unknown sampler {sampler_name!r}; params eval.samplers has {sorted(params.samplers)}")
    lock = params.samples_dir(run_name, weights, sampler_name) / f".lock-part-{part}-of-{num_parts}"
    with runlock.hold(lock, f"sample {run_name}/{weights}/{sampler_name} part {part} of {num_parts}"):
        return _sample_part(
            params, run_name, weights, sampler_name, part=part, num_parts=num_parts, device=device, quiet=quiet
        )


def _sample_part(params, run_name, weights, sampler_name, *, part, num_parts, device, quiet):
    """sample_run's body, under the part's lock."""
    device = torch.device(resolve_device(device))
    ev = params.raw["eval"]
    sampler = params.samplers[sampler_name]
    out = params.samples_dir(run_name, weights, sampler_name)
    fp = sample_fingerprint(params, run_name, weights, sampler_name, num_parts)
    chunk_dir = out / f"chunks-{fp}"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    n, batch = ev["num_samples"], ev.get("batch_size", 256)
    start, end = part_range(n, part, num_parts)
    net = load_run_net(params, run_name, weights, device)
    encoder = build_encoder(**params.encoder_args(), device=device)
    num_classes = net.num_classes
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else no_autocast
    chunks = [(s, min(s + batch, end)) for s in range(start, end, batch)]
    t0 = time.perf_counter()
    for lo, hi in tqdm(chunks, disable=quiet, desc=f"sample {run_name}/{weights}/{sampler_name}"):
        path = chunk_dir / f"seeds-{lo:07d}-{hi:07d}.safetensors"
        if path.exists():
            continue  # finished chunk of this fingerprint (atomic writes: it is complete)
        seeds = list(range(lo, hi))
        labels = labels_for_seeds(seeds, num_classes, sampler.get("labels") or ev.get("labels", "random"))
        images = generate(net, encoder, seeds, labels, sampler, device, autocast, eval_protocol(ev))
        atomic_write_bytes(
            path,
            st_save(
                {
                    "images": images.cpu().contiguous(),
                    "labels": torch.as_tensor(labels),
                    "seeds": torch.as_tensor(seeds),
                }
            ),
            what=f"the sample chunk of seeds {lo}…{hi - 1} of {run_name}/{weights}/{sampler_name}",
        )
    elapsed = time.perf_counter() - t0
    atomic_write_json(chunk_dir / f"part-{part}-of-{num_parts}.json", {"start": start, "end": end, "seconds": elapsed})
    if all((chunk_dir / f"part-{i}-of-{num_parts}.json").exists() for i in range(num_parts)):
        write_samples_manifest(out, chunk_dir, n, batch, num_parts, sampler, fp)
    if not quiet:
        print(
            f"[alphaflow] sample {run_name}/{weights}/{sampler_name}: seeds {start}…{end - 1} "
            f"({(end - start) / max(elapsed, 1e-9):.1f} images/s)"
        )


def no_autocast():
    return contextlib.nullcontext()


def chunk_files(out, n, batch, num_parts):
    files = []
    for part in range(num_parts):
        start, end = part_range(n, part, num_parts)
        files += [out / f"seeds-{s:07d}-{min(s + batch, end):07d}.safetensors" for s in range(start, end, batch)]
    return files


def write_samples_manifest(out, chunk_dir, n, batch, num_parts, sampler, fp):
    files = chunk_files(chunk_dir, n, batch, num_parts)
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise ShardError(f"{chunk_dir}: chunks missing: {missing[:5]} — rerun `alphaflow sample` for the missing parts")
    atomic_write_json(
        out / "done.json",
        {
            "count": n,
            "sampler": sampler,
            "num_parts": num_parts,
            "fingerprint": fp,
            "chunks": [{"file": f"{chunk_dir.name}/{f.name}", "sha256": sha256_file(f)} for f in files],
        },
    )
    for stale in out.iterdir():  # sample sets of other fingerprints (and the older flat layout)
        if stale != chunk_dir and (
            stale.name.startswith("chunks-") or stale.name.startswith("seeds-") or stale.name.startswith("part-")
        ):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


def finished_fingerprint(out):
    """The fingerprint the finished sample set in `out` records in its done.json (None when there is none)."""
    try:
        return json.loads((Path(out) / "done.json").read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None


def samples_parts(out):
    """How many parts the finished sample set in `out` was generated in (None when unfinished)."""
    path = Path(out) / "done.json"
    return json.loads(path.read_text())["num_parts"] if path.exists() else None


def load_samples(out, fingerprint=None):
    """(images uint8 [N,C,H,W], labels [N]) of a finished sample folder, checksums verified; with
    `fingerprint`, the folder must hold the sample set of that fingerprint (not an older one)."""
    out = Path(out)
    manifest_path = out / "done.json"
    if not manifest_path.exists():
        raise ShardError(f"{manifest_path} is missing: run `alphaflow sample` for this run/weights/sampler first")
    manifest = json.loads(manifest_path.read_text())
    if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
        raise ShardError(
            f"{out} holds samples of other weights or settings (fingerprint "
            f"{manifest.get('fingerprint')}, expected {fingerprint}): run `alphaflow sample` again"
        )
    images, labels = [], []
    for rec in manifest["chunks"]:
        data = (out / rec["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != rec["sha256"]:
            raise ShardError(f"{out / rec['file']} fails its sha256 — delete it and rerun `alphaflow sample`")
        tensors = st_load(data)
        images.append(tensors["images"])
        labels.append(tensors["labels"])
    return torch.cat(images), torch.cat(labels)


def export_npz(params, run_name, weights, sampler_name, path, labels=True):
    """The finished sample set of one cell as an ADM evaluator batch .npz (arr_0 uint8 N×H×W×3, grey repeated
    to RGB; arr_1 int64 labels), written atomically; returns (path, count)."""

    if sampler_name not in params.samplers:
        raise ParamsError(f"unknown sampler {sampler_name!r}; params eval.samplers has {sorted(params.samplers)}")
    out = params.samples_dir(run_name, weights, sampler_name)
    fp = sample_fingerprint(params, run_name, weights, sampler_name, samples_parts(out))
    images, sample_labels = load_samples(out, fingerprint=fp)
    write_adm_npz(path, images, sample_labels if labels else None)
    return Path(path), len(images)
