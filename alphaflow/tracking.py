"""MLflow tracking that never stops training.

Every record goes to `metrics.jsonl` first (`alphaflow.jsonl`: the local, complete copy DVC reads). MLflow
calls run on a background thread behind a queue: a slow or dead tracking server never blocks the training
step. What fails for a transient reason (a locked SQLite store, a server that is down) is kept and sent again
with back-off; repeated failures print one warning, and whatever is still unsent at `close` is counted in a
second one. `alphaflow track-replay` later logs what MLflow lacks of a run's metrics.jsonl.
"""

import collections
import contextlib
import fcntl
import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

from alphaflow.errors import UserError
from alphaflow.io import atomic_write_bytes, atomic_write_text
from alphaflow.jsonl import read_jsonl


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


@contextlib.contextmanager
def store_lock(uri):
    """Serialises the first use of a SQLite store: MLflow creates and migrates it then, and two processes
    doing so at once leave it half-migrated for good (seen with two training jobs started together)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri[len("sqlite:///") :] + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------
# Transient failures: a SQLite store locked by another writer for longer than MLflow's busy timeout (20 s),
# a tracking server that is down, restarting or overloaded. The tracker keeps what it could not send, in
# order, and sends it again with back-off; re-sending is idempotent (a metric is keyed by key, timestamp,
# step and value, and the kept items carry their first timestamp).

# fmt: off
BACKOFF_S = (0.5, 8.0)       # first retry delay, doubling up to the cap
WARN_AFTER_FAILURES = 4      # consecutive failures before the one warning (a store-creation race is quieter)
# fmt: on
TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED"}
TRANSIENT_TEXT = re.compile(r"database is locked|failed with exception|error code 50[234]\b", re.IGNORECASE)
_RETRY = object()  # the worker's queue timed out: time to retry pending items


def is_transient(err):
    """True for errors worth retrying later (locked store, unreachable or overloaded server), False for a
    request the store will never accept (a bad value, a changed param)."""
    if isinstance(err, OSError):  # requests' ConnectionError and Timeout are OSErrors too
        return True
    return getattr(err, "error_code", None) in TRANSIENT_CODES or bool(TRANSIENT_TEXT.search(str(err)))


def backoff(failures):
    """Seconds to wait after `failures` consecutive failures."""
    first, cap = BACKOFF_S
    return min(cap, first * 2 ** max(failures - 1, 0))


def metric_key(key):
    """MLflow-safe metric names: cos(FM',TC) → cos_FMp_TC (the same on a safe name)."""
    return key.replace("'", "p").replace("(", "_").replace(")", "").replace(",", "_")


def mlflow_metric_name(metric, sampler, weights):
    """The MLflow name of one evaluation number: `fid_1nfe_ema`, `fd_classifier_2nfe_raw`, …"""
    return f"{metric}_{sampler}_{weights}"


def read_run_id(path):
    """The MLflow run id recorded in `path`; None when absent, empty or unreadable (a new run is made)."""
    try:
        run_id = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return run_id if re.fullmatch(r"[0-9A-Za-z_-]{1,256}", run_id) else None


# Marks the experiments as model training. MLflow 3.17's UI still opens them on its GenAI page while its
# "Model training" switch is off, so the report also writes links with workflowType=machine_learning (ui_links).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}

MLFLOW_UI = "http://127.0.0.1:5000"  # where a bare `mlflow ui` serves a local store


def ui_links(uri, experiment, run_ids):
    """{"runs": URL, "compare": URL} of the experiment's runs table (opened as model training, not on the
    GenAI page) and of the compare view of `run_ids` (every logged metric side by side), in the MLflow UI
    serving `uri`: the server itself for http(s), a bare `mlflow ui` for a local store. None without it."""
    from mlflow.tracking import MlflowClient

    with store_lock(uri):
        exp = MlflowClient(uri).get_experiment_by_name(experiment)
    if exp is None:
        return None
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else MLFLOW_UI
    quoted = lambda x: urllib.parse.quote(json.dumps(x))
    return {
        "runs": f"{base}/#/experiments/{exp.experiment_id}?workflowType=machine_learning",
        "compare": f"{base}/#/compare-runs?runs={quoted(list(run_ids))}&experiments={quoted([exp.experiment_id])}",
    }


def open_run(client, experiment, run_name, tags, run_id_file, *, reopen=True):
    """Run id of `run_id_file`'s MLflow run (marked RUNNING again if `reopen`), or of a new run recorded there."""
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, tags=EXPERIMENT_TAGS)
    if exp is not None and any(exp.tags.get(k) != v for k, v in EXPERIMENT_TAGS.items()):
        for k, v in EXPERIMENT_TAGS.items():  # an experiment made before the tag (or by hand)
            client.set_experiment_tag(exp_id, k, v)
    run_id = read_run_id(run_id_file)
    if run_id is None:
        run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        atomic_write_bytes(run_id_file, run_id.encode())  # a kill never leaves an empty id file
    elif reopen:
        client.update_run(run_id, status="RUNNING")
    return run_id


