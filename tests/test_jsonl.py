"""metrics.jsonl after a crash: a torn last line (a kill or a full disk during an append) is dropped by every
reader and writer; a bad line in the middle is corruption and is named (file and line), never skipped."""

import json
import re

import pytest

from alphaflow.jsonl import JsonlError, append_jsonl, read_jsonl, truncate_jsonl
from alphaflow.plots import plot_training_curves


def records(*steps):
    return [{"step": s, "alpha": 1.0, "delta_sq": 1.0 / s} for s in steps]


def write_lines(path, recs, tail=b""):
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in recs) + tail)
    return path


TORN = b'{"step": 8, "alpha": 1.0, "lo'  # an append cut short: no closing brace, no newline


def test_a_torn_last_line_is_dropped_by_resume_and_by_the_report(tmp_path):
    path = write_lines(tmp_path / "metrics.jsonl", records(2, 4, 6), TORN)
    with pytest.warns(UserWarning, match="torn last line 4"):
        assert read_jsonl(path) == records(2, 4, 6)
    truncate_jsonl(path, 4)  # what training runs on resume from the step-4 checkpoint
    assert path.read_bytes() == b"".join(json.dumps(r).encode() + b"\n" for r in records(2, 4))
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic rewrite left no temporary file behind
    write_lines(path, records(2, 4, 6), TORN)
    assert plot_training_curves(path, tmp_path / "training.png").exists()


def test_an_append_after_a_torn_line_starts_a_line_of_its_own(tmp_path):
    path = write_lines(tmp_path / "metrics.jsonl", records(2), TORN)
    with pytest.warns(UserWarning, match="torn last line 2"):
        append_jsonl(path, records(4)[0])
    assert read_jsonl(path) == records(2, 4)  # the torn fragment is gone, no warning on reading
    path.write_bytes(path.read_bytes()[:-1])  # a complete record that only lost its newline is kept
    append_jsonl(path, records(6)[0])
    assert read_jsonl(path) == records(2, 4, 6)
    assert path.read_bytes().endswith(b"}\n")


def test_a_bad_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(json.dumps(records(2)[0]).encode() + b"\nnot json\n" + json.dumps(records(4)[0]).encode() + b"\n")
    for read in (read_jsonl, lambda p: truncate_jsonl(p, 2), lambda p: plot_training_curves(p, tmp_path / "x.png")):
        with pytest.raises(JsonlError, match=re.escape(f"{path}: line 2 is not a JSON record")):
            read(path)
    assert b"not json" in path.read_bytes()  # nothing rewritten
