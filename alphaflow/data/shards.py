"""Checksummed shard files and manifests.

Every file the data stages write goes through `alphaflow.io.atomic_write_bytes` (temporary file,
fsync, rename, fsync of the folder), so a reader sees either the old file or the new one.
Tensor shards are safetensors (no pickle anywhere) and every shard's sha256 is recorded in a
JSON manifest; readers verify it and fail with the file name and the command that rebuilds it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load_bytes
from safetensors.numpy import save as st_save_bytes

from alphaflow.errors import UserError
from alphaflow.io import atomic_write_bytes, sha256_bytes, sha256_file

# fmt: off
MANIFEST = "manifest.json"      # the finished dataset's manifest
FORMAT = 1                      # manifest["format"]; bump on incompatible layout changes
# fmt: on


class ShardError(UserError, ValueError):
    """A shard or manifest is missing, unreadable or fails its checksum."""


# ----------------------------------------------------------------------------
# Tensor shards (safetensors, numpy arrays).


def write_shard(path, arrays: dict[str, np.ndarray]) -> str:
    """Atomically write a dict of numpy arrays as safetensors; returns the file's sha256."""
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    return atomic_write_bytes(path, st_save_bytes(arrays))


def read_shard(path, *, sha256: str | None = None, hint: str = "") -> dict[str, np.ndarray]:
    """Read a shard written by `write_shard`, checking its sha256 when given.

    Any failure (missing file, checksum mismatch, unparsable bytes) raises `ShardError`
    naming the file and `hint` (what to run to rebuild it).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ShardError(f"cannot read shard {path}: {e}. {hint}".strip()) from e
    if sha256 is not None:
        got = sha256_bytes(data)
        if got != sha256:
            raise ShardError(
                f"shard {path} is corrupt: sha256 {got} does not match the manifest's {sha256}. {hint}".strip()
            )
    try:
        return st_load_bytes(data)
    except Exception as e:  # safetensors raises its own error types
        raise ShardError(f"shard {path} is unreadable ({type(e).__name__}: {e}). {hint}".strip()) from e


# safetensors dtype names → numpy (the ones write_shard can produce).
_ST_DTYPES = {
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def map_shard(path, *, sha256: str | None = None, hint: str = "") -> dict[str, np.ndarray]:
    """A shard's arrays as read-only memory maps (np.memmap), after the same checks as `read_shard`.

    The safetensors layout is an 8-byte little-endian header length, a JSON header giving each tensor's
    dtype, shape and byte range, then the data. Mapping instead of reading lets every DDP rank index any
    sample while the ranks on a node share one copy in the page cache.
    """
    path = Path(path)
    try:
        if sha256 is not None and (got := sha256_file(path)) != sha256:
            raise ShardError(
                f"shard {path} is corrupt: sha256 {got} does not match the manifest's {sha256}. {hint}".strip()
            )
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        arrays = {}
        for name, info in header.items():
            start, end = info["data_offsets"]
            dtype, shape = np.dtype(_ST_DTYPES[info["dtype"]]), tuple(info["shape"])
            if end - start != dtype.itemsize * int(np.prod(shape)):
                raise ValueError(f"tensor {name!r}: {end - start} bytes for shape {shape} {dtype}")
            arrays[name] = (
                np.memmap(path, dtype=dtype, mode="r", offset=8 + size + start, shape=shape)
                if end > start
                else np.empty(shape, dtype)
            )
        return arrays
    except ShardError:
        raise
    except OSError as e:
        raise ShardError(f"cannot read shard {path}: {e}. {hint}".strip()) from e
    except (ValueError, KeyError, TypeError) as e:  # a malformed header
        raise ShardError(f"shard {path} is unreadable ({type(e).__name__}: {e}). {hint}".strip()) from e


def shard_is_current(path, sha256: str | None) -> bool:
    """True when `path` exists and its sha256 equals `sha256` (resume check)."""
    path = Path(path)
    return sha256 is not None and path.is_file() and sha256_file(path) == sha256


# ----------------------------------------------------------------------------
# Manifests.


def read_json(path, *, hint: str = "") -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ShardError(f"{path} does not exist. {hint}".strip()) from e
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"{path} is unreadable ({e}). {hint}".strip()) from e


def read_manifest(directory, *, hint: str = "") -> dict:
    """Read `<directory>/manifest.json` and check its format version."""
    manifest = read_json(Path(directory) / MANIFEST, hint=hint)
    if manifest.get("format") != FORMAT:
        raise ShardError(
            f"{Path(directory) / MANIFEST} has format {manifest.get('format')!r}, expected {FORMAT}. {hint}".strip()
        )
    return manifest


def verify_shards(directory, manifest: dict, *, hint: str = "") -> None:
    """Check every shard listed in `manifest` against its sha256 (raises `ShardError`)."""
    for shard in manifest["shards"]:
        path = Path(directory) / shard["file"]
        if not path.is_file():
            raise ShardError(f"shard {path} is missing. {hint}".strip())
        got = sha256_file(path)
        if got != shard["sha256"]:
            raise ShardError(
                f"shard {path} is corrupt: sha256 {got} does not match the manifest's {shard['sha256']}. {hint}".strip()
            )
