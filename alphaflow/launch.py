"""Dispatch one pipeline stage as a submitit job (SLURM, local or in-process), block until it ends.

`launch(command, executor=..., resources=...)` submits `command` (e.g. `[python, -m, alphaflow, train, ...]`),
prints the job id and its log paths, waits, and returns 0 or the stage's exit code. Each task of the job runs
`alphaflow.job.StageJob`: the command as a child process, one task per GPU, requeued on preemption and time
limits (the contract with the stage is in that module). Here, on the submitting side: the executor, the
polling of the tasks' results and of squeue/sacct, and cancelling the job when the launcher is interrupted.
"""

import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit
from submitit.core import utils as submitit_utils

from alphaflow.errors import UserError
from alphaflow.job import STAGE_FAILED_RE, StageJob

EXECUTORS = ("slurm", "local", "debug")
NO_RESULT_EXIT_CODE = 1  # the job ended without reporting (cancelled, killed, vanished)
_TERMINAL = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "REVOKED",
    "SPECIAL_EXIT",
    "TIMEOUT",
}  # SLURM states after which no task runs


@dataclass
class Resources:
    # fmt: off
    nodes:             int = 1              # SLURM nodes (local: must be 1)
    gpus_per_node:     int = 0              # GPUs per node (local: sets CUDA_VISIBLE_DEVICES=0..n-1)
    tasks_per_node:    int | None = None    # None = gpus_per_node or 1 (one task per GPU for DDP)
    cpus_per_task:     int = 2              # CPU cores per task (data-loader workers + 1)
    mem_gb:            float = 8            # memory per node, GB
    timeout_min:       int = 60             # wall-clock limit per (re)start; SIGUSR2 arrives 90 s before it
    partition:         str | None = None    # None = the cluster's default partition
    account:           str | None = None    # None = the user's default account
    qos:               str | None = None    # None = the default QOS
    # fmt: on
    additional: dict = field(default_factory=dict)  # extra sbatch flags, e.g. {"constraint": "a100"}
    # fmt: off
    array_parallelism: int = 16             # array elements running at once (local executor included)
    max_requeues:      int = 20             # restarts after preemption/time limit before giving up
    # fmt: on

    @property
    def ntasks_per_node(self):
        return self.tasks_per_node if self.tasks_per_node is not None else max(self.gpus_per_node, 1)


# ----------------------------------------------------------------------------
# Launcher side: submit, report, poll, cancel on interrupt.


