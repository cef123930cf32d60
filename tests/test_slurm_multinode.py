"""Training across two real SLURM nodes: `bash tests/slurm/setup.sh` adds the partition `twonode`,
two more slurmd daemons on this machine, each in its own network and UTS namespace (hosts afn1, afn2 on a
bridge), so a 2-node job's ranks meet over TCP like on a cluster (gloo, CPU).

- a 2-node × 1-task training run ends with exactly the weights of a 1-node × 2-task run, and of a single
  process with the same global batch (accumulating the two ranks' micro-batches): the data loader deals one
  global stream of micro-batches to the ranks and every rank draws the whole global batch's noise and times
  (alphaflow/data/latents.py, train.micro_batch_draws);
- the 2-node job, preempted (SIGUSR2) after its first checkpoints, is requeued on both nodes and finishes
  with exactly those weights again.
"""

import json
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from helpers import ROOT
from helpers import ENV, job_ids, write_profile

pytestmark = pytest.mark.slow
RUN, STEPS = "alphaflow-tiny", 40
LAYOUTS = {
    "2 nodes × 1 task": {"nodes": 2, "tasks_per_node": 1, "partition": "twonode"},
    "1 node × 2 tasks": {"nodes": 1, "tasks_per_node": 2, "partition": "debug"},
}


@pytest.fixture(scope="module")
def two_nodes(slurm):
    out = subprocess.run(["sinfo", "-h", "-p", "twonode", "-o", "%D %T"], capture_output=True, text=True).stdout
    ready = out.split() and int(out.split()[0]) >= 2 and out.split()[1].rstrip("*~#") in ("idle", "mixed")
    if not ready:
        import os

        why = f"no idle 2-node partition 'twonode' (sinfo: {out.strip() or 'none'}; bash tests/slurm/setup.sh)"
        if os.environ.get("ALPHAFLOW_REQUIRE_SLURM") == "1":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)


def profile(tmp_path, tiny_latents, name, layout):
    path, results = write_profile(tmp_path / name, tiny_latents, steps=STEPS, checkpoint_every=10)
    d = yaml.safe_load(path.read_text())
    d["runs"] = {RUN: {"method": "alphaflow"}}  # FM, α-Flow and MeanFlow (JVP) steps across the ranks
    d["resources"]["train"] = {**d["resources"]["default"], **layout}
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path, results


def launch(path):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "alphaflow",
            "launch",
            "--params",
            path,
            "--stage",
            "train",
            "--run",
            RUN,
            "--executor",
            "slurm",
            "--",
            "--quiet",
            "--no-tracking",
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def final_weights(results):
    final = results / "runs" / RUN / "checkpoints" / "final"
    state = json.loads((final / "state.json").read_text())
    return state, {f: load_file(final / f"{f}.safetensors") for f in ("model", "ema")}


def assert_same(a, b):
    for f in ("model", "ema"):
        assert a[f].keys() == b[f].keys() and all((a[f][k] == b[f][k]).all() for k in a[f]), f


def test_two_nodes_train_like_one_node_and_one_process_and_resume_exactly(two_nodes, tiny_latents, tmp_path):
    t0 = time.monotonic()
    weights = {}
    for name, layout in LAYOUTS.items():
        path, results = profile(tmp_path, tiny_latents, name.replace(" ", ""), layout)
        proc = launch(path)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
        state, weights[name] = final_weights(results)
        assert state["step"] == STEPS and state["world_size"] == 2, state
    assert_same(weights["2 nodes × 1 task"], weights["1 node × 2 tasks"])
    # One process, the same global batch in two accumulated micro-batches of the ranks' size.
    path, results = profile(tmp_path, tiny_latents, "single", LAYOUTS["1 node × 2 tasks"])
    d = yaml.safe_load(path.read_text())
    d["runs"][RUN]["micro_batch_size"] = d["defaults"]["batch_size"] // 2
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    subprocess.run(
        [sys.executable, "-m", "alphaflow", "train", "--params", path, "--run", RUN, "--quiet", "--no-tracking"],
        cwd=ROOT,
        env=ENV,
        check=True,
        capture_output=True,
    )
    state, single = final_weights(results)
    assert state["world_size"] == 1
    assert_same(single, weights["2 nodes × 1 task"])
    t1 = time.monotonic()

    # The 2-node job again, preempted once it has a checkpoint: requeued on both nodes, same final weights.
    path, results = profile(tmp_path, tiny_latents, "preempted", LAYOUTS["2 nodes × 1 task"])
    proc = launch(path)
    latest = results / "runs" / RUN / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 300
    while not (latest.exists() and json.loads(latest.read_text())["step"] >= 10):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.1)
    ids = job_ids(f"af-train-{RUN}")
    assert len(ids) == 1
    nodes = subprocess.run(["squeue", "-h", "-j", ids[0], "-o", "%N"], capture_output=True, text=True).stdout.strip()
    assert nodes == "afn[1-2]", nodes
    subprocess.run(["scancel", "--signal=USR2", ids[0]], check=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    log = "\n".join(p.read_text() for p in (results / "logs").rglob("*.out"))
    assert "exiting 75 for requeue" in log, log[-3000:]
    state, resumed = final_weights(results)
    assert state["step"] == STEPS
    assert_same(resumed, weights["2 nodes × 1 task"])
    print(
        f"\n[timing] two layouts + one process {t1 - t0:.1f}s; 2-node preempted + requeued {time.monotonic() - t1:.1f}s"
    )
