"""One writer per run: a lock file in the folder a stage writes, held while it writes.

    with runlock.hold(run_dir / ".lock", "train meanflow-tiny"):
        ...

Where: `results/runs/<run>/.lock` for `alphaflow train`; for one part of a sample set (the array parts of a
cell sample into one folder in parallel, on purpose) `results/runs/<run>/samples/<weights>/<sampler>/
.lock-part-<i>-of-<n>`. The lock file is JSON: host, pid, pid_start (the process's start time, so that a
reused pid is not taken for the holder), slurm_job ($SLURM_JOB_ID, or `<SLURM_ARRAY_JOB_ID>_<SLURM_ARRAY_TASK_ID>`
in an array task), started and heartbeat (Unix time), what (e.g. "train meanflow-tiny"), and a random token
that names this holding.

Acquire: the record goes to a temporary file next to the lock, which is then `os.link`ed to the lock name. A
link fails with EEXIST when the name exists, atomically on NFS too, where flock/fcntl locks depend on the
NFS lock manager and O_EXCL creation is not atomic on old clients; and the lock appears with its content, so
a reader never sees an empty lock. When the server linked but its reply was lost, the retried call says
EEXIST: the temporary file's link count (2) tells that the link is ours.

Heartbeat: a daemon thread rewrites the record with a new `heartbeat` every heartbeat_s (default 30 s, or
$ALPHAFLOW_LOCK_HEARTBEAT_S): temporary file + os.replace in the lock's folder (alphaflow.io), only while the
lock holds our token (a taker's lock is not overwritten; this process prints that it lost the lock; a lock
deleted by hand is linked again). Release
(leaving `hold` normally, by an exception or SIGTERM's exit) removes the lock if it is still ours; after
kill -9 it stays, for takeover.

Stale: the holder is on this host and its process is gone (os.kill(pid, 0) → ProcessLookupError, a zombie
that init has not reaped yet, or the pid now belongs to a later process); or it is the same SLURM job
(requeued, with a new pid, perhaps on another node) and not alive on this host; or it is on another host and
its heartbeat is older than stale_s (default 10 × heartbeat_s; the hosts' clocks must agree, as NTP keeps
them).

Takeover: under a second lock `<name>.break`, taken like the first (so one taker at a time), the taker
checks that the lock still holds the stale record's token and os.replaces it by its own record. The lock
never disappears meanwhile, so no plain acquire slips in: of any number of racing takers exactly one gets
the lock, and it prints one line saying whose stale lock it took over. A break lock whose taker died is
itself stale by the rules above (without the SLURM rule), or after BREAK_S, and removed.

Refused: a live holder makes `acquire` raise RunLocked (a UserError: `alphaflow: <message>`, exit 2) naming
the holder, its heartbeat and how to take over; with wait=True it polls until `timeout` first.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from alphaflow.errors import OutOfSpace, UserError
from alphaflow.io import atomic_write_json, space_guard, write_bytes

HEARTBEAT_ENV = "ALPHAFLOW_LOCK_HEARTBEAT_S"
HEARTBEAT_S = 30.0
STALE_HEARTBEATS = 10  # stale_s = this × heartbeat_s
BREAK_S = 60.0  # a takeover takes milliseconds: a break lock this old is stale whatever its holder


class RunLocked(UserError):
    """Another live process holds the lock; the message names it and how to take over if it is gone."""


# ----------------------------------------------------------------------------
# The holder record


def slurm_job(environ=os.environ):
    """The SLURM job of this process (`<array job>_<task>` for an array task), or None outside SLURM."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID") or None


def proc_stat(pid):
    """The fields of /proc/<pid>/stat after the command name (state first), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_of(fields):
    """The start time in clock ticks since boot from proc_stat's fields, or None where unknown."""
    return fields[19] if fields and len(fields) > 19 else None


def process_start(pid):
    """The start time of process `pid` in clock ticks since boot (/proc/<pid>/stat), or None where unknown."""
    return start_of(proc_stat(pid))


