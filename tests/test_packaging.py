"""A non-editable install carries what the package reads at run time (the params schema, the SD-VAE config, the
measured cost tables of `alphaflow plan`)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_validates_a_profile_outside_the_repo(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    # As in the repository: alphaflow/data/costs is a link to benchmarks/results.
    shutil.copytree(ROOT / "alphaflow", src / "alphaflow", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "benchmarks" / "results", src / "benchmarks" / "results")
    assert (src / "alphaflow" / "data" / "costs").is_symlink()
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(src),
        ],
        check=True,
        cwd=tmp_path,
    )
    shutil.rmtree(src)  # nothing may be read from a source tree
    profile = tmp_path / "profile.yaml"
    shutil.copy(ROOT / "params" / "default.yaml", profile)
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = (
        "import alphaflow, alphaflow.official as o; print(alphaflow.__file__); "
        "print(o.sd_vae_config()['latent_channels'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=tmp_path, check=True, capture_output=True, text=True
    ).stdout.split()
    assert out[0].startswith(str(site)), out  # the installed copy, not the editable one
    assert out[1] == "4"
    ok = subprocess.run(
        [sys.executable, "-m", "alphaflow", "validate", "--params", str(profile)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    shutil.copy(profile, profile.with_name("p2.yaml"))
    profile.write_text(profile.read_text().replace("defaults:", "defaults:\n  no_such_key: 1", 1))
    bad = subprocess.run(
        [sys.executable, "-m", "alphaflow", "validate", "--params", str(profile)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "no_such_key" in bad.stderr, bad.stderr
    # The cost plan reads the measured tables the package carries.
    plan = subprocess.run(
        [sys.executable, "-m", "alphaflow", "plan", "--params", str(profile.with_name("p2.yaml"))],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.startswith("Cost plan on cpu") and "step costs: cpu (x86_64) fp32" in plan.stdout
