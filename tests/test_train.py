"""Training engine: a real run, exact resume after SIGKILL, preemption signals, fine-tuning, DDP.

Changed params, extension and --stop-after: tests/test_provenance.py."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from alphaflow.config import ParamsError, load_params
from alphaflow.ema import ema_beta
from alphaflow.errors import REQUEUE_EXIT_CODE
from alphaflow.plots import plot_training_curves
from alphaflow.train import train
from alphaflow.train_step import learning_rate
from helpers import ROOT, run_cli
from helpers import assert_bit_identical, final_tensors


def phema_snapshots(results, run):
    """The final checkpoint's tracked post-hoc EMA profiles and every snapshot file, by name."""
    d = results / "runs" / run / "checkpoints"
    out = {"phema": load_file(str(d / "final" / "phema.safetensors"))}
    out.update({f.name.split(".")[0]: load_file(str(f)) for f in (d / "phema").glob("phema-*.safetensors")})
    return out


def test_schedules():
    run = load_params("params/default.yaml").run("alphaflow-T-4")
    assert learning_rate(run, 0) == pytest.approx(run.lr * 1e-4)
    assert learning_rate(run, run.warmup_steps) == run.lr
    assert ema_beta(0, 6931) == 0.0  # EMA = net at step 0
    assert ema_beta(200_000, 6931) == pytest.approx(0.5 ** (1 / 6931))
    assert ema_beta(1000, 6931) == pytest.approx(0.5 ** (1 / 50))  # ramp: h = 0.05·step


def test_demo_run_trains_and_logs(tiny_project):
    write, results = tiny_project
    params = load_params(write(conflict_every=4, conflict_batch=8))
    summary = train(params, "alphaflow-tiny", tracking=False, quiet=True, plot_curves=plot_training_curves)
    run_dir = results / "runs" / "alphaflow-tiny"
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
    assert records[0]["alpha"] == 1.0 and records[-1]["alpha"] == 0.0  # the curriculum ran through
    assert all(k in records[1] for k in ("L_TFM", "L_TC", "L_sum", "grad_norm", "images_per_s", "cos(TFM,TC)"))
    t = final_tensors(results, "alphaflow-tiny")
    assert any(not torch.equal(t["model"][k], t["ema"][k]) for k in t["model"])  # raw and EMA both kept
    assert t["model"]["latent_std"].shape == (1, 3, 8, 8)  # per-element statistics saved
    assert (run_dir / "samples" / "grid-final.png").exists() and (run_dir / "plots" / "training.png").exists()
    assert summary["bad_steps"] == 0
    # A finished run is not retrained.
    assert train(params, "alphaflow-tiny", tracking=False, quiet=True)["step"] == 12


def test_in_training_evaluation_needs_an_evaluator_passed_in(tiny_project):
    """train() imports no evaluation code: with eval_every and no evaluator it names the key before any work."""
    write, results = tiny_project
    params = load_params(write(eval_every=2))
    with pytest.raises(ParamsError, match=r"runs.alphaflow-tiny.eval_every is 2.*evaluate="):
        train(params, "alphaflow-tiny", tracking=False, quiet=True)
    assert not (results / "runs" / "alphaflow-tiny" / "metrics.jsonl").exists()


def test_exact_resume_after_sigkill(tiny_project, tmp_path):
    write, results = tiny_project
    params_path = write(steps=16, phema_every=3)  # post-hoc EMA snapshots must resume exactly too
    params = load_params(params_path)
    train(params, "meanflow-tiny", tracking=False, quiet=True)  # uninterrupted reference
    reference = {**final_tensors(results, "meanflow-tiny"), **phema_snapshots(results, "meanflow-tiny")}
    # Same params, other results folder, killed with SIGKILL at a random step, restarted.
    other = tmp_path / "other"
    import shutil

    shutil.copytree(results, other, ignore=shutil.ignore_patterns("runs"))
    params_path.write_text(params_path.read_text().replace(str(results), str(other)))
    kill_at = random.Random().randint(3, 13)
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
    proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = other / "runs" / "meanflow-tiny" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") * 2 >= kill_at:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (other / "runs" / "meanflow-tiny" / "checkpoints" / "final").exists(), "killed too late"
    run_cli("train", "--params", params_path, "--run", "meanflow-tiny", "--quiet", "--no-tracking")
    resumed = {**final_tensors(other, "meanflow-tiny"), **phema_snapshots(other, "meanflow-tiny")}
    assert (
        sorted(resumed)
        == sorted(reference)
        == [
            "ema",
            "model",
            "optimizer",
            "phema",
            "phema-0000003",
            "phema-0000006",
            "phema-0000009",
            "phema-0000012",
            "phema-0000015",
            "phema-0000016",
        ]
    )
    assert_bit_identical(reference, resumed)
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 16  # no duplicated log lines after the resume