def holder_record(what):
    """This process's record for a new lock."""
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": process_start(os.getpid()),
        "slurm_job": slurm_job(),
        "started": now,
        "heartbeat": now,
        "what": what,
        "token": uuid.uuid4().hex,
    }


def read_record(path):
    """The lock's record, None when there is no lock; an unreadable one counts as an unknown holder whose
    heartbeat is the file's modification time."""
    try:
        with open(path) as f:
            text = f.read()
        mtime = os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
        if isinstance(record, dict):
            return record
    except ValueError:
        pass
    return {"host": "unknown", "pid": None, "started": mtime, "heartbeat": mtime, "what": "an unreadable lock"}


def process_alive(pid, start=None):
    """Whether process `pid` of this host runs (and, with `start`, is the process that started then)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    fields = proc_stat(pid)  # read once: the state and the start time
    if fields and fields[0] in ("Z", "X"):
        return False  # killed, not yet reaped: a container's init may take seconds to reap an orphan
    return start is None or start_of(fields) in (None, start)


def stale_reason(holder, me, stale_s, now=None, requeue=True):
    """Why `me` may take over the lock `holder` holds, or None while the holder counts as alive.
    requeue: a holder of `me`'s SLURM job elsewhere counts as gone (the job was requeued)."""
    if holder.get("host") == me["host"]:
        alive = process_alive(holder.get("pid"), holder.get("pid_start"))
        return None if alive else f"its process {holder.get('pid')} on this host is gone"
    if requeue and holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]:
        return f"it is this SLURM job {me['slurm_job']} before its requeue"
    age = heartbeat_age(holder, now)
    return f"its last heartbeat is {age:.0f} s old (> {stale_s:g} s)" if age > stale_s else None


def heartbeat_age(record, now=None):
    return max(0.0, (time.time() if now is None else now) - float(record.get("heartbeat") or 0.0))


def describe(record):
    """`pid 123 on node07 (SLURM job 456)`."""
    job = f" (SLURM job {record['slurm_job']})" if record.get("slurm_job") else ""
    return f"pid {record.get('pid')} on {record.get('host')}{job}"


def refusal(path, holder, stale_s, waited=None):
    """The one-line message of RunLocked."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started") or 0)))
    check = (
        f"`squeue -j {holder['slurm_job']}`"
        if holder.get("slurm_job")
        else f"`ps -p {holder.get('pid')}` on {holder.get('host')}"
    )
    wait = f" (waited {waited:.1f} s)" if waited is not None else ""
    return (
        f"{path} is held by {describe(holder)} since {since}, last heartbeat {heartbeat_age(holder):.0f} s "
        f"ago ({holder.get('what')}): another process is writing here{wait}. If it is gone, the next start "
        f"takes the lock over (at once on {holder.get('host')}, from another host once the heartbeat is "
        f"{stale_s:g} s old); to take over now, check that it is gone ({check}) and delete {path}"
    )


def live_locks(folder, pattern=".lock-part-*-of-*"):
    """[(path, holder)] of the locks under `folder` (recursively) whose holder counts as alive, e.g. the sample
    parts still writing a run's samples/ (their temporary `.tmp` files are not locks)."""
    me, stale_s = holder_record("a check"), STALE_HEARTBEATS * heartbeat_seconds()
    out = []
    for path in sorted(Path(folder).rglob(pattern)):
        holder = None if path.name.endswith(".tmp") else read_record(path)
        if holder is not None and stale_reason(holder, me, stale_s, requeue=False) is None:
            out.append((path, holder))
    return out


# ----------------------------------------------------------------------------
# Create, take over, acquire


