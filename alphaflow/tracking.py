"""MLflow tracking that never stops training (design.md §6).

Every record goes to `metrics.jsonl` first (the local, complete copy DVC reads). MLflow calls run on a
background thread behind a queue: a slow or dead tracking server never blocks the training step. The
first failure prints one warning; after it the thread drops MLflow records, the local file keeps all.
"""

import contextlib
import fcntl
import json
import os
import queue
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

from alphaflow.data.shards import atomic_write_bytes
from alphaflow.errors import UserError


def git_commit(cwd=None):
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


#----------------------------------------------------------------------------
# metrics.jsonl: one JSON record per line, appended with fsync. A kill or a full disk during an append
# leaves a torn last line; readers drop it (one warning), writers cut it off. A bad line anywhere else is
# not a torn append but corruption, and stops the reader with the file and line named.


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
        warnings.warn(f"{path}: dropping a torn last line {number} ({size} bytes, left by a kill or a full disk "
                      f"during an append)", stacklevel=3)


def read_jsonl(path):
    """The records of a JSON-lines file ([] if it does not exist). A torn last line is dropped with one
    warning; a bad line before it raises JsonlError naming the file and the line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines[:last + 1]):
        if not line.strip():
            continue
        try:
            records.append(_record(line))
        except ValueError as err:
            if i < last:
                raise JsonlError(f"{path}: line {i + 1} is not a JSON record ({err}). Only a torn last line is "
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
    """Appends one record (fsync'ed) on a line of its own, repairing a tail torn earlier first."""
    with open(path, "ab+") as f:
        _repair_tail(path, f)
        f.write((json.dumps(record) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def truncate_jsonl(path, max_step):
    """Drops records past `max_step` (a resumed run re-logs them exactly) and a torn last line; atomic rewrite."""
    path = Path(path)
    if not path.exists():
        return
    keep = [r for r in read_jsonl(path) if r.get("step", 0) <= max_step]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())


@contextlib.contextmanager
def store_lock(uri):
    """Serialises the first use of a SQLite store: MLflow creates and migrates it then, and two processes
    doing so at once leave it half-migrated for good (seen with two training jobs started together)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri[len("sqlite:///"):] + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Tracker:
    """One MLflow run per training run; resumes the same MLflow run via `run_id_file`."""

    def __init__(self, uri, experiment, run_name, *, run_id_file, tags=None, enabled=True, timeout_s=10):
        self.enabled = enabled
        self.warned = False
        self.run_id = None
        self.queue = queue.Queue()
        self._thread = None
        if not enabled:
            return
        try:  # import on this thread: a first import racing between two threads half-initialises mlflow
            import mlflow.entities  # noqa: F401
            import mlflow.tracking  # noqa: F401
        except ImportError as err:
            self._warn(err)
            self.enabled = False
            return
        # Bounded HTTP retries/timeouts so a dead server fails fast inside the worker thread.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
        self.run_id_file = Path(run_id_file)
        self._thread = threading.Thread(target=self._worker, args=(uri, experiment, run_name, tags or {}), daemon=True)
        self._thread.start()

    def _warn(self, err):
        if not self.warned:
            self.warned = True
            print(f"[alphaflow] WARNING: MLflow tracking failed ({type(err).__name__}: {err}); training goes on, "
                  f"metrics stay in metrics.jsonl", file=sys.stderr, flush=True)

    def _open(self, uri, experiment, run_name, tags):
        """(client, run id); creates the experiment and the run, or reopens the run of run_id_file."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        run_id = self.run_id_file.read_text().strip() if self.run_id_file.exists() else None
        if run_id is None:
            run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
            self.run_id_file.write_text(run_id)
        else:
            client.update_run(run_id, status="RUNNING")
        return client, run_id

    def _worker(self, uri, experiment, run_name, tags, attempts=4):
        client = None
        for attempt in range(attempts):
            # Retried: jobs started together race to create the experiment (or a server is slow to answer).
            try:
                with store_lock(uri):
                    client, self.run_id = self._open(uri, experiment, run_name, tags)
                break
            except Exception as err:  # noqa: BLE001 — tracking must never crash training
                if attempt == attempts - 1:
                    self._warn(err)
                else:
                    time.sleep(1.0 + attempt)
        while True:
            item = self.queue.get()
            if item is None:
                self.queue.task_done()
                break
            if client is not None and not self.warned:
                try:
                    item(client, self.run_id)
                except Exception as err:  # noqa: BLE001
                    self._warn(err)
            self.queue.task_done()

    def _put(self, fn):
        if self.enabled:
            self.queue.put(fn)

    def log_params(self, params):
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        self._put(lambda c, rid: c.log_batch(rid, params=items))

    def log_metrics(self, metrics, step):
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k.replace("'", "p"), float(v), ts, step) for k, v in metrics.items()]
        self._put(lambda c, rid: c.log_batch(rid, metrics=items))

    def log_artifact(self, path, artifact_path=None):
        self._put(lambda c, rid: c.log_artifact(rid, str(path), artifact_path))

    def log_table(self, columns, artifact_file):
        """A {column: [values]} table as an MLflow table artifact (`mlflow.load_table` joins them across runs)."""
        self._put(lambda c, rid: c.log_table(rid, data=columns, artifact_file=artifact_file))

    def close(self, status="FINISHED", timeout=30):
        if not self.enabled or self._thread is None:
            return
        self._put(lambda c, rid: c.set_terminated(rid, status=status))
        self.queue.put(None)
        self._thread.join(timeout)
