"""Encoding: prepared image shards → latent shards (in parts that can run as separate array jobs, each
resumable per shard), then finalize: verify every shard, estimate the per-element statistics, write the
manifest. The directory's layout and the reading side are alphaflow.data.latents."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from alphaflow.io import atomic_write_json, sha256_file

from .latents import (
    PART_NAME,
    SHARD_NAME,
    STATS,
    STATS_EPS,
    STATS_STREAM,
    STD_FLOOR,
    STORE_DTYPE,
    map_latent_shard,
    posterior_sample,
    rebuild_hint,
    stream_seed,
)
from .prepare import iter_prepared_shards
from .shards import FORMAT, MANIFEST, ShardError, read_json, read_manifest, shard_is_current, write_shard


# ----------------------------------------------------------------------------
# Encoding (one part of num_parts; parts can run as separate array jobs).


def part_shards(num_shards: int, part: int, num_parts: int) -> range:
    """Contiguous block of prepared shards that `part` encodes."""
    return range(num_shards * part // num_parts, num_shards * (part + 1) // num_parts)


def encode_dataset(data_dir, out_dir, encoder, *,
                   batch_size: int = 64,                   # images per encoder call
                   part: int = 0,                          # which part of the shards to encode
                   num_parts: int = 1,                     # 1 = everything in this call
                   device="cpu",                           # where the images are sent
                   ) -> dict:  # fmt: skip
    """Encode prepared shards part_shards(K, part, num_parts) into latent shards. Resumable."""
    if not (isinstance(num_parts, int) and num_parts >= 1 and isinstance(part, int) and 0 <= part < num_parts):
        raise ValueError(f"need 0 <= part < num_parts, got part={part!r}, num_parts={num_parts!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    data = read_manifest(data_dir, hint=f"Run `alphaflow prepare` to create {data_dir}.")
    record = {
        "format": FORMAT,
        "part": part,
        "num_parts": num_parts,
        "complete": False,
        "encoder": encoder.name,
        "encoder_fingerprint": getattr(encoder, "fingerprint", encoder.name),
        "image_shape": data["image_shape"],
        "latent_shape": list(encoder.latent_shape(tuple(data["image_shape"]))),  # (c, h, w)
        "num_classes": data["num_classes"],
        "class_names": data["class_names"],
        "data_dir": str(data_dir.resolve()),
        "data_manifest_sha256": sha256_file(data_dir / MANIFEST),
        "num_data_shards": len(data["shards"]),
        "shards": {},
    }
    path = out_dir / PART_NAME.format(part, num_parts)
    indices = part_shards(len(data["shards"]), part, num_parts)
    done = _previous_part_shards(path, record, data)
    todo = [i for i in indices if str(i) not in done]
    out_dir.mkdir(parents=True, exist_ok=True)
    if todo and (out_dir / MANIFEST).exists():
        os.remove(out_dir / MANIFEST)  # stale until finalize_latents runs again
    record["shards"] = {k: v for k, v in done.items() if int(k) in indices}

    bar = tqdm(
        total=sum(data["shards"][i]["count"] for i in indices),
        unit="img",
        disable=None,
        initial=sum(data["shards"][i]["count"] for i in indices if i not in todo),
        desc=f"encode {encoder.name} part {part}/{num_parts}",
        dynamic_ncols=True,
    )
    for i, images, labels, src in iter_prepared_shards(data_dir, indices=todo):
        mean, logvar = _encode_array(encoder, images, batch_size, device, bar)
        arrays = {"mean": mean, "labels": labels}
        if logvar is not None:
            arrays["logvar"] = logvar
        sha = write_shard(out_dir / SHARD_NAME.format(i), arrays)
        record["shards"][str(i)] = {
            "file": SHARD_NAME.format(i),
            "count": len(labels),
            "sha256": sha,
            "source_sha256": src["sha256"],
            "has_logvar": logvar is not None,
        }
        atomic_write_json(path, record)
    bar.close()
    record["complete"] = True
    atomic_write_json(path, record)
    return record


def _encode_array(encoder, images: np.ndarray, batch_size: int, device, bar):
    """uint8 [n,C,H,W] -> (mean f16 [n,c,h,w], logvar f16 [n,c,h,w] | None)."""
    means, logvars = [], []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).to(device)  # [B,C,H,W] uint8
        mean, logvar = encoder.encode(x)
        means.append(_to_store(mean))
        if logvar is not None:
            logvars.append(_to_store(logvar))
        bar.update(len(x))
    c, h, w = encoder.latent_shape(images.shape[1:])
    empty = np.zeros((0, c, h, w), STORE_DTYPE)
    mean = np.concatenate(means) if means else empty
    logvar = np.concatenate(logvars) if logvars else None
    for name, array in (("mean", mean), ("logvar", logvar)):
        if array is not None and not np.isfinite(array).all():
            raise ValueError(f"encoder {encoder.name} produced non-finite {name} values (or beyond float16 range)")
    return mean, logvar


def _to_store(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float16).cpu().numpy()  # cast before the device->host copy: half the bytes


def _previous_part_shards(path: Path, record: dict, data: dict) -> dict:
    """Finished latent shards of an earlier run of this part that are still valid."""
    if not path.exists():
        return {}
    try:
        previous = read_json(path)
    except ShardError:
        return {}
    same = all(previous.get(k) == record[k] for k in ("encoder_fingerprint", "latent_shape", "image_shape"))
    if not same:
        return {}
    return {
        k: v
        for k, v in previous.get("shards", {}).items()
        if int(k) < len(data["shards"])
        and v["source_sha256"] == data["shards"][int(k)]["sha256"]
        and shard_is_current(path.parent / v["file"], v["sha256"])
    }


# ----------------------------------------------------------------------------
# Finalize: verify everything, write manifest.json and per-element stats.


def _read_parts(out_dir: Path, num_parts: int) -> list[dict]:
    parts = []
    for p in range(num_parts):
        path = out_dir / PART_NAME.format(p, num_parts)
        todo = f"Run `alphaflow encode` with part={p}, num_parts={num_parts} for {out_dir} first."
        rec = read_json(path, hint=todo)
        if not rec.get("complete"):
            raise ShardError(f"{path}: part {p} of {num_parts} is unfinished. {todo}")
        parts.append(rec)
    keys = ("encoder_fingerprint", "latent_shape", "image_shape", "data_manifest_sha256", "num_data_shards")
    for rec in parts[1:]:
        for key in keys:
            if rec[key] != parts[0][key]:
                raise ShardError(
                    f"{out_dir}: parts disagree on {key} ({parts[0][key]!r} vs {rec[key]!r}); "
                    f"they were encoded from different data or encoders. "
                    f"Delete {out_dir} and encode again."
                )
    return parts


def finalize_latents(out_dir, *,
                     num_parts: int = 1,                   # how many encode parts to collect
                     stats_samples: int = 2048,            # posterior samples for the stats (paper: 2048)
                     seed: int = 0,                        # picks the samples and their noise
                     ) -> dict:  # fmt: skip
    """Verify every latent shard, write stats.safetensors (per element) and manifest.json."""
    out_dir = Path(out_dir)
    parts = _read_parts(out_dir, num_parts)
    first = parts[0]
    shards = {int(k): v for rec in parts for k, v in rec["shards"].items()}
    if sorted(shards) != list(range(first["num_data_shards"])):
        missing = sorted(set(range(first["num_data_shards"])) - set(shards))
        raise ShardError(f"{out_dir}: latent shards {missing} are missing. {rebuild_hint(out_dir)}")
    records = [
        {"file": shards[i]["file"], "count": shards[i]["count"], "sha256": shards[i]["sha256"]}
        for i in range(len(shards))
    ]
    count = sum(r["count"] for r in records)
    has_logvar = {bool(v["has_logvar"]) for v in shards.values()}
    if len(has_logvar) != 1:
        raise ShardError(f"{out_dir}: some latent shards have a logvar and some do not. {rebuild_hint(out_dir)}")
    has_logvar = has_logvar.pop()
    mean, std, n, floored = _estimate_stats(out_dir, records, count, stats_samples, seed)
    stats_sha = write_shard(out_dir / STATS, {"mean": mean, "std": std})
    # fmt: off
    manifest = {
        "format": FORMAT,
        "kind": "latents",
        "count": count,
        "num_classes": first["num_classes"],
        "class_names": first["class_names"],
        "image_shape": first["image_shape"],                     # (C, H, W)
        "latent_shape": first["latent_shape"],                   # (c, h, w)
        "encoder": first["encoder"],
        "encoder_fingerprint": first["encoder_fingerprint"],
        "has_logvar": has_logvar,
        "dtype": np.dtype(STORE_DTYPE).name,
        "shards": records,
        "stats": {"file": STATS, "sha256": stats_sha, "samples": n, "seed": seed, "eps": STATS_EPS,
                  "std_floor": f"{STD_FLOOR} * median(std)", "floored_elements": floored},
        "source": {"data_dir": first["data_dir"], "data_manifest_sha256": first["data_manifest_sha256"]},
        "num_parts": num_parts,
    }
    # fmt: on
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def _estimate_stats(out_dir: Path, records: list[dict], count: int, stats_samples: int, seed: int):
    """Per-element mean/std [1,c,h,w] of posterior samples at `stats_samples` random indices;
    every shard is read (and verified) once on the way."""
    if count == 0:
        raise ShardError(f"{out_dir}: no latents to compute statistics from")
    n = min(stats_samples, count)
    rng = np.random.default_rng(stream_seed(seed, STATS_STREAM))
    chosen = np.sort(rng.choice(count, size=n, replace=False))
    # Streaming float64 sums of (z − ref) and (z − ref)², ref = first sample (shifted moments:
    # no cancellation, memory independent of n).
    ref, s1, s2, offset = None, 0.0, 0.0, 0
    for rec in records:
        arrays = map_latent_shard(out_dir, rec)
        hits = chosen[(chosen >= offset) & (chosen < offset + rec["count"])]  # global indices
        for start in range(0, len(hits), 256):
            g = hits[start : start + 256]
            rows = g - offset
            z = posterior_sample(
                arrays["mean"][rows], arrays["logvar"][rows] if "logvar" in arrays else None, g, (seed, STATS_STREAM)
            ).double()  # [b, c, h, w]
            ref = z[:1].clone() if ref is None else ref
            d = z - ref
            s1, s2 = s1 + d.sum(0, keepdim=True), s2 + (d * d).sum(0, keepdim=True)
        offset += rec["count"]
    mean_d = s1 / n
    var = (s2 / n - mean_d * mean_d).clamp_min(0)  # [1, c, h, w]
    mean = ref + mean_d
    std = torch.sqrt(var + STATS_EPS)
    # Deviation from the paper (which only saw SD-VAE latents): an element that happens to be
    # constant in the 2048 samples but not in the data (a Fashion-MNIST corner pixel does) would
    # get std 1e-8 and blow up to ~1e7 after normalisation. Flooring std at a tenth of the median
    # keeps the map invertible; it is not expected to bind for SD-VAE latents (element stds within
    # a small factor of each other) and manifest["stats"]["floored_elements"] says if it did.
    floor = STD_FLOOR * std.median()
    floored = int((std < floor).sum())
    std = torch.maximum(std, floor)
    return mean.float().numpy(), std.float().numpy(), n, floored
