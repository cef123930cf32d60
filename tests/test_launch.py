"""alphaflow.launch (its tasks run alphaflow.job) on the local (subprocesses) and debug (in-process) executors.

The same code paths on a real SLURM cluster are in test_slurm.py (-m slow).
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from alphaflow.errors import REQUEUE_EXIT_CODE
from alphaflow.launch import Resources, launch

STAGES = Path(__file__).parent / "slurm"  # small stage scripts shared with test_slurm.py
PY = sys.executable
FAST = dict(poll_s=0.2, vanish_timeout_s=10.0)


def run(command, executor, tmp_path, array=None, **resources):
    res = Resources(**{"cpus_per_task": 1, "mem_gb": 1, "timeout_min": 5, **resources})
    return launch(
        command, executor=executor, resources=res, log_dir=tmp_path / "logs", job_name="test", array=array, **FAST
    )


def printed_paths(out, stream="stdout"):
    return [Path(p) for p in re.findall(rf"\[launch\]\s+{stream}: (\S+)", out)]


def uninterrupted(tmp_path, n):
    """Final state of ckpt_counter.py run straight through, for comparison."""
    state = tmp_path / "reference.json"
    subprocess.run(
        [PY, str(STAGES / "ckpt_counter.py"), str(state), str(n), "--step-s", "0"], check=True, capture_output=True
    )
    return json.loads(state.read_text())


# ----------------------------------------------------------------------------


@pytest.mark.parametrize("executor", ["local", "debug"])
def test_success_prints_job_and_log_paths(executor, tmp_path, capfd):
    code = run([PY, "-c", "print('hello from the stage')"], executor, tmp_path)
    assert code == 0
    out = capfd.readouterr().out
    assert re.search(r"submitted job \S+", out)
    stdout, stderr = printed_paths(out), printed_paths(out, "stderr")
    assert len(stdout) == len(stderr) == 1 and stdout[0].parent.parent == tmp_path / "logs"
    if executor == "local":  # debug runs in this process: the stage prints to the console
        assert "hello from the stage" in stdout[0].read_text()
    assert not (tmp_path / "logs" / "%j").exists()


@pytest.mark.parametrize("executor", ["local", "debug"])
def test_failing_command_propagates_exit_code(executor, tmp_path):
    assert run([PY, "-c", "import sys; sys.exit(3)"], executor, tmp_path) == 3
    # killed by a signal -> 128 + N, as a shell reports it
    assert run([PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], executor, tmp_path) == 137


@pytest.mark.parametrize("executor", ["local", "debug"])
def test_array_runs_every_element(executor, tmp_path):
    write = [PY, "-c", "import sys, pathlib; pathlib.Path(sys.argv[1]).write_text(sys.argv[2])"]
    array = [[str(tmp_path / f"part{i}.txt"), f"element {i}"] for i in range(5)]
    assert run(write, executor, tmp_path, array=array, array_parallelism=2) == 0
    assert [(tmp_path / f"part{i}.txt").read_text() for i in range(5)] == [f"element {i}" for i in range(5)]


def test_array_failing_element_fails_the_launch(tmp_path):
    exit_with = [PY, "-c", "import sys, pathlib; pathlib.Path(sys.argv[1]).touch(); sys.exit(int(sys.argv[2]))"]
    array = [[str(tmp_path / f"ran{i}"), code] for i, code in enumerate(["0", "4", "0"])]
    assert run(exit_with, "local", tmp_path, array=array) == 4
    assert all((tmp_path / f"ran{i}").exists() for i in range(3))  # the other elements still ran


def test_two_task_local_job_is_a_ddp_group(tmp_path):
    out = tmp_path / "ddp"
    assert run([PY, str(STAGES / "ddp_check.py"), str(out)], "local", tmp_path, tasks_per_node=2) == 0
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["RANK"] for r in ranks] == ["0", "1"] and [r["LOCAL_RANK"] for r in ranks] == ["0", "1"]
    assert {r["WORLD_SIZE"] for r in ranks} == {"2"}
    assert len({(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in ranks}) == 1
    assert [r["allreduce"] for r in ranks] == [3.0, 3.0]  # 1 + 2 summed over the gloo group


def test_tasks_per_node_defaults_to_one_per_gpu():
    assert Resources().ntasks_per_node == 1
    assert Resources(gpus_per_node=4).ntasks_per_node == 4
    assert Resources(gpus_per_node=4, tasks_per_node=1).ntasks_per_node == 1


@pytest.mark.parametrize("executor", ["local", "debug"])
def test_stage_requeue_request_resumes_to_the_same_state(executor, tmp_path):
    state = tmp_path / "state.json"
    cmd = [PY, str(STAGES / "ckpt_counter.py"), str(state), "12", "--step-s", "0.02", "--stop-at", "5"]
    assert run(cmd, executor, tmp_path) == 0
    got = json.loads(state.read_text())
    assert [s["at"] for s in got["starts"]] == [0, 5] and got["stopped_by"] == "stop-at"
    ref = uninterrupted(tmp_path, 12)
    assert (got["count"], got["checksum"]) == (ref["count"], ref["checksum"])


@pytest.mark.parametrize("executor", ["local", "debug"])
def test_requeues_are_bounded(executor, tmp_path):
    always = [PY, "-c", f"import sys; print('again'); sys.exit({REQUEUE_EXIT_CODE})"]
    assert run(always, executor, tmp_path, max_requeues=2) == REQUEUE_EXIT_CODE


def test_task_dying_without_result_fails(tmp_path):
    # The stage kills its task process: no result file is ever written.
    kill_parent = [PY, "-c", "import os, signal; os.kill(os.getppid(), signal.SIGKILL)"]
    t0 = time.monotonic()
    assert run(kill_parent, "local", tmp_path) == 1
    assert time.monotonic() - t0 < 20


def test_unknown_executor_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="executor"):
        run([PY, "-c", "pass"], "kubernetes", tmp_path)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_launcher_cancels_the_job(signum, tmp_path):
    started = tmp_path / "started.json"
    script = textwrap.dedent(f"""
        import sys
        from alphaflow.launch import Resources, launch
        cmd = [sys.executable, {str(STAGES / "ckpt_counter.py")!r}, {str(tmp_path / "state.json")!r}, "100000",
               "--step-s", "0.1", "--started", {str(started)!r}]
        sys.exit(launch(cmd, executor="local", resources=Resources(cpus_per_task=1, mem_gb=1),
                        log_dir={str(tmp_path / "logs")!r}, job_name="interrupt", poll_s=0.2))
    """)
    launcher = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        stage_pid = json.loads(started.read_text())["pid"]
        launcher.send_signal(signum)
        assert launcher.wait(timeout=30) == 128 + signum
    finally:
        launcher.kill()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # the stage goes down with the cancelled job
        try:
            os.kill(stage_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(stage_pid, signal.SIGKILL)
        pytest.fail("the stage survived the launcher's cancellation")
    assert "cancelling" in launcher.stdout.read()
