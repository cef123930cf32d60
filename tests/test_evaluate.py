"""Sampling at scale, evaluation and the report, on a tiny trained run (real training, real metrics)."""

import json

import numpy as np
import pytest
import torch
import yaml

from alphaflow import evaluate as E
from alphaflow import samples as S
from alphaflow.config import ParamsError, load_params
from alphaflow.data.shards import ShardError
from helpers import ROOT


def test_labels_follow_the_two_protocols_of_table_6():
    seeds = list(range(20))
    balanced = S.labels_for_seeds(seeds, 10, "balanced")
    assert np.bincount(balanced, minlength=10).tolist() == [2] * 10
    random = S.labels_for_seeds(seeds, 1000, "random")
    assert random[7] == np.random.RandomState(7).choice(1000)  # EDM convention, per seed
    assert S.labels_for_seeds([7], 1000, "random")[0] == random[7]  # independent of batching


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_latents):
    """A tiny project with one finished α-Flow run, its classifier and reference statistics."""
    from alphaflow.reference import reference
    from alphaflow.stages import classifier
    from helpers import trained_tiny_project

    params = trained_tiny_project(tmp_path_factory.mktemp("eval"), tiny_latents)
    classifier(params, device="cpu")
    reference(params, device="cpu")
    return params


def test_sampling_is_the_same_whatever_the_partition_and_resumes_per_chunk(trained):
    params = trained
    S.sample_run(params, "alphaflow-tiny", "ema", "2nfe-cons-0.5", device="cpu", quiet=True)
    out = params.samples_dir("alphaflow-tiny", "ema", "2nfe-cons-0.5")
    whole, labels = S.load_samples(out)
    assert whole.dtype == torch.uint8 and len(whole) == params.raw["eval"]["num_samples"]
    # Two array tasks write different chunk boundaries but the same image per seed.
    import shutil

    shutil.rmtree(out)
    for part in (1, 0):
        S.sample_run(params, "alphaflow-tiny", "ema", "2nfe-cons-0.5", part=part, num_parts=2, device="cpu", quiet=True)
    parted, labels2 = S.load_samples(out)
    assert torch.equal(parted, whole) and torch.equal(labels2, labels)
    # A lost chunk is regenerated alone; finished chunks are not touched.
    chunks = sorted(out.glob("chunks-*/seeds-*.safetensors"))
    kept = {c.name: c.stat().st_mtime_ns for c in chunks[1:]}
    chunks[0].unlink()
    (out / "done.json").unlink()
    S.sample_run(params, "alphaflow-tiny", "ema", "2nfe-cons-0.5", part=0, num_parts=2, device="cpu", quiet=True)
    assert {c.name: c.stat().st_mtime_ns for c in sorted(out.glob("chunks-*/seeds-*.safetensors"))[1:]} == kept
    assert torch.equal(S.load_samples(out)[0], whole)


def test_a_corrupt_sample_chunk_is_refused_by_name(trained):
    params = trained
    S.sample_run(params, "alphaflow-tiny", "raw", "1nfe", device="cpu", quiet=True)
    out = params.samples_dir("alphaflow-tiny", "raw", "1nfe")
    chunk = sorted(out.glob("chunks-*/seeds-*.safetensors"))[0]
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=chunk.name):
        S.load_samples(out)
    chunk.unlink()
    (out / "done.json").unlink()


def test_evaluate_writes_metrics_with_intervals_and_the_report_tables(trained):
    from alphaflow.report import report

    params = trained
    for weights in ("ema", "raw"):
        S.sample_run(params, "alphaflow-tiny", weights, "1nfe", device="cpu", quiet=True)
        record = E.evaluate_run(params, "alphaflow-tiny", weights, "1nfe", device="cpu", quiet=True)
        m = record["metrics"]["fd_classifier"]
        assert m["low"] <= m["value"] <= m["high"] and m["n"] == params.raw["eval"]["num_samples"]
    on_disk = json.loads(params.eval_file("alphaflow-tiny", "raw", "1nfe").read_text())
    assert on_disk["metrics"] == record["metrics"]
    out = report(params, mlflow=False)
    table = out["table1"].read_text()
    assert "alphaflow-tiny" in table and "NFE1 FD_clf" in table
    assert "NFE2" not in table  # no 2-NFE cell was evaluated and the paper has none: the column is left out
    csv = (params.results / "tables" / "test" / "results.csv").read_text().splitlines()
    assert len(csv) == 1 + 2  # ema and raw, one metric
    assert out["bars_fd_classifier"].exists() and out["training"].exists()


