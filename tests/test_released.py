"""Runs whose weights come from released files (runs.<run>.checkpoint, init_from: FILE; alphaflow.released).

The released snapshots are built here in the official layout (tests/helpers.py) with the tiny dataset's shapes:
a T/2 DiT (a real preset) on 8×8 RGB identity latents with 3 classes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from alphaflow.config import Params, ParamsError, load_params
from alphaflow.errors import MissingInputError, UserError
from alphaflow.samples import load_run_net
from alphaflow.official import build_official_model
from alphaflow.train import train
from helpers import ROOT, tiny_params_dict, write_class_folder
from helpers import write_snapshot

RUN = "alphaflow-T-2"
BIN = Path(sys.executable).parent


def tiny_snapshot(path, seed=0, rows=3):
    return write_snapshot(path, depth=4, hidden=128, rows=rows, channels=3, size=8, seed=seed)


def released_profile(results, images, **eval_keys):
    d = tiny_params_dict(results, images)
    d["profile"] = "released-test"
    d["runs"] = {
        RUN: {
            "method": "alphaflow",
            "model": "T/2",
            "model_overrides": {},
            "checkpoint": "alphaflow-T-2.pt",
            "steps": 400000,
        }
    }
    d["eval"].update({"weights": ["ema"], "protocol": "alphaflow", "labels": "random", **eval_keys})
    d["eval"]["samplers"].append({"name": "1nfe-balanced", "mode": "ode", "t_steps": [1.0, 0.0], "labels": "balanced"})
    d["paper_results"] = {
        RUN: {
            "table": "1",
            "row": "α-Flow-T/2 (a test file)",
            "fd_classifier_1nfe": 12.5,
            "balanced": {"fd_classifier_1nfe": 11.0},
        }
    }
    return d


@pytest.fixture
def released(tiny_latents, tmp_path, monkeypatch):
    """(params, released folder): the tiny data prepared, a snapshot in $ALPHAFLOW_RELEASED."""
    import shutil

    folder = tmp_path / "released"
    folder.mkdir()
    tiny_snapshot(folder / "alphaflow-T-2.pt")
    monkeypatch.setenv("ALPHAFLOW_RELEASED", str(folder))
    shutil.copytree(tiny_latents / "results", tmp_path / "results")
    return Params(raw=released_profile(tmp_path / "results", tiny_latents / "images")), folder


def test_train_imports_the_released_file_instead_of_training(released, capsys):
    params, folder = released
    state = train(params, RUN)
    final = params.run_dir(RUN) / "checkpoints" / "final"
    assert state["source"]["preset"] == "T/2" and len(state["source"]["sha256"]) == 64
    assert sorted(p.name for p in final.iterdir()) == ["ema.safetensors", "model.safetensors", "state.json"]
    assert not (params.run_dir(RUN) / "metrics.jsonl").exists()  # nothing trained
    for weights in ("ema", "raw"):
        ours = load_run_net(params, RUN, weights, "cpu")
        theirs, _ = build_official_model(folder / "alphaflow-T-2.pt", weights, num_classes=3)
        z, t, r, y = torch.randn(4, 3, 8, 8), torch.full((4,), 0.8), torch.full((4,), 0.3), torch.tensor([0, 1, 2, 3])
        with torch.no_grad():
            torch.testing.assert_close(ours(z, r, t, y), theirs(z, r, t, y), rtol=0, atol=0)
    capsys.readouterr()
    assert train(params, RUN) == state  # the same file: nothing to do
    assert "already imported" in capsys.readouterr().out
    tiny_snapshot(folder / "alphaflow-T-2.pt", seed=7)  # another file under the same name: imported again
    again = train(params, RUN)
    assert again["source"]["sha256"] != state["source"]["sha256"] and again["fingerprint"] != state["fingerprint"]


def test_released_runs_fail_clearly(released, monkeypatch, tmp_path):
    params, folder = released
    monkeypatch.setenv("ALPHAFLOW_RELEASED", str(tmp_path / "nowhere"))
    with pytest.raises(MissingInputError, match=r"runs\.alphaflow-T-2\.checkpoint.*does not exist.*ALPHAFLOW_RELEASED"):
        train(params, RUN)
    monkeypatch.setenv("ALPHAFLOW_RELEASED", str(folder))
    wrong = Params(raw={**params.raw, "runs": {RUN: {**params.raw["runs"][RUN], "model": "B/2"}}})
    with pytest.raises(UserError, match=r"'runs\.alphaflow-T-2\.model' = 'B/2', but .* holds a T/2 network"):
        train(wrong, RUN)
    raw = {**params.raw, "runs": {RUN: {**params.raw["runs"][RUN], "checkpoint": "weights.bin"}}}
    with pytest.raises(ParamsError, match=r"runs\.alphaflow-T-2\.checkpoint' = 'weights\.bin'"):
        from alphaflow.config import validate

        validate(raw)


def test_init_from_a_released_file_fine_tunes_from_its_weights(tiny_project, tmp_path, monkeypatch):
    write, results = tiny_project
    folder = tmp_path / "released"
    folder.mkdir()
    tiny_snapshot(folder / "xl.pt", rows=4)  # with a null row, as the CFG models
    monkeypatch.setenv("ALPHAFLOW_RELEASED", str(folder))
    run = {
        "method": "alphaflow",
        "model": "T/2",
        "model_overrides": {},
        "init_from": "xl.pt",
        "steps": 2,
        "checkpoint_every": 1,
    }
    params = load_params(write(runs={"plus": run}))
    state = train(params, "plus", quiet=True)
    assert state["step"] == 2
    # Fine-tuned from the file: two small steps away from its raw weights, nowhere near a fresh init.
    trained = load_run_net(params, "plus", "raw", "cpu").state_dict()
    source, _ = build_official_model(folder / "xl.pt", "raw", num_classes=3)
    w = "blocks.0.attn.qkv.weight"
    assert (trained[w] - source.state_dict()[w]).abs().max() < 0.05 < source.state_dict()[w].abs().max()
    # The file's content is part of the run's provenance: another file retrains.
    from alphaflow.run_folder import train_fingerprint

    before = train_fingerprint(params, params.run("plus"))
    tiny_snapshot(folder / "xl.pt", rows=4, seed=3)
    assert train_fingerprint(params, params.run("plus")) != before


# ----------------------------------------------------------------------------
# Through the real Snakemake.


def snakemake(tmp_path, params_file, *extra):
    args = [
        str(BIN / "snakemake"),
        "all",
        "-s",
        str(ROOT / "Snakefile"),
        "--directory",
        str(tmp_path),
        "--cores",
        "2",
        "--config",
        f"params={params_file}",
        *extra,
    ]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # `alphaflow` as the rules call it
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_released_profile_runs_through_snakemake_without_training(tmp_path, monkeypatch):
    folder = tmp_path / "released"
    folder.mkdir()
    tiny_snapshot(folder / "alphaflow-T-2.pt")
    monkeypatch.setenv("ALPHAFLOW_RELEASED", str(folder))
    images = write_class_folder(tmp_path / "images")
    d = released_profile(tmp_path / "results", images)
    params_file = tmp_path / "released.yaml"
    params_file.write_text(yaml.safe_dump(d, sort_keys=False))
    out = snakemake(tmp_path, params_file)
    assert "rule encode" not in out  # an imported run reads no latents
    run_dir = tmp_path / "results" / "runs" / RUN
    log = (tmp_path / "results" / "logs" / f"train-{RUN}.log").read_text()
    assert "alphaflow-official-snapshot" in log and not (run_dir / "metrics.jsonl").exists()
    table = (tmp_path / "results" / "tables" / "released-test" / "table1.md").read_text()
    assert "eval.protocol = alphaflow" in table and "weights imported from alphaflow-T-2.pt" in table
    assert "12.50" in table  # the paper column
    evals = {p.name: json.loads(p.read_text()) for p in (run_dir / "eval" / "ema").glob("*.json")}
    assert set(evals) == {"1nfe.json", "2nfe-cons-0.5.json", "1nfe-balanced.json"}
    assert evals["1nfe-balanced.json"]["labels"] == "balanced" and evals["1nfe.json"]["labels"] == "random"
    balanced = (tmp_path / "results" / "tables" / "released-test" / "table1-balanced.md").read_text()
    assert "11.00" in balanced and "12.50" not in balanced  # the paper's balanced-label number, ours beside it
    from alphaflow.samples import load_samples

    _, labels = load_samples(run_dir / "samples" / "ema" / "1nfe-balanced")
    assert labels.tolist() == [i % 3 for i in range(24)]  # seed i → class i mod 3
    assert "Nothing to be done" in snakemake(tmp_path, params_file, "-n")
    first = json.loads((run_dir / "checkpoints" / "final" / "state.json").read_text())["source"]["sha256"]
    tiny_snapshot(folder / "alphaflow-T-2.pt", seed=5)  # a new file: imported again, everything downstream redone
    out = snakemake(tmp_path, params_file)
    assert "rule train" in out and "rule sample" in out and "rule report" in out
    assert json.loads((run_dir / "checkpoints" / "final" / "state.json").read_text())["source"]["sha256"] != first
    assert "Nothing to be done" in snakemake(tmp_path, params_file, "-n")
