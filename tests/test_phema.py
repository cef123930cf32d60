"""Post-hoc EMA (alphaflow/phema.py) against a brute-force power-function EMA over every step's weights."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from alphaflow.config import load_params
from alphaflow.train import train
from helpers import run_cli

from alphaflow.phema import (
    PowerEMA,
    gamma_of,
    posthoc_coefficients,
    power_beta,
    profile_inner,
    reconstruct,
    sigma_rel_of,
)


def test_sigma_rel_and_gamma_are_inverse_and_match_edm2():
    for s in (0.01, 0.05, 0.10, 0.20):
        assert sigma_rel_of(gamma_of(s)) == pytest.approx(s, rel=1e-10)
    # fmt: off
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2 quotes γ ≈ 16.97 for σ_rel = 0.05
    assert gamma_of(0.10) == pytest.approx(6.94, abs=0.01)   # and γ ≈ 6.94 for 0.10
    # fmt: on


def test_profile_inner_products_match_numerical_integration():
    tau = np.linspace(0, 1, 2_000_001)[1:]
    density = lambda t, g: np.where(tau <= t, (g + 1) * tau**g / t ** (g + 1), 0.0)
    for ta, ga, tb, gb in [(0.6, 7.0, 1.0, 17.0), (1.0, 3.0, 0.4, 12.0), (0.8, 5.0, 0.8, 5.0)]:
        numeric = np.trapezoid(density(ta, ga) * density(tb, gb), tau)
        assert profile_inner(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-4)


def train_keeping_every_step(steps=400, batch=16, seed=0, every=10):
    """A small MLP regressed with Adam on noisy data; returns its power EMAs' snapshots every `every`
    steps, and the raw weights after every step."""
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    w = torch.randn(8, 4, generator=g, dtype=torch.float64)
    ema = PowerEMA(net, sigma_rels=(0.05, 0.10))
    raw, snapshots = [], []
    for k in range(1, steps + 1):
        x = torch.randn(batch, 8, generator=g, dtype=torch.float64)
        y = x @ w + 0.5 * torch.randn(batch, 4, generator=g, dtype=torch.float64)
        loss = ((net(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(net, t=k * batch, dt=batch)
        raw.append({n: v.detach().clone() for n, v in net.state_dict().items()})
        if k % every == 0:
            for s, avg in zip(ema.sigma_rels, ema.averages):
                snapshots.append((k * batch, s, {n: v.clone() for n, v in avg.items()}))
    return raw, snapshots, batch


def flat(state):
    return torch.cat([v.reshape(-1) for v in state.values()])


def brute_force(raw, batch, sigma_rel, upto):
    """The power-function EMA with σ_rel of raw weights 1..upto (flattened), by its definition."""
    gamma = gamma_of(sigma_rel)
    avg = raw[0]
    for k in range(1, upto + 1):
        beta = power_beta(gamma, k * batch, batch)
        avg = beta * avg + (1 - beta) * raw[k - 1]
    return avg


@pytest.fixture(scope="module")
def trained():
    raw, snapshots, batch = train_keeping_every_step()
    return torch.stack([flat(r) for r in raw]), snapshots, batch


@pytest.mark.parametrize("sigma_rel, upto", [(0.07, 400), (0.03, 400), (0.15, 400), (0.07, 240)])
def test_reconstruction_matches_brute_force(trained, sigma_rel, upto):
    """With 40 snapshots per tracked profile (one every 1/40 of the run) the reconstructed weights lie
    within 1 % of the gap between the σ_rel 0.05 and 0.10 EMAs from the brute-force average (measured:
    0.01–0.1 %; with one snapshot every 1/10 of the run, 2–19 %). Not exact: the least squares fits the
    target's continuous profile with finitely many snapshot profiles, and the snapshots are discrete EMAs."""
    raw, snapshots, batch = trained
    target = brute_force(raw, batch, sigma_rel, upto)
    rebuilt = flat(reconstruct(snapshots, sigma_rel, t=upto * batch))
    gap = brute_force(raw, batch, 0.05, upto) - brute_force(raw, batch, 0.10, upto)
    error = float((rebuilt - target).norm() / gap.norm())
    assert error < 0.01, error
    raw_distance = float((raw[upto - 1] - target).norm() / gap.norm())
    assert raw_distance > 100 * error  # the target is a real average, far from the raw weights


def test_a_tracked_profile_reconstructs_itself():
    raw, snapshots, batch = train_keeping_every_step(steps=80)
    x = posthoc_coefficients([s[0] for s in snapshots], [gamma_of(s[1]) for s in snapshots], 80 * batch, gamma_of(0.10))
    last_010 = max(i for i, s in enumerate(snapshots) if s[1] == 0.10)
    assert x[last_010] == pytest.approx(1.0, abs=1e-6) and np.abs(np.delete(x, last_010)).max() < 1e-6


