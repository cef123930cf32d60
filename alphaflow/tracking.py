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


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_jsonl(path, max_step):
    """Drops records past `max_step` (a resumed run re-logs them exactly)."""
    path = Path(path)
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= max_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


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
