"""Atomic file writes and checksums, used by every stage.

Every file the pipeline writes goes through `atomic_write_bytes` (or its text / JSON forms): a temporary
file in the same directory, flushed and fsync'ed, then `os.replace`d over the final name and the directory
fsync'ed, so a reader sees either the old file or the new one, never half of one,
even after kill -9 or a power loss. `publish_dir` does the same for a whole folder built under a temporary
name (checkpoints).

Standard library only: the image-decoding workers of `alphaflow.data.prepare` import this, not torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)                # read the process umask once (there is no getter)


#----------------------------------------------------------------------------
# fsync


def fsync_file(path) -> None:
    """Flushes a written file's data to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(directory) -> None:
    """Makes a rename or a new entry in `directory` durable (a no-op where the platform cannot)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform / filesystem
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#----------------------------------------------------------------------------
# Atomic writes


def atomic_write_bytes(path, data: bytes) -> str:
    """Writes `data` to `path` atomically; returns its sha256 (hex)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)  # make the rename itself durable
    return sha256_bytes(data)


def atomic_write_text(path, text: str) -> Path:
    """Writes `text` (UTF-8) to `path` atomically; returns `path` (tables and reports collect the paths)."""
    atomic_write_bytes(path, text.encode())
    return Path(path)


def atomic_write_json(path, obj) -> str:
    """`obj` as indented JSON with a final newline, atomically; returns the file's sha256."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def publish_dir(tmp, final) -> Path:
    """Renames the finished folder `tmp` to `final` (replacing an existing `final`), then fsyncs the parent:
    a reader sees the previous folder or the complete new one (after a kill between the two steps, none)."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


#----------------------------------------------------------------------------
# Checksums


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    """Hash of a JSON-able object in a canonical encoding (plan fingerprints)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())
