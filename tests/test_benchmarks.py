"""The benchmark harness's baseline computes the same loss as the engine, and the harness runs."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

from alphaflow.objectives import alpha_flow_loss, sample_times

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name):
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


def test_step_cost_prints_every_row_and_the_official_ratio():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_cost.py"), "--model", "T/4", "--batch", "8",
         "--warmup", "1", "--iters", "1", "--no-cfg"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout
    for row in ("FM step", "α-Flow step", "MeanFlow JVP step, split", "official formulation"):
        assert row in out, out
    assert "speed-up over the official formulation" in out
