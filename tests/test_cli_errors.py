"""What a user sees when `alphaflow <stage>` fails (alphaflow/cli.py, alphaflow/errors.py).

Real `python -m alphaflow` runs. A user error (malformed YAML, a bad params value, a corrupt shard) ends as
one message `alphaflow: ...` naming the file/key, exit code 2, no traceback unless ALPHAFLOW_DEBUG=1.
An internal error (any other exception) keeps Python's traceback and exit code 1.
"""

import os
import subprocess
import sys

import pytest
import yaml

from alphaflow import errors
from alphaflow.config import ParamsError
from alphaflow.data.shards import ShardError
from helpers import ROOT, run_cli, tiny_params_dict


def debug_env(on):
    env = {k: v for k, v in os.environ.items() if k != "ALPHAFLOW_DEBUG"}
    if on:
        env["ALPHAFLOW_DEBUG"] = "1"
    return env


def assert_user_error(proc, *names):
    """Exit 2, `alphaflow: <message>` naming each of `names`, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "alphaflow: " in proc.stderr, proc.stderr
    message = proc.stderr[proc.stderr.index("alphaflow: ") :]
    for name in names:
        assert str(name) in message, f"{name!r} not in {message!r}"
    return message


def check_both_ways(args, *names):
    """The user error without, then with ALPHAFLOW_DEBUG=1 (same message, after a traceback)."""
    message = assert_user_error(run_cli(*args, check=False, env=debug_env(False)), *names)
    debug = run_cli(*args, check=False, env=debug_env(True))
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr, debug.stderr
    assert debug.stderr.rstrip().endswith(message.rstrip())
    return message


def test_error_classes_keep_their_old_bases():
    assert issubclass(ParamsError, errors.UserError) and issubclass(ParamsError, ValueError)
    assert issubclass(ShardError, errors.UserError) and issubclass(ShardError, ValueError)
    assert issubclass(errors.MissingInputError, FileNotFoundError)
    assert issubclass(errors.InvalidInputError, ValueError)


# ----------------------------------------------------------------------------
# (a) malformed YAML


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: test\nseed: 0\ndata:\n  name: [unclosed\n  source: folder\n")
    message = check_both_ways(["validate", "--params", bad], bad, "malformed YAML", "line ", "column ")
    assert "line 5" in message or "line 4" in message  # the flow sequence opened on line 4 is never closed


def test_malformed_override_value(tmp_path):
    message = check_both_ways(
        ["validate", "--params", "params/default.yaml", "--set", "seed=[1,"], "override 'seed=[1,'", "malformed YAML"
    )
    assert "line 1" in message


# ----------------------------------------------------------------------------
# (b) a corrupt data shard


def test_corrupt_shard(tiny_project):
    write, results = tiny_project
    params = write()
    shard = sorted((results / "data").glob("**/train/*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the image data
    shard.write_bytes(bytes(data))
    check_both_ways(["classifier", "--params", params], shard, "corrupt", "sha256")


# ----------------------------------------------------------------------------
# (c) bad params values


def test_bad_params_value(tmp_path):
    d = tiny_params_dict(tmp_path / "results", tmp_path / "images", fm_ratio=2.5)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(d))
    check_both_ways(["validate", "--params", path], path, "defaults.fm_ratio", "2.5")


def test_bad_sampler_times(tmp_path):
    d = tiny_params_dict(tmp_path / "results", tmp_path / "images")
    d["eval"]["samplers"][1]["t_steps"] = [1.0, 0.3, 0.6, 0.0]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(d))
    check_both_ways(["validate", "--params", path], path, "eval.samplers.1.t_steps", "descending")


def test_override_into_a_scalar(tmp_path):
    check_both_ways(["validate", "--params", "params/default.yaml", "--set", "seed.x=1"], "seed.x", "'seed'")


def test_missing_input_folder(tmp_path):
    d = tiny_params_dict(tmp_path / "results", tmp_path / "no-such-folder")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(d))
    check_both_ways(["prepare", "--params", path], tmp_path / "no-such-folder", "data.path")


# ----------------------------------------------------------------------------
# Internal errors keep their traceback.


@pytest.mark.parametrize("error", ["RuntimeError('internal bug')", "FileNotFoundError(2, 'No such file', 'x')"])
def test_internal_error_keeps_traceback(error):
    """A stage that fails with anything but a UserError (stands in for a bug) is not dressed up."""
    script = (
        "import sys, alphaflow.cli as cli\n"
        f"def broken(args, params): raise {error}\n"
        "cli.cmd_validate = broken\n"
        "sys.exit(cli.main(['validate', '--params', 'params/default.yaml']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=debug_env(False)
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr and "alphaflow: " not in proc.stderr


# ----------------------------------------------------------------------------
# User-caused failures deep in the library are UserErrors (so the CLI prints them as above).


def test_corrupt_or_missing_library_inputs_are_user_errors(tmp_path):
    import gzip

    from alphaflow import classifier as C
    from alphaflow.data.embedded import read_idx
    from alphaflow.data.encoders import resolve_vae_path
    from alphaflow.data.prepare import scan_folder

    truncated = tmp_path / "train-images-idx3-ubyte.gz"
    truncated.write_bytes(gzip.compress(b"\0\0\x08\x01" + bytes(100))[:30])
    with pytest.raises(errors.InvalidInputError, match="Delete it"):
        read_idx(truncated)

    weights = tmp_path / "clf.safetensors"
    C.save_classifier(C.SmallCNN(), weights)
    data = bytearray(weights.read_bytes())
    weights.write_bytes(bytes(data[: len(data) // 2]))  # a truncated copy
    with pytest.raises(errors.InvalidInputError, match="retrain"):
        C.load_classifier(weights)
    C._meta_path(weights).write_text("{not json")
    with pytest.raises(errors.InvalidInputError, match="not valid JSON"):
        C.load_classifier(weights)

    with pytest.raises(errors.MissingInputError):
        resolve_vae_path(tmp_path / "no-vae")
    with pytest.raises(errors.MissingInputError, match="data.path"):
        scan_folder(tmp_path / "no-images")
    (tmp_path / "flat").mkdir()
    with pytest.raises(errors.InvalidInputError, match="class sub-folders"):
        scan_folder(tmp_path / "flat")


def test_params_snakefile_and_launcher_paths_do_not_import_torch():
    """A login node runs Snakemake and one blocked `alphaflow launch` per queued job: the modules they import
    (the Snakefile's and rules' `alphaflow` imports, the CLI, the launcher) must not load torch."""
    import re

    sources = [ROOT / "Snakefile", *sorted((ROOT / "workflow" / "rules").glob("*.smk"))]
    pattern = r"^\s*from (alphaflow[\w.]*) import"
    modules = sorted({m for f in sources for m in re.findall(pattern, f.read_text(), re.M)})
    assert "alphaflow.config" in modules and "alphaflow.provenance" in modules
    # Peak RSS from /proc (ru_maxrss would count the forking pytest process's peak too).
    code = (
        f"import re, sys\nimport {', '.join(modules + ['alphaflow.cli', 'alphaflow.launch'])}\n"
        "from alphaflow.config import load_params\nload_params('params/paper.yaml')\n"
        "peak = int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) // 1024\n"
        "print('torch' in sys.modules, peak)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    loaded, rss_mb = out.split()
    assert loaded == "False", modules
    assert int(rss_mb) < 100, rss_mb
