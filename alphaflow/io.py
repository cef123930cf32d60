"""Atomic file writes and checksums, used by every stage.

Every file the pipeline writes goes through `atomic_write_bytes` (or its text / JSON forms): a temporary
file in the same directory, flushed and fsync'ed, then `os.replace`d over the final name and the directory
fsync'ed, so a reader sees either the old file or the new one, never half of one,
even after kill -9 or a power loss. `publish_dir` does the same for a whole folder built under a temporary
name (checkpoints).

A full disk or a spent quota (ENOSPC, EDQUOT) in any writer ends as one `OutOfSpace` naming the path, what
was written, the space it needed and the space free, after the writer removed its partial files
(`space_guard`); `ensure_space` refuses a large write before it starts.

Standard library only: the image-decoding workers of `alphaflow.data.prepare` import this, not torch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from alphaflow.errors import OutOfSpace

_UMASK = os.umask(0)
os.umask(_UMASK)  # read the process umask once (there is no getter)


# ----------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------
# Atomic writes


def write_bytes(f, data: bytes) -> None:
    """Puts `data` into the open binary file `f`: the one place atomic writes and appends hand bytes to the OS."""
    f.write(data)


def atomic_write_bytes(path, data: bytes, what=None) -> str:
    """Writes `data` to `path` atomically; returns its sha256 (hex). what: names the file in an OutOfSpace."""
    path = Path(path)
    with space_guard(path, len(data), what):
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_and_replace(path, data)
    fsync_dir(path.parent)  # make the rename itself durable
    return sha256_bytes(data)


def _write_and_replace(path, data):
    """A temporary file next to `path`, written and fsync'ed, then renamed over it; removed on any failure."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)  # reopened by name: the file object carries its path
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        with open(tmp, "wb") as f:
            write_bytes(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str, what=None) -> Path:
    """Writes `text` (UTF-8) to `path` atomically; returns `path` (tables and reports collect the paths)."""
    atomic_write_bytes(path, text.encode(), what)
    return Path(path)


def atomic_write_json(path, obj, what=None) -> str:
    """`obj` as indented JSON with a final newline, atomically; returns the file's sha256."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode(), what)


def publish_dir(tmp, final) -> Path:
    """Renames the finished folder `tmp` to `final` (replacing an existing `final`), then fsyncs the parent:
    a reader sees the previous folder or the complete new one (after a kill between the two steps, none)."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


# ----------------------------------------------------------------------------
# A full disk


SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_out_of_space(err) -> bool:
    """ENOSPC / EDQUOT: an OSError, an OutOfSpace already, or a library error quoting the OS error
    (safetensors' SafetensorError says "... No space left on device (os error 28)")."""
    if isinstance(err, OutOfSpace):
        return True
    if isinstance(err, OSError):
        return err.errno in SPACE_ERRNOS
    return any(f"(os error {code})" in str(err) for code in SPACE_ERRNOS)


def _is_quota(err) -> bool:
    while err is not None:
        if getattr(err, "errno", None) == errno.EDQUOT or f"(os error {errno.EDQUOT})" in str(err):
            return True
        err = err.__cause__
    return False


def free_bytes(path):
    """Bytes free for this user on the filesystem of `path` (its nearest existing folder); None if unknown."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def human_bytes(n) -> str:
    if n is None:
        return "an unknown amount"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def out_of_space(path, needed, what=None, err=None, margin=0) -> OutOfSpace:
    """The OutOfSpace of writing `what` (`needed` bytes) to `path`: err is the OS error, None for a refusal
    before writing (short of `needed` + `margin`)."""
    what = f"{what} ({path})" if what else str(path)
    if err is None:
        cause, outcome = f"not enough free space to write {what}", "nothing was written"
    else:
        full = "disk quota exceeded" if _is_quota(err) else "no space left on device"
        cause, outcome = f"{full} writing {what}", "nothing was lost: the partial files were removed"
    need = human_bytes(needed) + (f" plus a margin of {human_bytes(margin)}" if margin else "")
    return OutOfSpace(
        f"{cause}: it needs {need}, {human_bytes(free_bytes(path))} free there; {outcome} and what "
        "was saved before is intact. Free space (or move the results folder to a larger disk) and "
        "re-run the same command: it resumes from what was saved."
    )


def remove_path(path) -> None:
    """Deletes a file or a folder tree if it is there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def space_guard(path, needed, what=None, cleanup=()):
    """Turns a full disk or spent quota inside the block into one OutOfSpace about `path` (`needed` bytes of
    `what`), after deleting `cleanup` (the block's partial files and folders); other errors pass unchanged."""
    try:
        yield
    except Exception as err:
        if not is_out_of_space(err):
            raise
        for partial in cleanup:
            remove_path(partial)
        raise out_of_space(path, needed, what, err) from err


def ensure_space(path, needed, what=None, margin=0) -> None:
    """Raises OutOfSpace before a write of `needed` bytes to `path` when less than `needed` + `margin` is free."""
    free = free_bytes(path)
    if free is not None and free < needed + margin:
        raise out_of_space(path, needed, what, margin=margin)


# ----------------------------------------------------------------------------
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