def test_sigusr2_checkpoints_and_exits_for_requeue(tiny_project):
    write, results = tiny_project
    params_path = write(steps=400, checkpoint_every=1000)
    cmd = [
        sys.executable,
        "-m",
        "alphaflow",
        "train",
        "--params",
        params_path,
        "--run",
        "alphaflow-tiny",
        "--quiet",
        "--no-tracking",
    ]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = results / "runs" / "alphaflow-tiny" / "metrics.jsonl"
    deadline = time.time() + 120
    while not metrics.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, out
    latest = json.loads((results / "runs" / "alphaflow-tiny" / "checkpoints" / "latest.json").read_text())
    assert 0 < latest["step"] < 400 and "SIGUSR2" in out


def test_finetune_starts_from_another_runs_weights(tiny_project):
    write, results = tiny_project
    runs = {
        "base": {"method": "alphaflow"},
        "base-plus": {
            "method": "meanflow",
            "init_from": "base",
            "batch_size": 16,
            "steps": 2,
            "lr": 0.0,
            "warmup_steps": 0,
        },
    }
    params = load_params(write(runs=runs, steps=4))
    train(params, "base", tracking=False, quiet=True)
    train(params, "base-plus", tracking=False, quiet=True)
    base, plus = final_tensors(results, "base"), final_tensors(results, "base-plus")
    # lr 0: the raw weights are the base run's exactly.
    for k in base["model"]:
        assert torch.equal(base["model"][k], plus["model"][k]), k


def test_gradient_accumulation_matches_one_big_batch(tiny_project):
    """micro_batch_size 4 × 2 accumulation = batch 8 (same data order, same times) up to float error."""
    write, results = tiny_project
    runs = {"a": {"method": "fm", "fm_ratio": 1.0}, "b": {"method": "fm", "fm_ratio": 1.0, "micro_batch_size": 8}}
    params = load_params(write(runs=runs, steps=2, batch_size=8, grad_clip=None))
    train(params, "b", tracking=False, quiet=True)
    assert (results / "runs" / "b" / "checkpoints" / "final").exists()
    with pytest.raises(ValueError, match="not divisible by micro_batch_size 3"):
        train(load_params(write(runs={"c": {"micro_batch_size": 3}})), "c", tracking=False, quiet=True)


def test_two_process_ddp_training_keeps_ranks_in_sync(tiny_project):
    write, results = tiny_project
    params_path = write(steps=4, batch_size=8)
    # The environment submitit's TorchDistributedEnvironment (and torchrun) export for each task.
    port = str(29500 + random.Random().randint(0, 500))
    cmd = [
        sys.executable,
        "-m",
        "alphaflow",
        "train",
        "--params",
        str(params_path),
        "--run",
        "meanflow-tiny",
        "--quiet",
        "--no-tracking",
    ]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    records = [json.loads(l) for l in (results / "runs" / "meanflow-tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["rank_param_spread"] == 0.0 for r in records)  # ranks agree after every logged step
    state = json.loads((results / "runs" / "meanflow-tiny" / "checkpoints" / "final" / "state.json").read_text())
    assert state["world_size"] == 2
    # One process with the same global batch, accumulating the two micro-batches the two ranks trained on,
    # ends with the same weights: the data and the draws depend on the global batch only.
    ddp = final_tensors(results, "meanflow-tiny")
    train(
        load_params(
            write(runs={"meanflow-tiny": {"method": "meanflow", "micro_batch_size": 4}}, steps=4, batch_size=8)
        ),
        "meanflow-tiny",
        tracking=False,
        quiet=True,
    )
    single = final_tensors(results, "meanflow-tiny")
    assert_bit_identical({k: ddp[k] for k in ("model", "ema")}, {k: single[k] for k in ("model", "ema")})
