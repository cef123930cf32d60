"""A diverging run (alphaflow.divergence): the per-t-bucket loss, and the off / stop / rollback policies with an
injected non-finite loss (ALPHAFLOW_FAULT_NONFINITE), through train() and the CLI."""

import json
import math
import os

import pytest
import torch
import yaml
from helpers import assert_bit_identical, final_tensors, run_cli

from alphaflow import divergence as D
from alphaflow.config import load_params
from alphaflow.errors import UserError
from alphaflow.jsonl import read_jsonl
from alphaflow.train import train

# ----------------------------------------------------------------------------
# The per-t-bucket loss


def test_bucket_sums_split_the_loss_by_t_and_by_t_minus_r():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # fmt: off
    t = torch.tensor([0.05, 0.10, 0.99, 1.0])   # buckets 0, 0, 7, 7 (t = 1 in the last)
    r = torch.tensor([0.05, 0.00, 0.40, 0.0])   # t − r = 0, 0.1, 0.59, 1: buckets 0, 0, 4, 7
    # fmt: on
    sums, counts = D.bucket_sums(loss, t, r)
    assert sums[:8].tolist() == [3.0, 0, 0, 0, 0, 0, 0, 7.0]
    assert counts[:8].tolist() == [2.0, 0, 0, 0, 0, 0, 0, 2.0]
    assert sums[8:].tolist() == [3.0, 0, 0, 0, 3.0, 0, 0, 4.0]
    means = D.bucket_means(sums, counts)
    assert means == {"loss_t0": 1.5, "loss_t7": 3.5, "loss_dt0": 1.5, "loss_dt4": 3.0, "loss_dt7": 4.0}
    assert D.bucket_label("loss_t7") == "t ∈ [0.875, 1]" and D.bucket_label("loss_dt0") == "t − r ∈ [0, 0.125)"


def test_worst_bucket_names_the_non_finite_one_else_the_largest_rise():
    assert D.worst_bucket({"loss_t2": 1.0, "loss_t6": math.nan}, {}) == "non-finite loss in t ∈ [0.75, 0.875)"
    phrase = D.worst_bucket({"loss_t1": 2.0, "loss_t5": 1.5}, {"loss_t1": 1.9, "loss_t5": 0.1})
    assert phrase.startswith("largest loss in t ∈ [0.625, 0.75): 1.5 (window mean 0.1)")


def test_the_poisoned_sample_is_the_largest_t():
    out = D.poison(torch.ones(4), torch.tensor([0.2, 0.9, 0.5, 0.1]))
    assert [math.isnan(v) for v in out.tolist()] == [False, True, False, False]


def test_fault_batches_parse_and_refuse_garbage(monkeypatch):
    monkeypatch.setenv(D.FAULT_ENV, "25, 40")
    assert D.fault_batches() == {25, 40}
    monkeypatch.setenv(D.FAULT_ENV, "25;40")
    with pytest.raises(UserError, match="comma-separated"):
        D.fault_batches()


# ----------------------------------------------------------------------------
# The monitor


def test_monitor_counts_events_within_the_window():
    m = D.Monitor("stop", window=10, max_events=2)
    assert m.observe(0, 0, 1.0) is None
    # fmt: off
    assert m.observe(1, 1, math.inf) is None          # one event: below the limit
    assert m.observe(20, 20, math.nan) is None        # the first left the window
    # fmt: on
    assert m.observe(25, 25, math.nan) == "non-finite gradient norm"
    assert m.take_events() == (20, [20, 25]) and not m.events
    off = D.Monitor("off", window=10, max_events=1)
    assert off.observe(0, 0, math.nan) is None  # off never acts


def test_monitor_spikes_after_a_window_of_history_and_round_trips():
    assert D.Monitor("stop", window=4, spike_factor=5.0).observe(0, 0, 1e9) is None  # no history: no spike
    m = D.Monitor("rollback", window=4, max_events=1, spike_factor=5.0)
    for step in range(4):
        assert m.observe(step, step, 1.0 + step % 2) is None  # running mean 1.5
    assert m.observe(4, 4, 7.0) is None and m.norm_mean == pytest.approx(0.75 * 1.5 + 0.25 * 7.0)
    assert "> 5 × its running mean" in m.observe(5, 5, 100.0)
    saved = json.loads(json.dumps(m.state_dict()))
    again = D.Monitor("rollback", window=4, max_events=1, spike_factor=5.0)
    again.load_state_dict(saved)
    assert again.state_dict() == m.state_dict()


# ----------------------------------------------------------------------------
# Through training


def write(tiny_project, runs, **defaults):
    write_params, results = tiny_project
    return load_params(write_params(runs=runs, **defaults)), results


