"""metrics.jsonl: one JSON record per line, appended with fsync.

A kill or a full disk during an append leaves a torn last line; readers drop it (one warning), writers cut it
off. A bad line anywhere else is not a torn append but corruption, and stops the reader with the file and line
named. Training appends here first (the local, complete copy DVC reads and `alphaflow track-replay` sends to
MLflow); plots and the report read it.
"""

import json
import os
import warnings
from pathlib import Path

from alphaflow.errors import UserError
from alphaflow.io import atomic_write_bytes, space_guard, write_bytes


class JsonlError(UserError, ValueError):
    """A JSON-lines file is corrupt before its last line."""


_torn_warned = set()  # (path, line number) of torn last lines already warned about in this process


def _record(line):
    """One line's record (a JSON object); ValueError if it is not one."""
    record = json.loads(line)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    return record


def _warn_torn(path, number, size):
    if (str(path), number) not in _torn_warned:
        _torn_warned.add((str(path), number))
        warnings.warn(
            f"{path}: dropping a torn last line {number} ({size} bytes, left by a kill or a full disk "
            f"during an append)",
            stacklevel=3,
        )


def read_jsonl(path):
    """The records of a JSON-lines file ([] if it does not exist). A torn last line is dropped with one
    warning; a bad line before it raises JsonlError naming the file and the line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines[: last + 1]):
        if not line.strip():
            continue
        try:
            records.append(_record(line))
        except ValueError as err:
            if i < last:
                raise JsonlError(
                    f"{path}: line {i + 1} is not a JSON record ({err}). Only a torn last line is "
                    f"expected after a crash, so the file is corrupt: repair or delete that line."
                ) from None
            _warn_torn(path, i + 1, len(line))
    return records


def _repair_tail(path, f):
    """Ends the file `f` (opened "ab+") with a newline: a complete last record only lacking it gets it, an
    unparsable (torn) last line is cut off."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return
    f.seek(0)
    data = f.read()
    start = data.rfind(b"\n") + 1
    try:
        _record(data[start:])
        f.write(b"\n")
    except ValueError:
        _warn_torn(path, data.count(b"\n") + 1, size - start)
        f.truncate(start)


def append_jsonl(path, record):
    """Appends one record (fsync'ed) on a line of its own, repairing a tail torn earlier first. A full disk is an
    OutOfSpace; the line it may leave torn is cut off by the next append or resume."""
    line = (json.dumps(record) + "\n").encode()
    with space_guard(path, len(line), f"a record of {Path(path).name}"), open(path, "ab+") as f:
        _repair_tail(path, f)
        write_bytes(f, line)
        f.flush()
        os.fsync(f.fileno())


def truncate_jsonl(path, max_step):
    """Drops records past `max_step` (a resumed run re-logs them exactly) and a torn last line; atomic rewrite."""
    path = Path(path)
    if not path.exists():
        return
    keep = [r for r in read_jsonl(path) if r.get("step", 0) <= max_step]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())
