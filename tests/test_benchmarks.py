"""The benchmark harness's baseline computes the same loss as the engine, and the harness runs."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alphaflow.objectives import alpha_flow_loss, sample_times

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name):
    if str(ROOT / "benchmarks") not in sys.path:  # the scripts import their siblings, as when run as scripts
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flat_grads(net, loss):
    net.zero_grad()
    loss.backward()
    return torch.cat([p.grad.reshape(-1).clone() for p in net.parameters() if p.grad is not None])


def test_official_formulation_matches_engine_in_float64(tiny_net64):
    official = load_benchmark("official_meanflow").official_meanflow_loss
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 2, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(8, 2, 8, 8, generator=g, dtype=torch.float64)
    t, r = sample_times(8, 0.25, generator=g)
    t, r = t.double(), r.double()
    y = torch.randint(0, 3, (8,), generator=g)
    ours = alpha_flow_loss(tiny_net64, x, y, t, r, noise, 0.0).loss
    g_ours = flat_grads(tiny_net64, ours.mean())
    base = official(tiny_net64, x, y, t, r, noise)
    g_base = flat_grads(tiny_net64, base.mean())
    torch.testing.assert_close(base, ours)
    torch.testing.assert_close(g_base, g_ours)
    assert float(g_ours.abs().max()) > 0


def test_step_cost_prints_every_row_and_writes_json(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "step_cost.py"),
            "--model",
            "N/4",
            "--batch",
            "8",
            "--warmup",
            "1",
            "--iters",
            "1",
            "--repeats",
            "2",
            "--no-cfg",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    rows = ("FM step", "α-Flow step", "MeanFlow step, tangent pass", "torch.func.jvp split", "official formulation")
    for row in rows:
        assert row in out, out
    assert "speed-up over the official formulation" in out and "target ≤ 1.25" in out
    record = json.loads((tmp_path / "cpu-N4-b8-fp32-t1.json").read_text())
    assert (tmp_path / "cpu-N4-b8-fp32-t1.md").read_text().startswith("DiT N/4")
    assert record["threads"] == 1
    rows = {(r["objective"], r["jvp_mode"]): r for r in record["rows"]}
    assert record["model"] == "N/4" and record["batch"] == 8 and record["forward_flops_per_image"] > 0
    assert rows[("fm", None)]["ratio_fm"] == 1.0 and len(rows[("fm", None)]["ms_all"]) == 2
    assert rows[("meanflow", "tangent")]["ms"] > 0


def test_a_failing_row_is_recorded_and_the_table_goes_on():
    bench = load_benchmark("step_cost")
    rows = [
        ("FM step", "fm", None, False),
        ("broken", "official", None, False),
        ("after", "meanflow", "tangent", False),
    ]

    def broken():
        raise RuntimeError("expected input and grad types to match\nmore")

    steps = {"FM step": lambda: None, "broken": broken, "after": lambda: None}
    args = type("Args", (), {"repeats": 2, "warmup": 1, "iters": 1})
    results = bench.measure(rows, steps, torch.device("cpu"), args)
    table = bench.summarise(rows, results, 8, 1e9, None)
    assert results["broken"]["error"] == "RuntimeError: expected input and grad types to match"
    assert len(results["after"]["seconds"]) == 2
    text = bench.markdown("header", table, bench.target_lines(table))
    assert "| broken | failed: RuntimeError: expected input and grad types to match |" in text


def gpu_suite(tmp, *args, env=None, timeout=60):
    """bash benchmarks/gpu_suite.sh with this Python, no wheels to install and its work folder under `tmp`."""
    env = {**os.environ, "PYTHON": sys.executable, "WHEELS": str(ROOT / "no-wheels"), "TMPDIR": str(tmp), **(env or {})}
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_gpu_suite_without_cuda_says_so_in_one_line_and_fails(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = gpu_suite(tmp_path, "--results", str(tmp_path / "results"))
    assert proc.returncode == 1
    assert proc.stdout.startswith("no CUDA device here") and "use --smoke on a CPU" in proc.stdout, proc.stdout
    assert list((tmp_path / "results").iterdir()) == []


def test_gpu_suite_reports_each_failed_section_and_goes_on(tmp_path):
    """Every section fails (a Python that exits 1): one line each, the summary lists them, the exit status is 1."""
    proc = gpu_suite(tmp_path, "--smoke", "--results", str(tmp_path), env={"PYTHON": "false"})
    assert proc.returncode == 1
    lines = [line for line in proc.stdout.splitlines() if "FAILED" in line]
    assert [line.split("]")[0] for line in lines] == ["[step-B2", "[step-XL2", "[eval", "[train", "[protocol"], (
        proc.stdout
    )
    assert "failed sections: step-B2 step-XL2 eval train protocol" in proc.stdout
    summary = (tmp_path / "gpu-suite.md").read_text()
    assert "| eval | FAILED (exit 1)" in summary and "| step-compiled | skipped in --smoke" in summary
    # The time budget spent before a section starts: it is skipped, and that is a failure too.
    proc = gpu_suite(tmp_path, "--smoke", "--results", str(tmp_path), env={"BUDGET_S": "0"})
    assert proc.returncode == 1 and proc.stdout.count("SKIPPED: the 0 s budget is spent") == 5, proc.stdout


@pytest.mark.slow
def test_gpu_suite_smoke_runs_every_section_and_plan_reads_its_tables(tmp_path):
    """The whole GPU suite on CPU with tiny shapes (about 3 minutes on 2 cores), so it cannot rot."""
    from alphaflow.plan import load_measurements, pick_throughputs

    proc = gpu_suite(
        tmp_path, "--smoke", "--results", str(tmp_path), "--archive", str(tmp_path / "suite.tgz"), timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (tmp_path / "gpu-suite.md").read_text()
    for section in ("step-B2", "step-XL2", "eval", "train", "protocol"):
        assert f"| {section} | ok, " in summary, summary
    assert "- ok: the second call resumed" in summary and "- ok: every logged loss is finite" in summary
    steps = load_measurements(tmp_path)
    assert {r["model"] for r in steps} == {"N/4", "T/4"}
    assert all(row.get("peak_gib") for r in steps for row in r["rows"] if "ms" in row)
    found = pick_throughputs(load_measurements(tmp_path, "eval-throughput"), "cpu")
    assert {"sd-vae-decode", "inception", "classifier", "sample-T/4-1nfe", "sample-T/4-2nfe"} <= set(found)
    assert "random init" in found["inception"][0]["weights"]
    assert {"dinov2", "clip"}.isdisjoint(found)  # --tiny architectures are never priced
    assert json.loads((tmp_path / "train-check.json").read_text())["checks"]["the second call resumed"]
    protocol = json.loads((tmp_path / "protocol-cpu.json").read_text())
    assert protocol["noise_parity"] and [r["sampler"] for r in protocol["rows"]] == ["1nfe", "2nfe-cons-0.5"]
    assert "noise streams equal to the official generator's" in summary


def test_protocol_check_finds_the_official_streams_and_a_wrong_one(tmp_path, monkeypatch):
    """benchmarks/protocol_check.py (the GPU suite's protocol section) on the CPU: the alphaflow streams equal its
    restatement of the official generator; this project's default streams do not, and then it exits 1."""
    check = load_benchmark("protocol_check")
    assert check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "protocol-cpu.json").read_text())
    assert result["noise_parity"] and all(r["images_per_s"] > 0 for r in result["rows"])
    real = check.protocol_noise
    monkeypatch.setattr(check, "protocol_noise", lambda *a, **k: real(*a, **{**k, "protocol": "default"}))
    assert check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 1
    assert "DIFFER" in (tmp_path / "protocol-cpu.md").read_text()
