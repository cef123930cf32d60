"""MLflow as a user meets it: a real `mlflow server` on 127.0.0.1, runs read back through its REST API,
and a server that dies mid-training (training must finish; metrics.jsonl keeps everything)."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from helpers import ROOT, browser, free_port, need_chromium

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def get(url, payload=None):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = resp.read()
    return json.loads(body) if body[:1] in (b"{", b"[") else body.decode()


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [
            BIN / "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--default-artifact-root",
            str(tmp_path / "artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if get(f"{url}/health").strip() == "OK":
                break
        except OSError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("mlflow server did not become healthy in 120 s")
        time.sleep(1)
    yield url, proc
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def cli(*args, env, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "alphaflow", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and proc.returncode:
        raise AssertionError(f"alphaflow {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_runs_metrics_and_tables_read_back_through_the_rest_api(mlflow_server, tiny_project):
    url, _ = mlflow_server
    write, results = tiny_project
    params = write(runs={"alphaflow-tiny": {"method": "alphaflow"}})
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    cli("train", "--params", params, "--run", "alphaflow-tiny", "--quiet", env=env)
    cli("classifier", "--params", params, env=env)
    cli("reference", "--params", params, env=env)
    for stage in ("sample", "evaluate"):
        cli(
            stage,
            "--params",
            params,
            "--run",
            "alphaflow-tiny",
            "--weights",
            "ema",
            "--sampler",
            "1nfe",
            "--quiet",
            env=env,
        )
    for _ in range(2):  # the report logs the evaluations; a second report adds nothing to their history
        cli("report", "--params", params, env=env)
    exp = get(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=test")["experiment"]
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in exp["tags"]  # opens on runs
    runs = get(f"{url}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert [r["info"]["run_name"] for r in runs] == ["alphaflow-tiny"]
    run = runs[0]
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert "fd_classifier_1nfe_ema" in metrics and metrics["fd_classifier_1nfe_ema"] > 0
    key = "fd_classifier_1nfe_ema"
    assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"]
    params_logged = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params_logged.get("method") == "alphaflow"
    run_id = run["info"]["run_id"]
    history = get(f"{url}/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=loss")["metrics"]
    local = [json.loads(line) for line in (results / "runs/alphaflow-tiny/metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [r["step"] for r in local]
    assert [h["value"] for h in history] == pytest.approx([r["loss"] for r in local])
    evaluated = get(f"{url}/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=fd_classifier_1nfe_ema")
    assert [m["step"] for m in evaluated["metrics"]] == [local[-1]["step"]]  # logged once, at the last step
    artifacts = get(f"{url}/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=samples/ema")
    assert [f["path"] for f in artifacts["files"]] == ["samples/ema/1nfe.png"]

    # What a user opens: the links the report writes, in a real (headless) browser.
    links = (results / "tables" / "test" / "mlflow.md").read_text()
    runs_url, compare_url = (line.split(": ", 1)[1] for line in links.splitlines() if line.startswith("- "))
    assert runs_url.startswith(url) and compare_url.startswith(url)
    need_chromium()
    table = browser(runs_url, results / "mlflow-runs.png")
    assert "Run Name" in table and "alphaflow-tiny" in table  # the runs table, not the GenAI page
    compare = browser(compare_url, results / "mlflow-compare.png", height=6000)  # tall: every section renders
    assert "alphaflow-tiny" in compare and "fd_classifier_1nfe_ema" in compare
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", compare))
    value = metrics["fd_classifier_1nfe_ema"]
    assert f" {value:.3f} " in text, (value, text[-3000:])  # its value, as the metrics table rounds it


def test_training_survives_the_tracking_server_dying(mlflow_server, tiny_project):
    url, server = mlflow_server
    write, results = tiny_project
    params = write(runs={"meanflow-tiny": {"method": "meanflow"}}, steps=80, log_every=2, checkpoint_every=40)
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "alphaflow", "train", "--params", str(params), "--run", "meanflow-tiny", "--quiet"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = results / "runs/meanflow-tiny/metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(server.pid, 9)  # the tracking server dies mid-run
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(2, 81, 2))  # every record kept locally
    assert err.count("WARNING: MLflow tracking failed") == 1
    assert (results / "runs/meanflow-tiny/checkpoints/final/state.json").exists()