def replay_jsonl(client, run_id, path, *, batch=1000):
    """Logs to MLflow run `run_id` every metric of the JSON-lines file `path` that it lacks (no point at that
    key and step yet), so running it again adds nothing. Returns (points logged, points already there)."""
    from mlflow.entities import Metric

    points = {}  # {key: {step: value}}
    for record in read_jsonl(path):
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                points.setdefault(metric_key(k), {})[int(record.get("step", 0))] = float(v)
    ts = int(time.time() * 1000)
    missing, present = [], 0
    for key, by_step in points.items():
        logged = {m.step for m in client.get_metric_history(run_id, key)}
        present += len(logged & by_step.keys())
        missing += [Metric(key, v, ts, step) for step, v in by_step.items() if step not in logged]
    for i in range(0, len(missing), batch):  # MLflow takes at most 1000 metrics per log_batch
        client.log_batch(run_id, metrics=missing[i : i + batch])
    return len(missing), present


def replay_run(uri, experiment, run_name, run_dir):
    """`alphaflow track-replay`: what MLflow missed of `run_dir`/metrics.jsonl, logged to the run's MLflow run
    (a new one if the run has none yet). Returns (MLflow run id, points logged, points already there)."""
    from mlflow.tracking import MlflowClient

    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.exists():
        raise UserError(f"{metrics} does not exist: nothing to replay (train run {run_name} first)")
    with store_lock(uri):
        client = MlflowClient(uri)
        run_id = open_run(client, experiment, run_name, {}, Path(run_dir) / "mlflow_run_id", reopen=False)
    return (run_id, *replay_jsonl(client, run_id, metrics))


class _QuietWorker(logging.Filter):
    """MLflow logs a traceback for every failed SQLite call; the tracker thread retries and warns itself."""

    def filter(self, record):
        return not record.threadName.startswith("alphaflow-tracker")