def test_power_ema_state_round_trips():
    net = torch.nn.Linear(3, 2)
    ema = PowerEMA(net, sigma_rels=(0.05, 0.1))
    ema.update(net, t=8, dt=8)
    other = PowerEMA(torch.nn.Linear(3, 2), sigma_rels=(0.05, 0.1))
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(a[k], b[k]) for a, b in zip(ema.averages, other.averages) for k in a)


def test_snapshots_of_equal_state_are_equal_bytes_and_earlier_snapshots_still_read(tmp_path):
    """A resumed run must reproduce its snapshot files bit for bit; safetensors orders a metadata map at random,
    so the step, images and σ_rels travel as one JSON key. Snapshots of the earlier three-key layout still read."""
    from safetensors.torch import save as st_save

    from alphaflow.phema import list_snapshots, save_snapshot

    net = torch.nn.Linear(3, 2)
    ema = PowerEMA(net, sigma_rels=(0.05, 0.1))
    ema.update(net, t=8, dt=8)
    files = [save_snapshot(tmp_path / f"try{i}", ema, 4, 32).read_bytes() for i in range(6)]
    assert all(f == files[0] for f in files)
    old = {k: v.contiguous() for k, v in ema.state_dict().items()}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "phema-0000004.safetensors").write_bytes(
        st_save(old, metadata={"step": "4", "images": "32", "sigma_rels": "[0.05, 0.1]"})
    )
    entries = lambda folder: [(images, sigma_rel) for images, sigma_rel, _ in list_snapshots(folder)]
    assert entries(tmp_path / "old") == entries(tmp_path / "try0") == [(32, 0.05), (32, 0.1)]


