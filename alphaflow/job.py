"""The job side of `alphaflow launch`: what runs in each task of the submitit job (SLURM, local or in-process).

`StageJob(command)` runs the stage command as a child process with the torch.distributed variables exported
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so multi-GPU and multi-node
training is one job with one task per GPU. CUDA_VISIBLE_DEVICES is left alone: a task uses device
`cuda:LOCAL_RANK`. A stage that exits non-zero raises StageFailed, whose message the launcher reads back.

Contract with the stage (preemption and time limits):
  * SLURM sends SIGUSR2 90 s before the time limit (`--signal=USR2@90`) or when a job is preempted;
    `scancel` and time limits send SIGTERM. On SIGUSR2 or SIGTERM the stage saves its checkpoint and
    exits with REQUEUE_EXIT_CODE; started again with the same command it resumes from that checkpoint.
  * The job is then requeued (same job id, log appended), unless it was cancelled or ran out of
    `max_requeues`. A stage may also exit with REQUEUE_EXIT_CODE on its own to ask for a requeue.
"""

import ctypes
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import submitit
from submitit.core import utils as submitit_utils

from alphaflow.errors import REQUEUE_EXIT_CODE


class StageFailed(RuntimeError):
    """Raised inside the job when the stage exits non-zero; the launcher reads the code back."""

    def __init__(self, code):
        super().__init__(f"stage exited with code {code}")
        self.code = code


STAGE_FAILED_RE = re.compile(r"StageFailed: stage exited with code (\d+)")


# ----------------------------------------------------------------------------
# Inside the job: one StageJob call per task.


def _exit_code(returncode):
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N -> 128 + N, as shells do


def _die_with_parent():
    # The stage gets SIGTERM if its task process dies (e.g. SIGKILLed by the local controller).
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _slurm_job_running(job_id):
    # Inside the job: still RUNNING (not COMPLETING after scancel/time limit, not already requeued)?
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.stdout.strip() == "RUNNING"


