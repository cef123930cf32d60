"""alphaflow.launch against a real SLURM cluster (bring one up, as root, with `bash tests/slurm/setup.sh`).

Slow (-m slow): each requeue waits out AuthInfo=cred_expire (10 s in the test cluster, 120 s by
default). Skipped when no SLURM controller answers; with ALPHAFLOW_REQUIRE_SLURM=1 (CI) that is a failure.
"""

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import submitit

import alphaflow.launch as launch_mod
from alphaflow.errors import REQUEUE_EXIT_CODE
from alphaflow.launch import Resources, launch

pytestmark = pytest.mark.slow

STAGES = Path(__file__).parent / "slurm"
PY = sys.executable
SIGTERM_IGNORING_STAGE = [
    PY,
    "-c",
    "import json, os, pathlib, signal, sys, time; "
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "pathlib.Path(sys.argv[1]).write_text(json.dumps({'job': os.environ['SLURM_JOB_ID']})); "
    "time.sleep(600)",
]


@pytest.fixture
def log_dir(tmp_path):
    return tmp_path / "logs"  # one node: /tmp is shared between "login" and "compute"


def resources(**kw):
    return Resources(**{"cpus_per_task": 1, "mem_gb": 1, "timeout_min": 10, **kw})


def run(command, log_dir, **kw):
    kw.setdefault("resources", resources())
    kw.setdefault("poll_s", 0.5)
    return launch(command, executor="slurm", log_dir=log_dir, job_name=kw.pop("job_name", "slow-test"), **kw)


def in_background(action, started, timeout=60):
    """Runs action(job_id) in a thread once the stage has written `started`; returns (thread, times)."""
    times = {}

    def target():
        deadline = time.monotonic() + timeout
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        times["action"], times["action_wall"] = time.monotonic(), time.time()
        action(json.loads(started.read_text())["job"])

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, times


def reference_state(tmp_path, n):
    state = tmp_path / "reference.json"
    subprocess.run(
        [PY, str(STAGES / "ckpt_counter.py"), str(state), str(n), "--step-s", "0"], check=True, capture_output=True
    )
    return json.loads(state.read_text())


def report(name, **numbers):
    print(f"\n[timing] {name}: " + ", ".join(f"{k}={v:.1f}s" for k, v in numbers.items()))


# ----------------------------------------------------------------------------


def test_job_completes(slurm, log_dir, capsys):
    t0 = time.monotonic()
    assert run([PY, "-c", "print('hello from slurm')"], log_dir) == 0
    out = capsys.readouterr().out
    stdout = Path(re.search(r"stdout: (\S+)", out).group(1))
    assert "hello from slurm" in stdout.read_text()
    report("job_completes", wall=time.monotonic() - t0)


def test_array_job_and_exit_code(slurm, log_dir, tmp_path):
    t0 = time.monotonic()
    exit_with = [PY, "-c", "import sys, pathlib; pathlib.Path(sys.argv[1]).touch(); sys.exit(int(sys.argv[2]))"]
    array = [[str(tmp_path / f"ran{i}"), code] for i, code in enumerate(["0", "0", "5", "0"])]
    assert run(exit_with, log_dir, array=array, resources=resources(array_parallelism=2)) == 5
    assert all((tmp_path / f"ran{i}").exists() for i in range(4))
    report("array_job", wall=time.monotonic() - t0)


def _node_gpus():
    out = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=15).stdout
    return max((int(n) for n in re.findall(r"gpu(?::[\w-]+)?:(\d+)", out)), default=0)


