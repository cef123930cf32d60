"""alphaflow.runlock: one writer per run (acquire, refuse, heartbeat, stale takeover, races) and `alphaflow train`
refusing a second writer of a running run."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from alphaflow import runlock
from alphaflow.runlock import RunLocked
from helpers import ROOT, run_cli, tiny_params_dict

HOLD = """
import sys, time
from alphaflow import runlock
lock = runlock.acquire(sys.argv[1], "test holder", heartbeat_s=0.05)
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture(autouse=True)
def outside_slurm(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", runlock.HEARTBEAT_ENV):
        monkeypatch.delenv(key, raising=False)


def foreign(path, age_s, **keys):
    """Writes a lock of a process on another host whose last heartbeat is `age_s` old."""
    record = {
        **runlock.holder_record("train elsewhere"),
        "host": "other-node",
        "pid": 4242,
        "pid_start": None,
        "heartbeat": time.time() - age_s,
        **keys,
    }
    path.write_text(json.dumps(record))
    return record


def start_holder(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_acquire_and_release(tmp_path):
    path = tmp_path / "run" / ".lock"
    with runlock.hold(path, "train x") as lock:
        record = json.loads(path.read_text())
        assert record["pid"] == os.getpid() and record["what"] == "train x" and lock.ours()
    assert not path.exists() and os.listdir(path.parent) == []  # no temporary files left either
    with pytest.raises(ZeroDivisionError):
        with runlock.hold(path, "train x"):
            raise ZeroDivisionError
    assert not path.exists()  # released on an exception too


def test_second_acquire_in_this_process_is_refused(tmp_path):
    path = tmp_path / ".lock"
    with runlock.hold(path, "train x"):
        with pytest.raises(RunLocked, match=f"held by pid {os.getpid()} on .*train x.*delete {path}"):
            runlock.acquire(path, "train x")
    runlock.acquire(path, "train x").release()


def test_second_acquire_in_a_child_process_names_the_holder(tmp_path):
    path = tmp_path / ".lock"
    code = textwrap.dedent(f"""
        import sys
        from alphaflow import runlock
        try:
            runlock.acquire({str(path)!r}, "second")
        except runlock.RunLocked as err:
            print(err)
            sys.exit(2)
    """)
    with runlock.hold(path, "train x"):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"pid {os.getpid()}" in proc.stdout and "last heartbeat 0 s ago" in proc.stdout
    assert proc.stdout.count("\n") == 1  # one line


def test_lock_of_a_killed_holder_is_taken_over(tmp_path, capsys):
    path = tmp_path / ".lock"
    proc = start_holder(path)
    with pytest.raises(RunLocked):
        runlock.acquire(path, "second")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert path.exists()  # kill -9 leaves it behind
    with runlock.hold(path, "second") as lock:
        assert lock.ours()
    err = capsys.readouterr().err
    assert f"took over the stale lock {path} of pid {proc.pid}" in err and "is gone" in err


def test_lock_of_a_killed_holder_not_yet_reaped_is_taken_over(tmp_path):
    """kill -9 of a whole process tree leaves the holder a zombie until init reaps it, which in a container can
    take seconds; os.kill(pid, 0) still succeeds on it, yet it holds nothing."""
    path = tmp_path / ".lock"
    proc = start_holder(path)
    proc.send_signal(signal.SIGKILL)
    deadline = time.time() + 10
    while runlock.proc_stat(proc.pid)[0] != "Z":  # not waited for: a zombie
        assert time.time() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, 0)  # the pid still answers
    assert not runlock.process_alive(proc.pid)
    with runlock.hold(path, "second") as lock:
        assert lock.ours()
    proc.wait()


def test_foreign_holder_taken_over_only_when_its_heartbeat_is_stale(tmp_path, capsys):
    path = tmp_path / ".lock"
    foreign(path, age_s=5)
    with pytest.raises(RunLocked, match="pid 4242 on other-node.*heartbeat is 10 s old"):
        runlock.acquire(path, "second", heartbeat_s=1)  # stale_s = 10 × 1 s
    foreign(path, age_s=20)
    runlock.acquire(path, "second", heartbeat_s=1).release()
    assert "of pid 4242 on other-node" in capsys.readouterr().err
    foreign(path, age_s=5)
    runlock.acquire(path, "second", heartbeat_s=1, stale_s=2).release()  # an explicit stale_s


def test_same_slurm_job_takes_over_at_once(tmp_path, monkeypatch, capsys):
    path = tmp_path / ".lock"
    foreign(path, age_s=0, slurm_job="777")
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    with pytest.raises(RunLocked, match=r"\(SLURM job 777\).*squeue -j 777"):
        runlock.acquire(path, "requeued")
    monkeypatch.setenv("SLURM_JOB_ID", "777")  # the requeued job: same id, new pid, another node
    with runlock.hold(path, "requeued"):
        assert json.loads(path.read_text())["slurm_job"] == "777"
    assert "SLURM job 777 before its requeue" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "900")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert runlock.slurm_job() == "900_3"