def test_rollback_equals_a_run_that_skipped_the_same_batches(tiny_project, monkeypatch):
    """Two poisoned batches (5, 7) within the window: the run restores the checkpoint from before the first
    (step 4), skips both and goes on; stopped after step 8 and resumed, it ends bit-identical to a fresh run with
    skip_batches [5, 7], with the same metrics."""
    runs = {
        "rolled": {"method": "alphaflow", "divergence": "rollback", "divergence_events": 2},
        "skipped": {"method": "alphaflow", "skip_batches": [5, 7]},
    }
    params, results = write(tiny_project, runs)
    monkeypatch.setenv(D.FAULT_ENV, "5,7")
    train(params, "rolled", device="cpu", quiet=True, tracking=False, stop_after=8)
    train(params, "rolled", device="cpu", quiet=True, tracking=False)
    monkeypatch.delenv(D.FAULT_ENV)
    train(params, "skipped", device="cpu", quiet=True, tracking=False)
    assert_bit_identical(final_tensors(results, "rolled"), final_tensors(results, "skipped"))

    records = read_jsonl(results / "runs" / "rolled" / "metrics.jsonl")
    rollbacks = [r for r in records if "rollback" in r]
    assert rollbacks == [
        {
            "step": 4,
            "rollback": 1,
            "from_step": 7,
            "event": "non-finite gradient norm",
            "where": rollbacks[0]["where"],
            "skipped_batches": [5, 7],
        }
    ]
    assert rollbacks[0]["where"].startswith("non-finite loss in t ∈ [")

    def logged(run):
        return [
            {k: v for k, v in r.items() if k != "images_per_s"}
            for r in read_jsonl(results / "runs" / run / "metrics.jsonl")
            if "alpha" in r
        ]

    assert logged("rolled") == logged("skipped")
    final = json.loads((results / "runs" / "rolled" / "checkpoints" / "final" / "state.json").read_text())
    assert final["skipped"] == [5, 7] and final["batch"] == 14 and final["divergence"]["rollbacks"] == 1


def test_every_record_carries_the_loss_per_t_bucket(tiny_project):
    params, results = write(tiny_project, {"alphaflow-tiny": {"method": "alphaflow"}})
    train(params, "alphaflow-tiny", device="cpu", quiet=True, tracking=False)
    records = [r for r in read_jsonl(results / "runs" / "alphaflow-tiny" / "metrics.jsonl") if "alpha" in r]
    for r in records:
        buckets = {k: v for k, v in r.items() if k.startswith("loss_t") or k.startswith("loss_dt")}
        assert buckets and all(math.isfinite(v) and v >= 0 for v in buckets.values())
        assert any(k.startswith("loss_dt") for k in buckets)
        assert min(buckets.values()) <= r["loss"] <= max(buckets.values())  # a mean of bucket means' samples


def test_stop_ends_in_one_line_naming_the_step_and_bucket(tiny_project):
    write_params, results = tiny_project
    path = write_params(runs={"alphaflow-tiny": {"method": "alphaflow", "divergence": "stop", "divergence_events": 1}})
    proc = run_cli(
        "train",
        "--params",
        path,
        "--run",
        "alphaflow-tiny",
        "--quiet",
        check=False,
        env={**os.environ, D.FAULT_ENV: "5"},
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "diverged at step 5 (global batch 5): non-finite gradient norm; non-finite loss in t ∈ [" in lines[0]
    latest = json.loads((results / "runs" / "alphaflow-tiny" / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 4  # the last checkpoint is kept


def test_off_zeroes_and_counts_as_before(tiny_project, monkeypatch):
    params, results = write(tiny_project, {"alphaflow-tiny": {"method": "alphaflow"}})
    monkeypatch.setenv(D.FAULT_ENV, "5")
    summary = train(params, "alphaflow-tiny", device="cpu", quiet=True, tracking=False)
    assert summary["bad_steps"] == 1 and summary["step"] == 12


def test_rollback_gives_up_after_max_rollbacks(tiny_project, monkeypatch):
    params, _ = write(
        tiny_project,
        {
            "alphaflow-tiny": {
                "method": "alphaflow",
                "divergence": "rollback",
                "divergence_events": 1,
                "max_rollbacks": 1,
            }
        },
    )
    monkeypatch.setenv(D.FAULT_ENV, "3,9")
    with pytest.raises(D.Diverged, match=r"at step 8 \(global batch 9\).*after 1 rollback \(max_rollbacks\)"):
        train(params, "alphaflow-tiny", device="cpu", quiet=True, tracking=False)


def test_a_bare_off_in_yaml_is_the_off_policy(tiny_project):
    write_params, _ = tiny_project
    path = write_params()
    d = yaml.safe_load(path.read_text())
    d["defaults"]["divergence"] = False  # what `divergence: off` reads as
    path.write_text(yaml.safe_dump(d))
    assert load_params(path).run("alphaflow-tiny").divergence == "off"