class Tracker:
    """One MLflow run per training run; resumes the same MLflow run via `run_id_file`.

    Calls only enqueue; the worker thread sends. Items that fail transiently stay queued, in order, and
    are sent again with back-off once the store answers; `close` makes a last bounded attempt and names
    what is left (every metric is also in metrics.jsonl: `replay_jsonl` / `alphaflow track-replay`)."""

    def __init__(self, uri, experiment, run_name, *, run_id_file, tags=None, enabled=True, timeout_s=10):
        self.enabled = enabled
        self.warned = False
        self.run_id = None
        self.run_name = run_name
        self.queue = queue.Queue()
        # fmt: off
        self.pending = collections.deque()  # items not sent yet, oldest first (owned by the worker)
        self.failures = 0                   # consecutive failed attempts
        self.dropped = 0                    # items the store refused for good
        # fmt: on
        self.last_error = None
        self._client = None
        self._retry_s = 10  # close's last-attempt budget
        self._thread = None
        if not enabled:
            return
        try:  # import on this thread: a first import racing between two threads half-initialises mlflow
            import mlflow.entities
            import mlflow.tracking  # noqa: F401
        except ImportError as err:
            self._warn(err)
            self.enabled = False
            return
        # Bounded HTTP retries/timeouts so a dead server fails fast inside the worker thread (which retries).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
        db_log = logging.getLogger("mlflow.store.db.utils")
        if not any(isinstance(f, _QuietWorker) for f in db_log.filters):
            db_log.addFilter(_QuietWorker())
        self.run_id_file = Path(run_id_file)
        self._thread = threading.Thread(
            target=self._worker,
            args=(uri, experiment, run_name, tags or {}),
            name=f"alphaflow-tracker-{run_name}",
            daemon=True,
        )
        self._thread.start()

    def _warn(self, err):
        if not self.warned:
            self.warned = True
            print(
                f"[alphaflow] WARNING: MLflow tracking failed ({type(err).__name__}: {err}); training goes on, "
                f"metrics stay in metrics.jsonl",
                file=sys.stderr,
                flush=True,
            )

    def _send(self, uri, experiment, run_name, tags):
        """Opens the run if needed, then sends pending items in order until one fails transiently.
        True when nothing is left; a refused item (not transient) is dropped with the warning."""
        try:
            if self._client is None:
                from mlflow.tracking import MlflowClient

                with store_lock(uri):  # jobs started together race to create the store and the experiment
                    client = MlflowClient(uri)
                    self.run_id = open_run(client, experiment, run_name, tags, self.run_id_file)
                self._client = client
            while self.pending:
                try:
                    self.pending[0](self._client, self.run_id)
                except Exception as err:
                    if is_transient(err):
                        raise
                    self.last_error, self.dropped = err, self.dropped + 1
                    self._warn(err)
                self.pending.popleft()
        except Exception as err:
            self.failures += 1
            self.last_error = err
            if self.failures >= WARN_AFTER_FAILURES:
                self._warn(err)
            return False
        self.failures = 0
        return True

    def _worker(self, uri, experiment, run_name, tags):
        args = (uri, experiment, run_name, tags)
        retry_at = 0.0
        while True:
            wait = max(0.0, retry_at - time.monotonic()) if self.pending else None
            try:
                item = self.queue.get(timeout=wait)
            except queue.Empty:
                item = _RETRY
            if item is None:
                break
            if item is not _RETRY:
                self.pending.append(item)
            if time.monotonic() >= retry_at and not self._send(*args):
                retry_at = time.monotonic() + backoff(self.failures)
        self._last_attempt(args, self._retry_s)

    def _last_attempt(self, args, retry_s):
        """At close: retries with back-off for up to `retry_s` seconds, then names what was not sent."""
        deadline = time.monotonic() + retry_s
        while not self._send(*args):
            delay = backoff(self.failures)
            if time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
        self._report_unsent()

    def _report_unsent(self):
        unsent = len(self.pending) + self.dropped
        if unsent:
            self._warn_unsent(
                f"{unsent} MLflow item(s) of run {self.run_name} were not sent (last error: "
                f"{type(self.last_error).__name__}: {self.last_error})"
            )

    def _warn_unsent(self, what):
        print(
            f"[alphaflow] WARNING: {what}. The run's files keep every value: `alphaflow track-replay --params P "
            f"--run {self.run_name}` logs what MLflow lacks of its metrics.jsonl (for an evaluation's metrics, "
            f"run `alphaflow evaluate` again).",
            file=sys.stderr,
            flush=True,
        )

    def _put(self, fn):
        if self.enabled:
            self.queue.put(fn)

    def log_params(self, params):
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        self._put(lambda c, rid: c.log_batch(rid, params=items))

    def log_metrics(self, metrics, step, timestamp=None):
        """timestamp: seconds since the epoch (default now), fixed here: a re-send after a failure, or the same
        values logged again with the same timestamp, is a duplicate MLflow ignores."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int((time.time() if timestamp is None else timestamp) * 1000)
        items = [Metric(metric_key(k), float(v), ts, step) for k, v in metrics.items()]
        self._put(lambda c, rid: c.log_batch(rid, metrics=items))

    def set_tags(self, tags):
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        self._put(lambda c, rid: c.log_batch(rid, tags=items))

    def log_artifact(self, path, artifact_path=None):
        self._put(lambda c, rid: c.log_artifact(rid, str(path), artifact_path))

    def log_table(self, columns, artifact_file):
        """A {column: [values]} table as an MLflow table artifact (`mlflow.load_table` joins them across runs)."""
        self._put(lambda c, rid: c.log_table(rid, data=columns, artifact_file=artifact_file))

    def close(self, status="FINISHED", timeout=30, retry_s=10):
        """Ends the MLflow run; waits at most `timeout` s, of which up to `retry_s` s retry unsent items."""
        if not self.enabled or self._thread is None:
            return
        self._retry_s = retry_s
        self._put(lambda c, rid: c.set_terminated(rid, status=status))
        self.queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():  # stuck in a call (a store locked past its busy timeout, a slow server)
            self._warn_unsent(
                f"MLflow did not answer within {timeout} s; {len(self.pending)} item(s) of run "
                f"{self.run_name} may not be sent"
            )


# ----------------------------------------------------------------------------
# The report's evaluations on each run's MLflow run


def mlflow_metrics(values):
    """{name: value, name_ci_low: low, name_ci_high: high} of (name, value, low, high) evaluation rows."""
    out = {}
    for name, value, low, high in values:
        out.update({name: value, f"{name}_ci_low": low, f"{name}_ci_high": high})
    return out


def log_to_mlflow(uri, experiment, runs, run_id_files, out_md):
    """Each run's evaluation metrics (at its last step), sample grids and rows as an MLflow table, on its own run;
    writes `out_md` with the UI links to the runs table and to the compare view of every run of `run_id_files`.

    runs: one dict per run with an MLflow run: run (name), run_id_file, step, table ({column: [values]}, logged
    as fid_table.json) and cells, one per weights × sampler: weights, values ([(name, value, low, high)]),
    timestamp (the evaluation file's time) and grid (its sample grid PNG, or None).

    One connection per run. Metrics carry the time of their evaluation file, so logging an unchanged
    evaluation again (a re-run report) adds nothing to the run's history. Returns out_md, or None when no run
    id is recorded or the store has no such experiment."""
    for run in runs:
        tracker = Tracker(uri, experiment, run["run"], run_id_file=run["run_id_file"])
        for cell in run["cells"]:
            tracker.log_metrics(mlflow_metrics(cell["values"]), step=run["step"], timestamp=cell["timestamp"])
            if cell["grid"] is not None:
                tracker.log_artifact(cell["grid"], f"samples/{cell['weights']}")
        tracker.log_table(run["table"], "fid_table.json")
        tracker.close()
    run_ids = [i for i in map(read_run_id, run_id_files) if i]
    links = ui_links(uri, experiment, run_ids) if run_ids else None
    if links is None:
        return None
    local = "" if uri.startswith("http") else "Start `mlflow ui` in the project root, then open\n"
    return atomic_write_text(
        out_md,
        f"# MLflow — {experiment}\n\n{local}"
        f"- the runs table (model-training view): {links['runs']}\n"
        "- every run compared, FD/FID with their intervals among the metrics: "
        f"{links['compare']}\n",
    )
