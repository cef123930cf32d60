"""MLflow tracking: jobs started together (the demo trains two runs at once) share a fresh SQLite store."""

import subprocess
import sys

from mlflow.tracking import MlflowClient

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
    procs = [subprocess.Popen([sys.executable, "-c", TRACK, uri, str(tmp_path), f"run{i}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
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
