"""alphaflow.io: atomic writes (the old file or the new one, never half, no temporary left behind) and the layers
below the report (io, stats, plots) importing nothing above them."""

import json
import os
import subprocess
import sys

import pytest

from alphaflow import io


def test_atomic_writes_return_the_checksum_and_leave_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.bin"
    assert io.atomic_write_bytes(path, b"abc") == io.sha256_file(path) == io.sha256_bytes(b"abc")
    assert io.atomic_write_text(tmp_path / "t.md", "α\n") == tmp_path / "t.md"
    assert (tmp_path / "t.md").read_bytes() == "α\n".encode()
    io.atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [2]})
    assert (tmp_path / "j.json").read_text() == json.dumps({"b": 1, "a": [2]}, indent=1) + "\n"
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask  # not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.bin", "j.json", "sub", "t.md"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    io.atomic_write_text(path, "old")

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_publish_dir_replaces_the_previous_folder(tmp_path):
    final = tmp_path / "final"
    for content in ("first", "second"):
        tmp = tmp_path / ".tmp-final"
        tmp.mkdir()
        (tmp / "state.json").write_text(content)
        assert io.publish_dir(tmp, final) == final
    assert (final / "state.json").read_text() == "second" and sorted(os.listdir(tmp_path)) == ["final"]


def test_the_low_layers_import_nothing_above_them():
    """io is standard library only (the image-decoding workers of data.prepare import it); stats and plots
    import nothing from the report, so the report can import them and train can import plots."""
    code = (
        "import sys, alphaflow.io; assert not {'numpy', 'torch'} & set(sys.modules), sorted(sys.modules); "
        "import alphaflow.stats, alphaflow.plots; "
        "assert not [m for m in sys.modules if m.startswith(('alphaflow.report', 'alphaflow.evaluate', 'torch'))]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