def test_paper_report_lists_every_paper_row_with_its_numbers_and_not_run(tmp_path):
    from alphaflow.report import report

    params = load_params(ROOT / "params" / "paper.yaml", [f"results={tmp_path}"])
    out = report(params, mlflow=False)
    table = out["table1"].read_text()
    for run_name, entry in params.raw["paper_results"].items():
        assert run_name in table
        for key in ("fid_1nfe", "fdd_1nfe", "fid_2nfe", "fdd_2nfe"):
            if key in entry:
                assert f"{entry[key]:.2f}" in table
    ema_rows = [line for line in table.splitlines() if "| ema |" in line]
    assert len(ema_rows) == 12 and all("not run" in line for line in ema_rows)
    # The M/2 and L/2 MeanFlow numbers come from another paper's protocol: marked, the others not.
    marked = {line.split("|")[1].strip() for line in ema_rows if "different protocol" in line}
    assert marked == {"meanflow-M-2-cfg", "meanflow-L-2-cfg"}
    assert sum("as the paper" in line for line in ema_rows) == 10
    assert (tmp_path / "tables" / "paper" / "table1.tex").read_text().startswith("\\begin{tabular}")


def test_sample_evaluate_does_every_cell_of_a_run_once_and_keeps_the_current_ones(trained):
    """eval.jobs run's job: every cell of the run sampled and evaluated in one process, with the per-cell stage's
    metrics; a second call rewrites nothing; a stale evaluation is redone alone."""
    from alphaflow.evaluate import current_evaluation, evaluate_run, sample_evaluate

    params, run = trained, "alphaflow-tiny"
    sample_evaluate(params, run, device="cpu", quiet=True)
    cells = [(w, s) for r, w, s in params.evaluation_cells() if r == run]
    records = {c: json.loads(params.eval_file(run, *c).read_text()) for c in cells}
    assert len(cells) == 4 and all(current_evaluation(params, run, *c) == records[c] for c in cells)
    evaluate_run(params, run, *cells[-1], device="cpu", quiet=True)  # the per-cell stage on the same samples
    assert json.loads(params.eval_file(run, *cells[-1]).read_text())["metrics"] == records[cells[-1]]["metrics"]

    stamps = lambda: {p: p.stat().st_mtime_ns for p in params.run_dir(run).rglob("*.json")}
    before = stamps()
    sample_evaluate(params, run, device="cpu", quiet=True)
    assert stamps() == before
    stale = params.eval_file(run, *cells[0])
    stale.write_text(json.dumps({**records[cells[0]], "fingerprint": "0" * 16}))
    before = stamps()
    sample_evaluate(params, run, device="cpu", quiet=True)
    after = stamps()
    assert {p for p in before if after[p] != before[p]} == {stale}
    assert json.loads(stale.read_text())["metrics"] == records[cells[0]]["metrics"]


def test_one_job_per_run_is_for_the_in_process_executor(tmp_path):
    from helpers import tiny_params_dict

    d = tiny_params_dict(tmp_path / "results", tmp_path / "images")
    d["eval"]["jobs"] = "run"
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(d))
    assert load_params(tmp_path / "ok.yaml").raw["eval"]["jobs"] == "run"
    d["executor"] = "slurm"
    (tmp_path / "slurm.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(ParamsError, match="'eval.jobs' = 'run' with executor 'slurm'"):
        load_params(tmp_path / "slurm.yaml")
