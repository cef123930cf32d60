"""Prepare images + labels as checksummed uint8 shards (results/data/<dataset>/).

Image preprocessing follows the official code (the FID reference uses the same images):
convert to RGB, centre-crop to a square, resize with Lanczos (PIL). No augmentation. Class
ids come from the sorted class-folder order (the ImageNet synset order).

Layout of a prepared dataset directory:
  images-00000.safetensors ...   {"images": uint8 [n, C, H, W], "labels": int64 [n]}
  manifest.json                   count, classes, image shape, sha256 per shard, corrupt files
  progress.json                   only while a run is unfinished (resume record)

Storage: raw uint8, no compression (ImageNet at 256 px: 1.28M × 196,608 B ≈ 252 GB).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm import tqdm

from alphaflow.errors import InvalidInputError, MissingInputError
from alphaflow.io import atomic_write_json, sha256_json

from .embedded import load_embedded
from .shards import FORMAT, MANIFEST, ShardError, read_json, read_manifest, read_shard, shard_is_current, write_shard

if TYPE_CHECKING:  # torch is imported inside load_prepared only (see __init__.py)
    import torch

PROGRESS = "progress.json"
SHARD_NAME = "images-{:05d}.safetensors"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif"}
PLAN_VERSION = 1  # part of every plan fingerprint; bump when pixels would change


def rebuild_hint(out_dir) -> str:
    return (
        f"Rebuild it by rerunning `alphaflow prepare` for {out_dir} (shards whose checksums match "
        f"are kept, bad ones are rebuilt), or delete {out_dir} and prepare again."
    )


# ----------------------------------------------------------------------------
# Pixels (as the official code): centre crop to square, then Lanczos resize.


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """Centre-crop to the short side (torchvision's rounding), then PIL Lanczos to resolution²."""
    w, h = image.size
    s = min(w, h)
    left, top = int(round((w - s) / 2.0)), int(round((h - s) / 2.0))
    image = image.crop((left, top, left + s, top + s))
    return image.resize((resolution, resolution), Image.LANCZOS)


def load_image(path, resolution: int) -> np.ndarray:
    """Read an image file as RGB uint8 [3, resolution, resolution]."""
    with Image.open(path) as image:
        image = image.convert("RGB")  # decodes fully; truncated or bad files raise here
    return np.asarray(center_crop_resize(image, resolution)).transpose(2, 0, 1)  # (3, R, R)


# ----------------------------------------------------------------------------
# ImageNet-style folder -> shards.


def scan_folder(src, limit_per_class: int | None = None) -> tuple[list[str], list[tuple[str, int]], int]:
    """Returns (class_names sorted, [(relative path, label)], number of non-image files ignored)."""
    src = Path(src)
    if not src.is_dir():
        raise MissingInputError(
            f"image folder {src} does not exist; point params data.path (or ALPHAFLOW_IMAGENET) "
            f"at an ImageNet-style folder (one sub-folder per class)"
        )
    classes = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise InvalidInputError(f"{src} has no class sub-folders (expected ImageNet layout <src>/<class>/<image>)")
    files, ignored = [], 0
    for label, name in enumerate(classes):
        entries = sorted(e.name for e in os.scandir(src / name) if e.is_file())
        images = [e for e in entries if Path(e).suffix.lower() in IMAGE_EXTENSIONS]
        ignored += len(entries) - len(images)
        if limit_per_class is not None:
            images = images[:limit_per_class]
        files += [(f"{name}/{e}", label) for e in images]
    if not files:
        raise InvalidInputError(f"{src} has class folders but no image files ({sorted(IMAGE_EXTENSIONS)})")
    return classes, files, ignored


def _folder_shard_job(src: str, items: list, resolution: int, path: str) -> dict:
    """Worker: decode + preprocess one shard's images and write the shard."""
    images, labels, corrupt = [], [], []
    for rel, label in items:
        try:
            images.append(load_image(os.path.join(src, rel), resolution))
            labels.append(label)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            corrupt.append({"path": rel, "error": f"{type(e).__name__}: {e}"})
    array = np.stack(images) if images else np.zeros((0, 3, resolution, resolution), np.uint8)
    sha = write_shard(path, {"images": array, "labels": np.asarray(labels, dtype=np.int64)})
    return {"file": Path(path).name, "count": len(labels), "sha256": sha, "corrupt": corrupt}


def prepare_folder(src, out_dir, *,
                   resolution: int = 256,                  # output side in pixels (paper: 256)
                   workers: int = 2,                       # processes; <= 1 = in this process
                   shard_size: int = 1000,                 # images per shard (= resume granularity)
                   limit_per_class: int | None = None,     # None = all images of every class
                   ) -> dict:  # fmt: skip
    """ImageNet-style folder (one sub-folder per class) -> uint8 shards + manifest. Resumable.

    workers > 1 uses spawned processes: a script calling this must guard its entry point with
    `if __name__ == "__main__":` (console scripts already do)."""
    _check_positive(resolution=resolution, shard_size=shard_size)
    src = Path(src).resolve()
    classes, files, ignored = scan_folder(src, limit_per_class)
    chunks = [files[i : i + shard_size] for i in range(0, len(files), shard_size)]
    plan = {
        "version": PLAN_VERSION,
        "kind": "folder",
        "files": files,
        "resolution": resolution,
        "shard_size": shard_size,
    }
    out_dir = Path(out_dir)
    tasks = [
        (_folder_shard_job, (str(src), chunk, resolution, str(out_dir / SHARD_NAME.format(i))))
        for i, chunk in enumerate(chunks)
    ]
    records = _build_shards(
        out_dir, sha256_json(plan), tasks, [len(c) for c in chunks], workers=workers, desc=f"prepare {src.name}"
    )
    source = {
        "kind": "folder",
        "path": str(src),
        "resolution": resolution,
        "num_files": len(files),
        "limit_per_class": limit_per_class,
        "ignored_non_image_files": ignored,
    }
    return _finish(out_dir, records, classes, [3, resolution, resolution], source, sha256_json(plan))


# ----------------------------------------------------------------------------
# Embedded dataset -> shards.


def _array_shard_job(images: np.ndarray, labels: np.ndarray, resolution: int | None, path: str) -> dict:
    if resolution is not None:  # same pixel pipeline as the folder path, single channel kept
        images = np.stack([np.asarray(center_crop_resize(Image.fromarray(im), resolution)) for im in images])
    sha = write_shard(path, {"images": images[:, None], "labels": labels})  # (n, 1, H, W)
    return {"file": Path(path).name, "count": len(labels), "sha256": sha, "corrupt": []}


def prepare_embedded(name: str, out_dir, *,
                     split: str = "train",                 # "train" | "test"
                     resolution: int | None = None,        # None = native 28×28
                     cache_dir=None,                       # None = ~/.cache/alphaflow/fashion-mnist
                     shard_size: int = 10000,              # images per shard
                     ) -> dict:  # fmt: skip
    """A small packaged dataset (embedded.py) -> uint8 shards [n, 1, H, W] + manifest."""
    _check_positive(shard_size=shard_size, **({"resolution": resolution} if resolution is not None else {}))
    data = load_embedded(name, split, cache_dir=cache_dir)
    images, labels = data["images"], data["labels"]  # [N, 28, 28], [N]
    side = resolution if resolution is not None else images.shape[-1]
    plan = {
        "version": PLAN_VERSION,
        "kind": "embedded",
        "source": data["source"],
        "resolution": resolution,
        "shard_size": shard_size,
    }
    out_dir = Path(out_dir)
    starts = range(0, len(labels), shard_size)
    tasks = [
        (
            _array_shard_job,
            (images[s : s + shard_size], labels[s : s + shard_size], resolution, str(out_dir / SHARD_NAME.format(i))),
        )
        for i, s in enumerate(starts)
    ]
    records = _build_shards(
        out_dir,
        sha256_json(plan),
        tasks,
        [len(labels[s : s + shard_size]) for s in starts],
        workers=0,
        desc=f"prepare {name}/{split}",
    )
    return _finish(out_dir, records, data["class_names"], [1, side, side], data["source"], sha256_json(plan))


def _check_positive(**values) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


# ----------------------------------------------------------------------------
# Shared machinery: resumable, parallel shard building.


def _build_shards(
    out_dir: Path, plan_sha: str, tasks: list, counts: list[int], *, workers: int, desc: str
) -> list[dict]:
    """Run the shard tasks not already finished (file present with the recorded sha256)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {
        i: rec
        for i, rec in _previous_records(out_dir, plan_sha).items()
        if i < len(tasks) and shard_is_current(out_dir / rec["file"], rec["sha256"])
    }
    todo = [i for i in range(len(tasks)) if i not in done]
    if todo and (out_dir / MANIFEST).exists():
        os.remove(out_dir / MANIFEST)  # the finished manifest would be stale while we rebuild
    _remove_extra_shards(out_dir, len(tasks))
    bar = tqdm(
        total=sum(counts), initial=sum(counts[i] for i in done), desc=desc, unit="img", disable=None, dynamic_ncols=True
    )

    def record(i: int, rec: dict) -> None:
        done[i] = rec
        atomic_write_json(out_dir / PROGRESS, {"plan_sha256": plan_sha, "shards": {str(k): v for k, v in done.items()}})
        bar.update(counts[i])

    if workers <= 1 or len(todo) <= 1:
        for i in todo:
            fn, args = tasks[i]
            record(i, fn(*args))
    else:
        # spawn: workers never inherit torch/CUDA/OpenMP state from the parent (fork-safety).
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context)
        try:
            futures = {pool.submit(tasks[i][0], *tasks[i][1]): i for i in todo}
            for future in as_completed(futures):
                record(futures[future], future.result())
        finally:
            # On an error or Ctrl-C, do not grind through the remaining shards first.
            pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    return [done[i] for i in range(len(tasks))]


def _previous_records(out_dir: Path, plan_sha: str) -> dict[int, dict]:
    """Shard records of an earlier run with the same plan (finished manifest or progress file)."""
    for name in (MANIFEST, PROGRESS):
        path = out_dir / name
        if not path.exists():
            continue
        try:
            previous = read_json(path)
        except ShardError:
            continue  # unreadable record: rebuild everything
        if previous.get("plan_sha256") != plan_sha:
            continue
        shards = previous["shards"]
        if isinstance(shards, list):  # finished manifest: corrupt entries are stored per shard there too
            return dict(enumerate(shards))
        return {int(k): v for k, v in shards.items()}
    return {}


def _remove_extra_shards(out_dir: Path, num_shards: int) -> None:
    """Shards left over from an earlier, larger plan would otherwise sit beside the new ones."""
    for path in out_dir.glob("images-*.safetensors"):
        stem = path.name[len("images-") : -len(".safetensors")]
        if stem.isdigit() and int(stem) >= num_shards:
            path.unlink()


def _finish(
    out_dir: Path, records: list[dict], class_names: list[str], image_shape: list[int], source: dict, plan_sha: str
) -> dict:
    corrupt = [c for rec in records for c in rec["corrupt"]]
    # fmt: off
    manifest = {
        "format": FORMAT,
        "count": sum(rec["count"] for rec in records),
        "num_classes": len(class_names),
        "class_names": class_names,
        "image_shape": image_shape,                              # (C, H, W)
        "shards": records,                                       # file, count, sha256, corrupt
        "corrupt": corrupt,                                      # [{path, error}], never silently dropped
        "source": source,
        "plan_sha256": plan_sha,
    }
    # fmt: on
    atomic_write_json(out_dir / MANIFEST, manifest)
    if (out_dir / PROGRESS).exists():
        os.remove(out_dir / PROGRESS)
    if corrupt:
        print(f"[prepare] {len(corrupt)} unreadable image(s) skipped; listed in {out_dir / MANIFEST} under 'corrupt'")
    return manifest


# ----------------------------------------------------------------------------
# Reading prepared data.


def iter_prepared_shards(data_dir, *, verify: bool = True, indices=None):
    """Yields (shard index, images uint8 [n,C,H,W], labels int64 [n], shard record) as numpy."""
    data_dir = Path(data_dir)
    hint = rebuild_hint(data_dir)
    manifest = read_manifest(data_dir, hint=f"Run `alphaflow prepare` to create {data_dir}.")
    for i in range(len(manifest["shards"])) if indices is None else indices:
        rec = manifest["shards"][i]
        arrays = read_shard(data_dir / rec["file"], sha256=rec["sha256"] if verify else None, hint=hint)
        images, labels = arrays["images"], arrays["labels"]
        if images.shape[1:] != tuple(manifest["image_shape"]) or len(labels) != rec["count"]:
            raise ShardError(
                f"shard {data_dir / rec['file']} holds {images.shape} / {len(labels)} labels, "
                f"the manifest says {rec['count']} × {manifest['image_shape']}. {hint}"
            )
        yield i, images, labels, rec


def load_prepared(data_dir, *,
                  verify: bool = True,                     # check each shard read against its sha256
                  limit: int | None = None,                # None = all images; else the first `limit`
                  ) -> tuple[torch.Tensor, torch.Tensor, dict]:  # fmt: skip
    """(images uint8 [N,C,H,W], labels int64 [N], manifest). With `limit`, only the shards
    needed are read (and verified)."""
    manifest = read_manifest(Path(data_dir), hint=f"Run `alphaflow prepare` to create {data_dir}.")
    needed, n = [], 0
    for i, rec in enumerate(manifest["shards"]):
        if limit is not None and n >= limit:
            break
        needed.append(i)
        n += rec["count"]
    images, labels = [], []
    for _, im, lab, _ in iter_prepared_shards(data_dir, verify=verify, indices=needed):
        images.append(im)
        labels.append(lab)
    shape = tuple(manifest["image_shape"])
    import torch  # not at module level: spawned prepare workers then skip importing torch

    images = np.concatenate(images) if images else np.zeros((0, *shape), np.uint8)
    labels = np.concatenate(labels) if labels else np.zeros((0,), np.int64)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return torch.from_numpy(images), torch.from_numpy(labels), manifest  # [N,C,H,W] uint8, [N] int64
