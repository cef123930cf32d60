"""MLflow tracking: jobs started together (the demo trains two runs at once) share a fresh SQLite store; a
locked store or a refused item loses nothing and logs nothing twice; `track-replay` fills what MLflow missed."""

import os
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from alphaflow.cli import main as cli_main
from alphaflow.jsonl import append_jsonl
from alphaflow.tracking import Tracker
from helpers import tiny_params_dict

TRACK = """
import sys
from pathlib import Path
from alphaflow.tracking import Tracker
uri, folder, name = sys.argv[1:]
t = Tracker(uri, "race", name, run_id_file=Path(folder) / name)
t.log_metrics({"x": 1.0}, step=1)
t.close()
print("warned" if t.warned else "ok")
"""


def test_processes_creating_one_sqlite_store_at_once_all_track(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TRACK, uri, str(tmp_path), f"run{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [o.strip() for o, _ in outs] == ["ok"] * 4, [e[-500:] for _, e in outs]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"run{i}" for i in range(4)]
    assert all(r.data.metrics == {"x": 1.0} for r in runs)


def test_without_mlflow_installed_tracking_warns_once_and_does_nothing(tmp_path, monkeypatch, capsys):
    """A machine without MLflow (a bare GPU image) still trains: metrics.jsonl keeps everything."""
    from alphaflow.tracking import Tracker

    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow…` raises ImportError
    t = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "bare", "run", run_id_file=tmp_path / "id")
    t.log_params({"a": {"b": 1}})
    t.log_metrics({"x": 1.0}, step=1)
    t.close()
    assert not t.enabled and t.warned
    assert capsys.readouterr().err.count("MLflow tracking failed") == 1
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "id").exists()


# ----------------------------------------------------------------------------
# A store that is locked or refuses an item: nothing is lost, nothing is logged twice.

URI = os.environ["MLFLOW_TRACKING_URI"]  # conftest's SQLite store: created (and migrated) once per session
DB = URI[len("sqlite:///") :]
KEYS = ("loss", "cos(FM',TC)")  # the second one is renamed for MLflow: cos_FMp_TC


@pytest.fixture
def busy_timeout_ms(request):
    """MLflow sets `PRAGMA busy_timeout = 20000` on each SQLite session. The fast tests lower it to 1 s (None:
    MLflow's own 20 s): the lock below is just as real and so is the "database is locked" it produces."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    rewritten = []

    def shorten(conn, cursor, statement, parameters, context, executemany):
        if "busy_timeout = 20000" in statement:
            rewritten.append(statement)
            statement = statement.replace("busy_timeout = 20000", f"busy_timeout = {ms}")
        return statement, parameters

    ms = getattr(request, "param", 1000)
    if ms is not None:
        event.listen(Engine, "before_cursor_execute", shorten, retval=True)
    yield ms or 20000
    if ms is not None:
        event.remove(Engine, "before_cursor_execute", shorten)
        assert rewritten, "MLflow no longer sets busy_timeout = 20000: update this fixture"


def history(run_id, key):
    return sorted(m.step for m in MlflowClient(URI).get_metric_history(run_id, key))


def wait_for(fn, timeout=60):
    deadline = time.time() + timeout
    while not fn():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def log(tracker, run_dir, step):
    """What training does per record: metrics.jsonl first, then the tracker (which must not block)."""
    record = {"step": step, **{k: step / 10 for k in KEYS}}
    append_jsonl(run_dir / "metrics.jsonl", record)
    t0 = time.perf_counter()
    tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step=step)
    assert time.perf_counter() - t0 < 0.1


def exclusive_lock():
    """Another connection holding the store's write lock (reads and writes of others wait, then fail)."""
    con = sqlite3.connect(DB, isolation_level=None, timeout=60)
    con.execute("BEGIN EXCLUSIVE")
    return con


def started(tmp_path, name):
    run_dir = tmp_path / "results" / "runs" / name
    run_dir.mkdir(parents=True)
    t = Tracker(URI, "locked", name, run_id_file=run_dir / "mlflow_run_id")
    log(t, run_dir, 1)
    wait_for(lambda: t.run_id is not None and history(t.run_id, "loss") == [1])
    return t, run_dir


@pytest.mark.parametrize(
    "busy_timeout_ms",
    [pytest.param(1000, id="busy-1s"), pytest.param(None, id="busy-20s", marks=pytest.mark.slow)],
    indirect=True,
)
def test_a_locked_sqlite_store_delays_metrics_and_loses_none(tmp_path, busy_timeout_ms, capsys):
    t, run_dir = started(tmp_path, f"locked-{busy_timeout_ms}")
    lock = exclusive_lock()
    hold_s = busy_timeout_ms / 1000 + 2.5
    for step in range(2, 9):
        log(t, run_dir, step)
        time.sleep(hold_s / 7)
    lock.execute("ROLLBACK")
    lock.close()
    for step in (9, 10):
        log(t, run_dir, step)
    t.close()
    assert "database is locked" in str(t.last_error)  # the error of the issue happened, and was retried
    assert not t.pending and t.dropped == 0
    for key in ("loss", "cos_FMp_TC"):
        assert history(t.run_id, key) == list(range(1, 11))  # every point, exactly once
    assert MlflowClient(URI).get_run(t.run_id).info.status == "FINISHED"
    assert "were not sent" not in capsys.readouterr().err


def test_what_close_could_not_send_is_counted_then_replayed_once(tmp_path, busy_timeout_ms, capsys):
    t, run_dir = started(tmp_path, "alphaflow-tiny")
    lock = exclusive_lock()
    for step in (2, 3, 4):
        log(t, run_dir, step)
    t.close(retry_s=1)
    lock.execute("ROLLBACK")
    lock.close()
    err = capsys.readouterr().err
    assert "4 MLflow item(s) of run alphaflow-tiny were not sent" in err  # 3 metric batches + set_terminated
    assert "track-replay --params P --run alphaflow-tiny" in err
    assert history(t.run_id, "loss") == [1]
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump({**tiny_params_dict(tmp_path / "results", tmp_path / "images"), "profile": "locked"})
    )
    for logged in (3, 0):  # a second replay finds everything there
        assert cli_main(["track-replay", "--params", str(params), "--run", "alphaflow-tiny"]) == 0
        assert f"{2 * logged} metric points logged to MLflow run {t.run_id}" in capsys.readouterr().out
    for key in ("loss", "cos_FMp_TC"):
        assert history(t.run_id, key) == [1, 2, 3, 4]


def test_a_refused_item_does_not_stop_tracking(tmp_path, capsys):
    first = Tracker(URI, "refused", "run", run_id_file=tmp_path / "id")
    first.log_params({"lr": 1})
    first.close()
    again = Tracker(URI, "refused", "run", run_id_file=tmp_path / "id")  # a resumed run whose params changed
    again.log_params({"lr": 2})  # MLflow refuses to change a param: dropped, with the one warning
    again.log_metrics({"x": 1.0}, step=1)
    again.close()
    assert again.run_id == first.run_id and history(again.run_id, "x") == [1]
    err = capsys.readouterr().err
    assert err.count("MLflow tracking failed") == 1 and "1 MLflow item(s) of run run were not sent" in err


@pytest.mark.parametrize("content", [b"", b"\0\0\0\0", b"\xff\xfe not an id"])
def test_an_empty_or_torn_run_id_file_starts_a_new_run(tmp_path, content):
    id_file = tmp_path / "mlflow_run_id"
    id_file.write_bytes(content)
    t = Tracker(URI, "id-file", "run", run_id_file=id_file)
    t.log_metrics({"x": 1.0}, step=1)
    t.close()
    assert not t.warned and id_file.read_text() == t.run_id and history(t.run_id, "x") == [1]
    assert not list(tmp_path.glob(".*tmp"))