class StageJob(submitit.helpers.Checkpointable):
    """Runs the stage command as a child process; checkpoint() hands preemption over to it."""

    checkpoint_timeout_s = 60.0  # how long checkpoint() waits for the stage to save and exit (< the 90 s signal delay)

    def __init__(self, command, *, max_requeues=20, raise_on_failure=True):
        self.command = [str(c) for c in command]
        self.max_requeues = max_requeues
        self.raise_on_failure = raise_on_failure  # False for the debug executor (it opens pdb on exceptions)
        self.restarts = 0  # travels with the pickle that submitit resubmits
        self._proc = None
        self._forwarded = set()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_proc=None, _forwarded=set())
        return state

    def __call__(self, extra_args=()):
        env = submitit.JobEnvironment()
        cluster = env.cluster
        if cluster != "debug":
            # A stale result from before a requeue would make the launcher stop early.
            env.paths.result_pickle.unlink(missing_ok=True)
        saved = {} if cluster == "debug" else self._install_handlers(forward=cluster != "slurm")
        try:
            while True:
                code = self._run_once(env, list(extra_args))
                if code == 128 + signal.SIGTERM and env.global_rank != 0 and cluster == "slurm":
                    # SLURM is ending the job on every node (rank 0's requeue, a cancel, the time limit): its
                    # stage may still be exiting when the SIGTERM lands. Rank 0 reports the outcome; a result
                    # written here would end the launcher's wait as a failure.
                    self._leave_requeue_to_rank0(cluster, "its stage was stopped by SIGTERM")
                if code != REQUEUE_EXIT_CODE:
                    break
                if env.global_rank != 0 and cluster != "debug":
                    self._leave_requeue_to_rank0(cluster)  # does not return
                if not self._may_requeue(env):
                    break
                if cluster == "debug":  # in-process: "requeue" is simply running again
                    self.restarts += 1
                    continue
                self._requeue(env, extra_args)  # does not return
        finally:
            self._stop_child()
            for signum, handler in saved.items():
                signal.signal(signum, handler)
        if code != 0 and self.raise_on_failure:
            raise StageFailed(code)
        return code

    def _run_once(self, env, extra_args):
        cmd = self.command + extra_args
        dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        print(
            f"[alphaflow.launch] job {env.job_id} rank {dist_env.rank}/{dist_env.world_size} on {env.hostname} "
            f"(restart {self.restarts}): {shlex.join(cmd)}",
            flush=True,
        )
        sys.stderr.flush()
        self._forwarded = set()
        self._proc = subprocess.Popen(cmd, env=dict(os.environ), preexec_fn=_die_with_parent)
        while (code := self._proc.poll()) is None:
            time.sleep(0.2)
        code = _exit_code(code)
        print(f"[alphaflow.launch] stage exited with code {code}", flush=True)
        return code

    def _may_requeue(self, env):
        if self.restarts >= self.max_requeues:
            print(f"[alphaflow.launch] not requeued: {self.restarts} restarts already (max_requeues)", flush=True)
            return False
        if env.cluster == "slurm" and not _slurm_job_running(os.environ["SLURM_JOB_ID"]):
            print("[alphaflow.launch] not requeued: the job is ending (cancelled or out of time)", flush=True)
            return False
        return True

    def _requeue(self, env, extra_args):
        # The stage asked for a requeue by itself: do what submitit does after checkpoint().
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # no second requeue from a late SIGUSR2
        old = submitit_utils.DelayedSubmission.load(env.paths.submitted_pickle)
        self.restarts += 1
        delayed = submitit_utils.DelayedSubmission(self, extra_args)
        delayed.set_timeout(old._timeout_min, old._timeout_countdown)
        with submitit_utils.temporary_save_path(env.paths.submitted_pickle) as tmp:
            delayed.dump(tmp)
        env._requeue(old._timeout_countdown)  # slurm: scontrol requeue; local: exits for the controller
        print("[alphaflow.launch] requeued at the stage's request", flush=True)
        sys.exit(REQUEUE_EXIT_CODE)  # SystemExit: submitit writes no result, the launcher keeps waiting

    def _leave_requeue_to_rank0(self, cluster, why="stage wants a requeue"):
        # Rank 0 decides. This task writes no result (a stale one would end the launcher's wait) and,
        # on SLURM, must not exit non-zero before rank 0 has requeued: srun --kill-on-bad-exit would
        # kill rank 0 in the middle of its checkpoint. So it waits for the requeue to kill it.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        if cluster == "slurm":
            signal.signal(signal.SIGTERM, lambda *_: os._exit(REQUEUE_EXIT_CODE))
            print(f"[alphaflow.launch] {why}; waiting for rank 0 to requeue or end the job", flush=True)
            time.sleep(self.checkpoint_timeout_s + 60)
        sys.exit(REQUEUE_EXIT_CODE)

    def checkpoint(self, extra_args=()):
        # Called by submitit (rank 0) on SIGUSR2: let the stage save and exit, then resubmit self.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        self._forward(signal.SIGUSR2)
        if not self._wait_child(self.checkpoint_timeout_s):
            print(
                f"[alphaflow.launch] stage still running {self.checkpoint_timeout_s:.0f} s after SIGUSR2; "
                "requeueing anyway (it resumes from its last checkpoint)",
                flush=True,
            )
        if self.restarts >= self.max_requeues:
            return None  # submitit: "not requeued", the job fails
        self.restarts += 1
        return super().checkpoint(extra_args)

    # ------------------------------------------------------------------------
    # Child process and signals.

    def _install_handlers(self, forward):
        # On SLURM every process of the step receives scancel/--signal signals, the stage included,
        # so forwarding would deliver them twice; the local controller signals only the task process.
        saved = {}
        for signum in (signal.SIGUSR2, signal.SIGTERM):
            previous = signal.getsignal(signum)
            saved[signum] = previous

            def handler(num, frame, previous=previous):
                if forward:
                    self._forward(num)
                if callable(previous):
                    previous(num, frame)  # submitit: SIGUSR2 -> checkpoint + requeue, SIGTERM -> logged

            signal.signal(signum, handler)
        return saved

    def _forward(self, signum):
        if self._proc is not None and self._proc.returncode is None and signum not in self._forwarded:
            self._forwarded.add(signum)
            try:
                os.kill(self._proc.pid, signum)
            except ProcessLookupError:
                pass

    def _wait_child(self, timeout):
        # os.waitpid, not Popen.wait: this runs inside a signal handler that may have interrupted Popen.poll.
        if self._proc is None or self._proc.returncode is not None:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(self._proc.pid, os.WNOHANG)
            except ChildProcessError:
                return True  # already reaped by the main loop
            if pid:
                self._proc.returncode = os.waitstatus_to_exitcode(status)
                return True
            time.sleep(0.2)
        return False

    def _stop_child(self):
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