class _Interrupted(BaseException):
    """SIGINT/SIGTERM reached the launcher (BaseException: must not be caught as a job error)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Interrupts:
    """Turns SIGINT/SIGTERM into _Interrupted; inside `deferred()` it waits until the block ends."""

    def __init__(self):
        self.signum = None
        self._defer = False
        self._saved = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._saved[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)

    def _handler(self, signum, frame):
        self.signum = signum
        if not self._defer:
            raise _Interrupted(signum)

    def deferred(self):
        interrupts = self

        class _Block:
            def __enter__(self):
                interrupts._defer = True

            def __exit__(self, *exc):
                interrupts._defer = False
                if interrupts.signum is not None and exc[0] is None:
                    raise _Interrupted(interrupts.signum)

        return _Block()


def _make_executor(executor, resources, log_dir, job_name):
    if executor not in EXECUTORS:
        raise ValueError(f"Unknown executor {executor!r}; expected one of {', '.join(EXECUTORS)}")
    if executor == "slurm" and submitit.SlurmExecutor.affinity() < 0:
        raise UserError("executor 'slurm' requested but `srun` is not on PATH; use --executor local")
    kwargs = {} if executor == "debug" else {f"{executor}_max_num_timeout": resources.max_requeues}
    ex = submitit.AutoExecutor(folder=Path(log_dir) / "%j", cluster=executor, **kwargs)
    ex.update_parameters(
        name=job_name,
        nodes=resources.nodes,
        gpus_per_node=resources.gpus_per_node or None,  # no --gpus-per-node=0 on GPU-less clusters
        tasks_per_node=resources.ntasks_per_node,
        cpus_per_task=resources.cpus_per_task,
        mem_gb=resources.mem_gb,
        timeout_min=int(resources.timeout_min),
        slurm_partition=resources.partition,
        slurm_account=resources.account,
        slurm_qos=resources.qos,
        slurm_array_parallelism=resources.array_parallelism,
        slurm_additional_parameters={"requeue": True, **resources.additional},
        slurm_srun_args=["--kill-on-bad-exit=1"],  # one DDP rank failing ends the others instead of a hang
    )  # slurm_* parameters are dropped silently by the local and debug executors
    return ex


class _Watch:
    """One submitted job (array element or whole job) and what the launcher knows about it."""

    def __init__(self, job, label):
        self.job = job
        self.label = label
        self.code = None  # exit code once finished
        self.quiet_since = None  # first poll at which SLURM knew nothing about the job
        self.ended_since = None  # first poll at which SLURM said the job ended

    @property
    def tasks(self):
        return [self.job.task(k) for k in range(self.job.num_tasks)]


def _announce(w, executor):
    job = w.job
    task0 = w.tasks[0]
    n = job.num_tasks
    print(f"[launch] {w.label}: submitted job {job.job_id} ({executor}, {n} task{'s' if n > 1 else ''})", flush=True)
    print(f"[launch]   stdout: {task0.paths.stdout}", flush=True)
    print(f"[launch]   stderr: {task0.paths.stderr}", flush=True)
    if n > 1:
        print(f"[launch]   (tasks 1-{n - 1}: same folder, _<task>_log.out/err)", flush=True)


def _task_outcome(task_job):
    """Exit code reported by one task, or None when it wrote no result (yet)."""
    path = task_job.paths.result_pickle
    if not path.exists():
        return None
    try:
        outcome, value = submitit_utils.pickle_load(path)
    except (EOFError, OSError):
        return None  # being written
    if outcome == "success":
        return value if isinstance(value, int) else 0
    match = STAGE_FAILED_RE.search(str(value))
    if match is None:
        print(f"[launch] job error:\n{value}", file=sys.stderr, flush=True)
    return int(match.group(1)) if match else 1


def _refresh(folder):
    # Make new files visible on network file systems (same trick as submitit).
    try:
        folder.chmod(folder.stat().st_mode)
    except OSError:
        pass


def _slurm_states(job_ids):
    """{job id: SLURM state} from squeue, then sacct for the ids squeue no longer knows."""
    states = _squeue_states(job_ids)
    missing = [j for j in job_ids if j not in states]
    if missing:
        states.update(_sacct_states(missing))
    return states


def _squeue_states(job_ids):
    """{job id: state} for the jobs slurmctld still remembers (finished ones for MinJobAge seconds)."""
    masters = sorted({j.split("_")[0] for j in job_ids})
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "-t", "all", "-j", ",".join(masters), "-o", "%i %T"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in job_ids:
            states[parts[0]] = parts[1]
    return states


def _sacct_states(job_ids):
    """{job id: state} from accounting; {} when accounting is disabled or unreachable."""
    try:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if out.returncode != 0:
        return {}
    states = {}
    for line in out.stdout.splitlines():
        job_id, _, state = line.partition("|")
        if job_id in job_ids and state:
            states[job_id] = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
    return states


def _poll(watches, executor, vanish_timeout_s):
    """Updates w.code for every watch that has finished."""
    active = [w for w in watches if w.code is None]
    if executor == "debug":
        for w in active:
            if w.job.done():  # runs the job in this process
                w.code = w.job.result()
        return
    for w in active:
        _refresh(w.tasks[0].paths.folder)
    states = _slurm_states([w.job.job_id for w in active]) if executor == "slurm" else {}
    now = time.monotonic()
    # After the job ended, result files may take a moment to show up on a network file system.
    grace_s = min(15.0, vanish_timeout_s) if executor == "slurm" else 1.0
    for w in active:
        codes = [_task_outcome(t) for t in w.tasks]
        if all(c is not None for c in codes):
            w.code = next((c for c in codes if c), 0)
            continue
        failed = next((c for c in codes if c), None)
        if failed is not None:  # one DDP rank failed: do not wait for the others to time out
            print(f"[launch] {w.label}: a task failed with code {failed}; cancelling job {w.job.job_id}", flush=True)
            w.job.cancel(check=False)
            w.code = failed
            continue
        if executor == "local":
            ended = w.job.done()
            known = True
        else:
            state = states.get(w.job.job_id)
            known = state is not None
            ended = state in _TERMINAL
        w.quiet_since = None if known else (w.quiet_since or now)
        w.ended_since = (w.ended_since or now) if ended else None
        if w.ended_since is not None and now - w.ended_since >= grace_s:
            state = states.get(w.job.job_id, "ended")
            print(f"[launch] {w.label}: job {w.job.job_id} {state} without a result from every task", flush=True)
            w.code = next((c for c in codes if c), NO_RESULT_EXIT_CODE)
        elif w.quiet_since is not None and now - w.quiet_since >= vanish_timeout_s:
            print(
                f"[launch] {w.label}: job {w.job.job_id} is unknown to squeue/sacct and left no result "
                f"for {vanish_timeout_s:.0f} s; treating it as lost",
                flush=True,
            )
            w.code = NO_RESULT_EXIT_CODE


def _cancel(watches, executor):
    if executor == "slurm":
        masters = sorted({w.job.job_id.split("_")[0] for w in watches if w.code is None})
        if masters:
            subprocess.call(["scancel", *masters])
    elif executor == "local":
        for w in watches:
            if w.code is None:
                w.job.cancel(check=False)


def launch(command, *, executor, resources, log_dir, job_name, array=None, poll_s=2.0, vanish_timeout_s=60.0):
    """Runs `command` as a job and blocks until it ends; returns its exit code.

    Args:
        command: argv of the stage, e.g. [sys.executable, "-m", "alphaflow", "train", ...].
        executor: "slurm", "local" (subprocesses on this machine) or "debug" (in this process).
        resources: a `Resources`; slurm-only fields are ignored elsewhere.
        log_dir: submitit folder; each job writes to log_dir/<job id>/.
        job_name: SLURM job name.
        array: None, or a list of extra-argument lists: one array job, element i runs command + array[i].
        poll_s: seconds between status checks.
        vanish_timeout_s: a job that SLURM no longer knows and that left no result for this long is lost.

    Returns:
        0 when every task of every element succeeded; else the first non-zero stage exit code (signal N
        -> 128 + N), NO_RESULT_EXIT_CODE (1) for a job that ended without result (cancelled, lost), or
        128 + signal number when the launcher itself was interrupted (the job is cancelled first).
    """
    if not command:
        raise ValueError("launch: empty command")
    if array is not None and not array:
        raise ValueError("launch: empty array")
    ex = _make_executor(executor, resources, log_dir, job_name)
    fn = StageJob(command, max_requeues=resources.max_requeues, raise_on_failure=executor != "debug")
    todo = [None] if array is None else [[str(a) for a in args] for args in array]
    watches = []
    with _Interrupts() as interrupts:
        try:
            if executor == "slurm" and array is not None:
                with interrupts.deferred():
                    jobs = ex.map_array(fn, todo)
                    watches = [_Watch(j, f"{job_name}[{i}]") for i, j in enumerate(jobs)]
                todo = []
                print(
                    f"[launch] {job_name}: array job {jobs[0].job_id.split('_')[0]} with {len(jobs)} elements",
                    flush=True,
                )
                for w in watches[:3]:
                    _announce(w, executor)
            while True:
                # Local and debug executors have no array jobs: submit while under array_parallelism.
                running = sum(w.code is None for w in watches)
                while todo and running < max(1, resources.array_parallelism):
                    args = todo.pop(0)
                    with interrupts.deferred():
                        job = ex.submit(fn) if args is None else ex.submit(fn, args)
                        label = job_name if args is None else f"{job_name}[{len(watches)}]"
                        watches.append(_Watch(job, label))
                    _announce(watches[-1], executor)
                    running += 1
                _poll(watches, executor, vanish_timeout_s)
                if not todo and all(w.code is not None for w in watches):
                    break
                time.sleep(poll_s)
        except _Interrupted as e:
            print(f"[launch] {job_name}: {e} received; cancelling", flush=True)
            _cancel(watches, executor)
            return 128 + e.signum
        except (submitit_utils.FailedSubmissionError, submitit_utils.FailedJobError) as e:
            print(f"[launch] {job_name}: submission failed: {e}", file=sys.stderr, flush=True)
            _cancel(watches, executor)
            return NO_RESULT_EXIT_CODE
    try:
        (Path(log_dir) / "%j").rmdir()  # submitit creates the unformatted folder; it stays empty
    except OSError:
        pass
    failed = [w for w in watches if w.code]
    for w in failed:
        print(
            f"[launch] {w.label}: job {w.job.job_id} failed with exit code {w.code}; log: {w.tasks[0].paths.stderr}",
            flush=True,
        )
    if not failed:
        print(f"[launch] {job_name}: done ({len(watches)} job{'s' if len(watches) > 1 else ''})", flush=True)
    return failed[0].code if failed else 0