RACE = """
import os, sys, time
from pathlib import Path
from alphaflow import runlock
lock, folder = Path(sys.argv[1]), Path(sys.argv[2])
(folder / f"ready-{os.getpid()}").touch()
while not (folder / "go").exists():
    time.sleep(0.001)
try:
    held = runlock.acquire(lock, "taker", heartbeat_s=0.05)
except runlock.RunLocked:
    print("refused", flush=True)
    sys.exit(0)
print("won", flush=True)
while not (folder / "done").exists():
    time.sleep(0.01)
held.release()
"""


@pytest.mark.parametrize("round_", range(4))
def test_racing_takers_exactly_one_wins(tmp_path, round_):
    path, n = tmp_path / ".lock", 4
    foreign(path, age_s=3600)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(path), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    deadline = time.time() + 30
    while len(list(tmp_path.glob("ready-*"))) < n and time.time() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outcomes = [p.stdout.readline().strip() for p in procs]
    (tmp_path / "done").touch()
    errs = [p.communicate(timeout=30)[1] for p in procs]
    assert sorted(outcomes) == ["refused"] * (n - 1) + ["won"], errs
    assert sum("took over the stale lock" in e for e in errs) == 1, errs
    assert not path.exists() and not list(tmp_path.glob(".lock*"))  # nothing left behind


def test_heartbeat_advances_and_env_sets_its_period(tmp_path, monkeypatch):
    path = tmp_path / ".lock"
    monkeypatch.setenv(runlock.HEARTBEAT_ENV, "0.05")
    with runlock.hold(path, "train x") as lock:
        assert lock.heartbeat_s == 0.05
        first = json.loads(path.read_text())
        time.sleep(0.5)
        later = json.loads(path.read_text())
    assert later["heartbeat"] > first["heartbeat"] and later["started"] == first["started"]
    assert later["token"] == first["token"]


def test_lock_deleted_by_hand_is_linked_again_by_its_live_holder(tmp_path):
    path = tmp_path / ".lock"
    with runlock.hold(path, "train x", heartbeat_s=0.05) as lock:
        path.unlink()
        time.sleep(0.3)
        assert lock.ours()


def test_break_lock_of_a_taker_that_died_is_removed(tmp_path):
    path = tmp_path / ".lock"
    foreign(path, age_s=3600)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / ".lock.break").write_text(json.dumps({**runlock.holder_record("taker"), "pid": gone.pid}))
    with runlock.hold(path, "second") as lock:
        assert lock.ours() and not (tmp_path / ".lock.break").exists()


def test_lost_lock_is_neither_beaten_nor_removed(tmp_path, capsys):
    path = tmp_path / ".lock"
    lock = runlock.acquire(path, "train x", heartbeat_s=0.05)
    other = foreign(path, age_s=0)  # a taker's lock (this one was judged stale)
    time.sleep(0.3)
    lock.release()
    assert json.loads(path.read_text()) == other and lock.lost
    assert "lost the lock" in capsys.readouterr().err