def test_a_training_runs_snapshots_reconstruct_its_brute_force_ema(tiny_project):
    """A real (tiny DiT) training run with snapshots every 2 steps, every step's raw weights kept
    (snapshot_every 1): `alphaflow phema` rebuilds σ_rel 0.07 (tracked: 0.05, 0.10) within 2 % of the gap
    between the two tracked EMAs from the average of the raw weights by definition, at the end and at an
    earlier step. Fewer, coarser snapshots than the MLP test above (20 per profile), hence 2 % not 1 %
    (measured: 0.31 % at step 40, 1.0 % at step 30)."""
    write, results = tiny_project
    steps, batch = 40, 8
    params_path = write(steps=steps, snapshot_every=1, checkpoint_every=1, phema_every=2)
    params = load_params(params_path)
    train(params, "alphaflow-tiny", tracking=False, quiet=True)
    ckpts = results / "runs" / "alphaflow-tiny" / "checkpoints"
    names = list(load_file(str(ckpts / "step-0000001" / "model.safetensors")))
    floats = [k for k in names if k not in ("latent_mean", "latent_std")]
    raw = torch.stack(
        [
            torch.cat(
                [load_file(str(ckpts / f"step-{k:07d}" / "model.safetensors"))[n].double().reshape(-1) for n in floats]
            )
            for k in range(1, steps + 1)
        ]
    )
    for upto in (steps, 30):
        out = run_cli(
            "phema",
            "--params",
            params_path,
            "--run",
            "alphaflow-tiny",
            "--sigma-rel",
            "0.07",
            *(["--step", str(upto)] if upto != steps else []),
        )
        assert "σ_rel 0.07" in out.stdout
        suffix = "" if upto == steps else f"-step{upto:07d}"
        path = results / "runs" / "alphaflow-tiny" / "phema" / f"phema-0.07{suffix}.safetensors"
        rebuilt_state = load_file(str(path))
        rebuilt = torch.cat([rebuilt_state[n].double().reshape(-1) for n in floats])
        target = brute_force(raw, batch, 0.07, upto)
        gap = brute_force(raw, batch, 0.05, upto) - brute_force(raw, batch, 0.10, upto)
        error = float((rebuilt - target).norm() / gap.norm())
        print(f"phema reconstruction error at step {upto}: {error:.4%} of the gap")
        assert error < 0.02, (upto, error)
        assert float((raw[upto - 1] - target).norm() / gap.norm()) > 10 * error
        with safe_open(str(path), framework="pt") as f:
            record = json.loads(f.metadata()["phema"])
        assert record["step"] == upto and len(record["snapshots"]) == 2 * (upto // 2)
    # The tracked profiles themselves: the last snapshot equals the brute-force average.
    with safe_open(str(ckpts / "phema" / f"phema-{steps:07d}.safetensors"), framework="pt") as f:
        tracked = torch.cat([f.get_tensor(f"0.05/{n}").double().reshape(-1) for n in floats])
    assert torch.allclose(tracked, brute_force(raw, batch, 0.05, steps), rtol=1e-5, atol=1e-6)


def test_phema_errors_name_the_key(tiny_project):
    write, _ = tiny_project
    params_path = write(steps=4)
    out = run_cli("phema", "--params", params_path, "--run", "alphaflow-tiny", "--sigma-rel", "0.07", check=False)
    assert out.returncode == 2 and "runs.alphaflow-tiny.phema_every" in out.stderr
    out = run_cli("validate", "--params", write(phema_sigma_rels=[0.05, 0.5]), check=False)
    assert out.returncode == 2 and "phema_sigma_rels" in out.stderr and "0.28" in out.stderr


def test_phema_weight_sets_are_sampled_evaluated_and_reported(tiny_project):
    """eval.weights phema-<σ_rel>: the sample stage reconstructs the post-hoc EMA (once: a second sampling reuses
    the file), sampling and evaluation treat it like ema/raw, the report marks the best σ_rel and plots the sweep.
    Tracking the profiles leaves the raw and EMA weights bit-identical to a run without them."""
    import yaml

    from alphaflow import evaluate as E
    from alphaflow import samples as S
    from alphaflow.phema import posthoc_path
    from alphaflow.report import report
    from alphaflow.reference import reference
    from alphaflow.stages import classifier

    write, results = tiny_project
    path = write(steps=8)
    train(load_params(path), "alphaflow-tiny", tracking=False, quiet=True)
    final = results / "runs" / "alphaflow-tiny" / "checkpoints" / "final"
    plain = {f: load_file(str(final / f"{f}.safetensors")) for f in ("model", "ema")}

    path = write(steps=8, phema_every=2)
    d = yaml.safe_load(path.read_text())
    d["runs"] = {"alphaflow-tiny": {"method": "alphaflow"}}
    d["eval"]["weights"] = ["raw", "ema", "phema-0.05", "phema-0.15"]
    path.write_text(yaml.safe_dump(d))
    params = load_params(path)
    train(params, "alphaflow-tiny", tracking=False, quiet=True)  # other fingerprint (phema keys): trains anew
    for f in ("model", "ema"):
        tracked = load_file(str(final / f"{f}.safetensors"))
        assert all(torch.equal(tracked[k], plain[f][k]) for k in plain[f]), f
    classifier(params, device="cpu")
    reference(params, device="cpu")
    for weights in d["eval"]["weights"]:
        S.sample_run(params, "alphaflow-tiny", weights, "1nfe", device="cpu", quiet=True)
        E.evaluate_run(params, "alphaflow-tiny", weights, "1nfe", device="cpu", quiet=True)
    rebuilt = posthoc_path(params, "alphaflow-tiny", 0.05)
    made = rebuilt.stat().st_mtime_ns
    S.sample_run(params, "alphaflow-tiny", "phema-0.05", "2nfe-cons-0.5", device="cpu", quiet=True)
    assert rebuilt.stat().st_mtime_ns == made  # reused: reconstructed from this very training
    ema, narrow, wide = (
        S.load_samples(params.samples_dir("alphaflow-tiny", w, "1nfe"))[0] for w in ("ema", "phema-0.05", "phema-0.15")
    )
    assert not torch.equal(narrow, wide) and not torch.equal(narrow, ema)

    out = report(params, mlflow=False)
    phema_md = out["phema"].read_text()
    evals = {
        w: json.loads(params.eval_file("alphaflow-tiny", w, "1nfe").read_text()) for w in ("phema-0.05", "phema-0.15")
    }
    values = {w: e["metrics"]["fd_classifier"]["value"] for w, e in evals.items()}
    best = min(values, key=values.get)
    assert f"**{values[best]:.2f}** ★" in phema_md and "| 1nfe | FD_clf |" in phema_md
    assert f"{best} ★" in out["table1"].read_text()
    assert out["phema_alphaflow-tiny"].exists()

    # Training again with other settings makes the old reconstruction stale: the next sampling rebuilds it.
    path = write(steps=8, phema_every=2, lr=5e-4)
    d2 = yaml.safe_load(path.read_text())
    d2["runs"], d2["eval"]["weights"] = d["runs"], d["eval"]["weights"]
    path.write_text(yaml.safe_dump(d2))
    params = load_params(path)
    train(params, "alphaflow-tiny", tracking=False, quiet=True)
    assert not rebuilt.exists()  # the run folder's reconstructions went with the old training
    S.sample_run(params, "alphaflow-tiny", "phema-0.05", "1nfe", device="cpu", quiet=True)
    assert rebuilt.exists()