def _create(path, record):
    """Links a complete lock file to `path`; False when a lock is there."""
    tmp = path.with_name(f"{path.name}.{record['token']}.tmp")
    data = json.dumps(record, indent=1).encode()
    with space_guard(path, len(data), "the lock file"):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                write_bytes(f, data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # held, unless the server linked and lost its reply: the link count tells
            return os.stat(tmp).st_nlink == 2
        finally:
            os.unlink(tmp)


def _take_over(path, stale, record, stale_s):
    """Replaces the stale lock by ours in place, under the break lock `<name>.break` (one taker at a time);
    False when the lock changed meanwhile or another taker is at it."""
    brk = path.with_name(f"{path.name}.break")
    if not _create(brk, record):
        breaker = read_record(brk)
        if breaker is not None and (
            stale_reason(breaker, record, stale_s, requeue=False) is not None or heartbeat_age(breaker) > BREAK_S
        ):
            _unlink_if(brk, breaker)  # a taker died (or hangs) while taking over
        else:
            time.sleep(0.01)  # another taker is at it, for milliseconds
        return False
    try:
        if (read_record(path) or {}).get("token") != stale.get("token"):
            return False  # released, or taken over by another taker
        atomic_write_json(path, record)
        return True
    finally:
        os.unlink(brk)


def _unlink_if(path, record):
    """Removes the lock at `path` if it still holds `record`'s token."""
    if (read_record(path) or {}).get("token") == record.get("token"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def heartbeat_seconds(heartbeat_s=None):
    return float(heartbeat_s if heartbeat_s is not None else os.environ.get(HEARTBEAT_ENV, HEARTBEAT_S))


def acquire(path, what, *, heartbeat_s=None, stale_s=None, wait=False, timeout=None, poll_s=1.0):
    """Takes the lock at `path` (a stale one over, saying so); returns the held RunLock.

    Raises RunLocked while a live process holds it; wait=True polls every poll_s until `timeout` s first
    (None: no limit)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heartbeat_s = heartbeat_seconds(heartbeat_s)
    stale_s = STALE_HEARTBEATS * heartbeat_s if stale_s is None else float(stale_s)
    record = holder_record(what)
    t0 = time.monotonic()
    while not _create(path, record):
        holder = read_record(path)
        if holder is None:
            continue  # released meanwhile
        reason = stale_reason(holder, record, stale_s)
        if reason is not None:
            if _take_over(path, holder, record, stale_s):
                print(
                    f"[alphaflow] took over the stale lock {path} of {describe(holder)} ({holder.get('what')}): "
                    f"{reason}",
                    file=sys.stderr,
                    flush=True,
                )
                break
            continue  # another taker is at it or came first: look again
        waited = time.monotonic() - t0
        if not wait or (timeout is not None and waited >= timeout):
            raise RunLocked(refusal(path, holder, stale_s, waited if wait else None))
        time.sleep(poll_s)
    return RunLock(path, record, heartbeat_s)


@contextlib.contextmanager
def hold(path, what, **kw):
    """`acquire(path, what, **kw)` for the block; released when it ends, by an exception too."""
    lock = acquire(path, what, **kw)
    try:
        yield lock
    finally:
        lock.release()


# ----------------------------------------------------------------------------
# The held lock


class RunLock:
    """A held lock: a daemon thread beats every heartbeat_s until `release`."""

    def __init__(self, path, record, heartbeat_s):
        self.path, self.record, self.heartbeat_s = Path(path), record, heartbeat_s
        self.lost = False  # another process took the lock over (this one was stale)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_loop, name=f"heartbeat {self.path}", daemon=True)
        self._thread.start()

    def ours(self):
        return (read_record(self.path) or {}).get("token") == self.record["token"]

    def beat(self):
        """Writes a new heartbeat while the lock is ours; returns whether it did."""
        current = read_record(self.path)
        self.record["heartbeat"] = time.time()
        if current is None:  # deleted by hand while this process runs: linked again, unless another took it
            return _create(self.path, self.record)
        if current.get("token") != self.record["token"]:
            if not self.lost:
                print(
                    f"[alphaflow] lost the lock {self.path} to {describe(current)}: stop this process, two are writing",
                    file=sys.stderr,
                    flush=True,
                )
            self.lost = True
            return False
        atomic_write_json(self.path, self.record)
        return True

    def _beat_loop(self):
        while not self._stop.wait(self.heartbeat_s) and not self.lost:
            try:
                self.beat()
            except (OSError, OutOfSpace):
                pass  # a transient filesystem error or a full disk: the next beat tries again

    def release(self):
        """Stops the heartbeat and removes the lock if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        if self.ours():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