def test_wait_polls_until_released_or_timeout(tmp_path):
    path = tmp_path / ".lock"
    proc = start_holder(path)
    with pytest.raises(RunLocked, match=r"waited 0\.[2-9] s"):
        runlock.acquire(path, "waiter", wait=True, timeout=0.2, poll_s=0.05)
    proc.kill()  # gone: the waiter takes it over
    proc.wait()
    runlock.acquire(path, "waiter", wait=True, timeout=5, poll_s=0.05).release()


def test_cost_benchmark_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "runlock_cost.py"), "--repeats", "3"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert all(f"  {key}" in out for key in ("acquire", "heartbeat", "release")) and "per training step: 0" in out


# ----------------------------------------------------------------------------
# In the stages


def test_sample_part_holds_its_own_lock(tmp_path, monkeypatch):
    from alphaflow import samples as S
    from alphaflow.config import Params

    params = Params(raw=tiny_params_dict(tmp_path / "results", tmp_path / "images"))
    out = params.samples_dir("alphaflow-tiny", "ema", "1nfe")
    seen = []
    monkeypatch.setattr(S, "_sample_part", lambda *a, **kw: seen.append(sorted(p.name for p in out.glob(".lock*"))))
    with runlock.hold(out / ".lock-part-0-of-2", "sample part 0"):  # another part samples meanwhile
        S.sample_run(params, "alphaflow-tiny", "ema", "1nfe", part=1, num_parts=2)
        with pytest.raises(RunLocked, match="lock-part-0-of-2 is held by"):
            S.sample_run(params, "alphaflow-tiny", "ema", "1nfe", part=0, num_parts=2)
    assert seen == [[".lock-part-0-of-2", ".lock-part-1-of-2"]] and not list(out.glob(".lock*"))


# ----------------------------------------------------------------------------
# Through the CLI


def test_second_train_of_a_running_run_exits_2_naming_the_first(tiny_project):
    write, results = tiny_project
    params_path = write(steps=40)
    run_dir = results / "runs" / "meanflow-tiny"
    cmd = [
        sys.executable,
        "-m",
        "alphaflow",
        "train",
        "--params",
        params_path,
        "--run",
        "meanflow-tiny",
        "--quiet",
        "--no-tracking",
    ]
    first = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / ".lock").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # held: it stays mid-run, whatever the machine's speed, until SIGCONT
        second = run_cli(
            "train", "--params", params_path, "--run", "meanflow-tiny", "--quiet", "--no-tracking", check=False
        )
    finally:
        first.send_signal(signal.SIGCONT)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    assert second.returncode == 2, second.stderr
    line = second.stderr.strip()
    assert "\n" not in line and line.startswith(f"alphaflow: {run_dir / '.lock'} is held by pid {first.pid} on ")
    assert "train meanflow-tiny" in line and "delete" in line
    steps = [json.loads(r)["step"] for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(2, 41, 2))  # one writer: every logged step once
    assert not (run_dir / ".lock").exists()


def test_retraining_with_other_params_leaves_samples_a_live_part_writes(tiny_project):
    """A restart with other params clears the run folder, but not while a sample part of the old weights still
    holds its lock: it stops with one line naming the part, and nothing is cleared."""
    from alphaflow.config import load_params
    from alphaflow.train import train

    write, results = tiny_project
    train(load_params(write()), "meanflow-tiny", device="cpu", quiet=True, tracking=False)
    cell = results / "runs" / "meanflow-tiny" / "samples" / "ema" / "1nfe"
    cell.mkdir(parents=True)
    (cell / "chunk-0.safetensors").write_bytes(b"a chunk of the old weights")
    changed = load_params(write(lr=2e-3))
    with runlock.hold(cell / ".lock-part-0-of-1", "sample meanflow-tiny/ema/1nfe part 0"):
        with pytest.raises(RunLocked, match=r"lock-part-0-of-1 is held by pid \d+ on .*still samples the old"):
            train(changed, "meanflow-tiny", device="cpu", quiet=True, tracking=False)
    assert (cell / "chunk-0.safetensors").exists()
    assert (results / "runs" / "meanflow-tiny" / "checkpoints" / "final" / "state.json").exists()
    train(changed, "meanflow-tiny", device="cpu", quiet=True, tracking=False)  # the part ended: it retrains
    assert not cell.exists()