def test_ddp_two_tasks_on_fake_gpus(slurm, log_dir, tmp_path):
    if _node_gpus() < 2:
        pytest.skip(
            "the node has fewer than 2 (fake) GPUs; setup.sh configures 2 unless SLURM_FAKE_GPUS says otherwise"
        )
    t0 = time.monotonic()
    out = tmp_path / "ddp"
    assert run([PY, str(STAGES / "ddp_check.py"), str(out)], log_dir, resources=resources(gpus_per_node=2)) == 0
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and [r["LOCAL_RANK"] for r in ranks] == ["0", "1"]
    assert {r["WORLD_SIZE"] for r in ranks} == {"2"} and len({r["SLURM_JOB_ID"] for r in ranks}) == 1
    assert len({(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in ranks}) == 1
    assert [r["allreduce"] for r in ranks] == [3.0, 3.0]
    assert {r["SLURM_GPUS_ON_NODE"] for r in ranks} == {"2"}  # one task per (fake) GPU
    report("ddp_two_tasks", wall=time.monotonic() - t0)


def test_scancel_stage_checkpoints_and_is_not_requeued(slurm, log_dir, tmp_path):
    started, state = tmp_path / "started.json", tmp_path / "state.json"
    cmd = [PY, str(STAGES / "ckpt_counter.py"), str(state), "100000", "--step-s", "0.2", "--started", str(started)]
    thread, times = in_background(lambda job: subprocess.run(["scancel", job], check=True), started)
    code = run(cmd, log_dir)
    detected = time.monotonic() - times["action"]
    assert code == REQUEUE_EXIT_CODE  # the stage saved and asked for a requeue, but the job was cancelled
    assert len(json.loads(state.read_text())["starts"]) == 1
    assert detected < 60
    report("scancel (stage exits)", detection=detected)


@pytest.mark.parametrize("accounting", ["as-configured", "none"])
def test_scancel_of_a_job_that_leaves_no_result(slurm, log_dir, tmp_path, monkeypatch, accounting):
    # The stage ignores SIGTERM: SLURM kills everything after KillWait, and no result file is written.
    if accounting == "none":  # as if sacct were disabled and slurmctld had already forgotten the job
        monkeypatch.setattr(launch_mod, "_sacct_states", lambda ids: {})
        real_squeue = launch_mod._squeue_states
        monkeypatch.setattr(
            launch_mod,
            "_squeue_states",
            lambda ids: {j: s for j, s in real_squeue(ids).items() if s not in launch_mod._TERMINAL},
        )
    started = tmp_path / "started.json"
    thread, times = in_background(lambda job: subprocess.run(["scancel", job], check=True), started)
    code = run(SIGTERM_IGNORING_STAGE + [str(started)], log_dir, vanish_timeout_s=5)
    detected = time.monotonic() - times["action"]
    assert code == launch_mod.NO_RESULT_EXIT_CODE
    assert detected < 60
    report(f"scancel (no result, accounting {accounting})", detection=detected)


def _check_resumed(tmp_path, state, n, stopped_by, starts=2):
    got = json.loads(state.read_text())
    ref = reference_state(tmp_path, n)
    assert (got["count"], got["checksum"]) == (ref["count"], ref["checksum"])  # same as an uninterrupted run
    assert len(got["starts"]) == starts and got["stopped_by"] == stopped_by
    assert len({s["job"] for s in got["starts"]}) == 1  # requeued: same job id
    return got["starts"][1]["time"]


def test_preemption_signal_requeues_and_resumes(slurm, log_dir, tmp_path):
    # SIGUSR2 only, as `--signal=USR2@90` delivers it before the time limit: StageJob.checkpoint() path.
    started, state = tmp_path / "started.json", tmp_path / "state.json"
    cmd = [PY, str(STAGES / "ckpt_counter.py"), str(state), "30", "--step-s", "0.2", "--started", str(started)]
    thread, times = in_background(lambda job: subprocess.run(["scancel", "--signal=USR2", job], check=True), started)
    t0 = time.monotonic()
    assert run(cmd, log_dir) == 0
    restart_at = _check_resumed(tmp_path, state, 30, "SIGUSR2")
    report("preempt USR2 -> requeue", wall=time.monotonic() - t0, restart_delay=restart_at - times["action_wall"])


def test_submitit_interrupt_requeues_and_resumes(slurm, log_dir, tmp_path):
    # submitit's own preemption simulation: SIGTERM, then SIGUSR2, to every process of the job.
    started, state = tmp_path / "started.json", tmp_path / "state.json"
    cmd = [PY, str(STAGES / "ckpt_counter.py"), str(state), "30", "--step-s", "0.2", "--started", str(started)]
    interrupt = lambda job: submitit.SlurmJob(folder=log_dir / "%j", job_id=job)._interrupt()
    thread, times = in_background(interrupt, started)
    t0 = time.monotonic()
    assert run(cmd, log_dir) == 0
    restart_at = _check_resumed(tmp_path, state, 30, "SIGTERM")
    report(
        "submitit _interrupt -> requeue", wall=time.monotonic() - t0, restart_delay=restart_at - times["action_wall"]
    )


def test_time_limit_signal_requeues_and_resumes(slurm, log_dir, tmp_path):
    # A real time limit, nothing simulated: -t 2 with --signal=USR2@80 (Resources.additional overrides
    # submitit's USR2@90). slurmctld checks time limits every 30 s and sends the warning signal at the first
    # check with now + 80 s + 30 s >= the end time, i.e. 10-40 s after the start. The first run needs 44 s,
    # so it is always interrupted; the requeued run (same job, new time limit) needs < 3 s.
    state = tmp_path / "state.json"
    cmd = [PY, str(STAGES / "ckpt_counter.py"), str(state), "220", "--step-s", "0.2", "--resume-step-s", "0.01"]
    t0 = time.monotonic()
    assert run(cmd, log_dir, resources=resources(timeout_min=2, additional={"signal": "USR2@80"})) == 0
    _check_resumed(tmp_path, state, 220, "SIGUSR2")
    first = json.loads(state.read_text())["starts"]
    report(
        "time limit USR2 -> requeue",
        wall=time.monotonic() - t0,
        signal_after=first[1]["at"] * 0.2,
        restart_delay=first[1]["time"] - first[0]["time"] - first[1]["at"] * 0.2,
    )


def test_stage_requeue_request(slurm, log_dir, tmp_path):
    state = tmp_path / "state.json"
    cmd = [PY, str(STAGES / "ckpt_counter.py"), str(state), "30", "--step-s", "0.1", "--stop-at", "10"]
    t0 = time.monotonic()
    assert run(cmd, log_dir) == 0
    _check_resumed(tmp_path, state, 30, "stop-at")
    report("stage exit 75 -> requeue", wall=time.monotonic() - t0)


def test_ddp_job_preempted_requeues_every_rank(slurm, log_dir, tmp_path):
    started = tmp_path / "started.json"
    cmd = [
        PY,
        str(STAGES / "ckpt_counter.py"),
        str(tmp_path / "state{rank}.json"),
        "30",
        "--step-s",
        "0.2",
        "--started",
        str(started),
    ]
    thread, times = in_background(lambda job: subprocess.run(["scancel", "--signal=USR2", job], check=True), started)
    t0 = time.monotonic()
    assert run(cmd, log_dir, resources=resources(tasks_per_node=2)) == 0
    for rank in range(2):
        _check_resumed(tmp_path, tmp_path / f"state{rank}.json", 30, "SIGUSR2")
    report("DDP preempt -> requeue", wall=time.monotonic() - t0)
