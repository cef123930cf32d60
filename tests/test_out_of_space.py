"""A full disk (ENOSPC) or a spent quota (EDQUOT): one OutOfSpace naming the path, what was written and the space
needed and free; no partial files left; what was saved before intact; re-running resumes exactly.

The disk is filled by a patched `alphaflow.io.write_bytes` (or safetensors' writer) raising the OS error at the
Nth write, through the library and through the CLI; where this process may mount a tmpfs, also for real."""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError

from alphaflow import checkpoint as ckpt
from alphaflow import io, jsonl, phema, runlock
from alphaflow.errors import OutOfSpace, UserError
from helpers import ROOT, run_cli, tiny_params_dict

RUN = "meanflow-tiny"


def enospc(*_):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full_after(n, code=errno.ENOSPC):
    """A write_bytes that writes `n` times, then fails with `code`."""
    calls = []

    def write(f, data):
        calls.append(getattr(f, "name", None))
        if len(calls) > n:
            raise OSError(code, os.strerror(code))
        f.write(data)

    return write


def listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*"))


# ----------------------------------------------------------------------------
# Atomic writes


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "table.csv"
    io.atomic_write_text(path, "old\n")
    monkeypatch.setattr(io, "write_bytes", full_after(0))
    with pytest.raises(OutOfSpace) as err:
        io.atomic_write_text(path, "x" * 5000, what="the results table")
    message = str(err.value)
    assert isinstance(err.value, UserError) and not isinstance(err.value, OSError)
    assert message.startswith(f"no space left on device writing the results table ({path}): it needs 4.9 KiB, ")
    assert " free there; nothing was lost" in message and "re-run the same command: it resumes" in message
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    assert listing(tmp_path) == ["table.csv"] and path.read_text() == "old\n"


def test_a_spent_quota_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "write_bytes", full_after(0, errno.EDQUOT))
    with pytest.raises(OutOfSpace, match=r"^disk quota exceeded writing .*a\.json: it needs 2 bytes"):
        io.atomic_write_json(tmp_path / "a.json", 1)
    assert listing(tmp_path) == []


def test_other_errors_pass_unchanged(tmp_path, monkeypatch):
    def eio(f, data):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(io, "write_bytes", eio)
    with pytest.raises(OSError) as err:
        io.atomic_write_bytes(tmp_path / "a", b"1")
    assert err.value.errno == errno.EIO and listing(tmp_path) == []


def test_safetensors_errors_quoting_the_os_error_count():
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    quota = SafetensorError("Error while serializing: I/O error: Disk quota exceeded (os error 122)")
    assert io.is_out_of_space(full) and io.is_out_of_space(quota)
    assert not io.is_out_of_space(SafetensorError("Error while serializing: I/O error: (os error 5)"))
    with pytest.raises(OutOfSpace, match="^disk quota exceeded writing x "):
        with io.space_guard("/nowhere/f", 1, "x"):
            raise quota


def test_ensure_space_refuses_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "free_bytes", lambda path: 1000)
    io.ensure_space(tmp_path / "f", 900, margin=100)
    with pytest.raises(
        OutOfSpace,
        match=r"^not enough free space to write .*f: it needs 901 bytes plus a margin "
        r"of 100 bytes, 1000 bytes free there; nothing was written",
    ):
        io.ensure_space(tmp_path / "f", 901, margin=100)


# ----------------------------------------------------------------------------
# Checkpoints


class Tiny(torch.nn.Module):
    def __init__(self, n=32):
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(n, dtype=torch.float32))


def save(ckpt_dir, step, net, **kw):
    opt = torch.optim.Adam(net.parameters())
    net.w.grad = torch.ones_like(net.w)
    opt.step()
    return ckpt.save_checkpoint(
        ckpt_dir,
        ckpt.step_dir_name(step),
        net=net,
        ema=net,
        optimizer=opt,
        rng={"gen.0": torch.zeros(8, dtype=torch.uint8)},
        state={"step": step},
        **kw,
    )


def safetensors_full_after(n):
    real, calls = ckpt.save_file, []

    def save_file(tensors, path):
        calls.append(path)
        if len(calls) > n:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(tensors, path)

    return save_file


# Each of the four safetensors files, state.json in the temporary folder, then latest.json after the rename.
FAILURES = [("safetensors", n) for n in range(4)] + [("json", 0), ("json", 1)]


@pytest.mark.parametrize("writer,n", FAILURES)
def test_a_checkpoint_that_fills_the_disk_leaves_the_previous_one(tmp_path, monkeypatch, writer, n):
    net = Tiny()
    save(tmp_path, 1, net)
    before = {f: (tmp_path / "step-0000001" / f).read_bytes() for f in os.listdir(tmp_path / "step-0000001")}
    if writer == "safetensors":
        monkeypatch.setattr(ckpt, "save_file", safetensors_full_after(n))
    else:
        monkeypatch.setattr(io, "write_bytes", full_after(n))
    with pytest.raises(OutOfSpace) as err:
        save(tmp_path, 2, net, what="checkpoint step-0000002 of run tiny")
    message = str(err.value)
    needed = 4 * 32 * 4 + 4 + 8  # model, EMA, Adam's two moments and step, the generator state
    assert message.startswith(
        "no space left on device writing checkpoint step-0000002 of run tiny "
        f"({tmp_path / 'step-0000002'}): it needs {needed} bytes, "
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no .tmp-* folder, no .*.tmp file
    assert {f: (tmp_path / "step-0000001" / f).read_bytes() for f in before} == before
    latest = ckpt.latest_checkpoint(tmp_path)  # also when latest.json failed after step-0000002's rename
    assert latest.name == "step-0000001"
    ckpt.load_weights(latest, "raw")  # complete, its checksums match


def test_a_checkpoint_too_large_for_the_free_space_is_refused_before_it_starts(tmp_path, monkeypatch):
    net = Tiny()
    save(tmp_path, 1, net)
    used = listing(tmp_path)
    monkeypatch.setattr(io, "free_bytes", lambda path: 5000)
    with pytest.raises(
        OutOfSpace,
        match=r"^not enough free space to write checkpoint step-0000002 \(.*step-0000002\)"
        r": it needs 524 bytes plus a margin of 1.0 MiB, 4.9 KiB free there; "
        r"nothing was written and what was saved before is intact",
    ):
        save(tmp_path, 2, net)
    assert listing(tmp_path) == used


def test_a_save_removes_what_an_interrupted_save_left(tmp_path):
    (tmp_path / ".tmp-step-0000005").mkdir(parents=True)
    (tmp_path / ".tmp-step-0000005" / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / ".latest.json.abc.tmp").write_text("{")
    save(tmp_path, 1, Tiny())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_final_publishing_and_imported_weights_fill_the_disk_cleanly(tmp_path, monkeypatch):
    net = Tiny()
    save(tmp_path, 1, net)
    monkeypatch.setattr(io, "write_bytes", full_after(0))
    with pytest.raises(OutOfSpace, match=r"writing the final checkpoint \(from step-0000001\)"):
        ckpt.publish_final(tmp_path, "step-0000001")
    monkeypatch.setattr(io, "write_bytes", full_after(0))
    with pytest.raises(OutOfSpace, match=r"writing the imported weights"):
        ckpt.write_final(tmp_path, {"raw": net.state_dict(), "ema": net.state_dict()}, {"step": 0})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------
# The other writers


def test_a_post_hoc_ema_snapshot_names_itself(tmp_path, monkeypatch):
    profiles = phema.PowerEMA(Tiny(), [0.05])
    monkeypatch.setattr(io, "write_bytes", full_after(0))
    with pytest.raises(OutOfSpace, match=r"writing the post-hoc EMA snapshot of step 7 \(.*phema-0000007"):
        phema.save_snapshot(tmp_path, profiles, 7, 56)
    assert listing(tmp_path) == []


def test_a_metrics_append_on_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    jsonl.append_jsonl(path, {"step": 1})
    monkeypatch.setattr(jsonl, "write_bytes", enospc)
    with pytest.raises(OutOfSpace, match=r"writing a record of metrics.jsonl \(.*metrics.jsonl\): it needs 12 bytes"):
        jsonl.append_jsonl(path, {"step": 2})
    assert jsonl.read_jsonl(path) == [{"step": 1}]


def test_the_lock_file_on_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "write_bytes", enospc)
    with pytest.raises(OutOfSpace, match=r"writing the lock file \(.*\.lock\)"):
        runlock.acquire(tmp_path / ".lock", "train tiny")
    assert listing(tmp_path) == []


# ----------------------------------------------------------------------------
# Through the CLI: a full disk at the second checkpoint, then the same command again


def final_digests(results):
    final = results / "runs" / RUN / "checkpoints" / "final"
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(final.glob("*.safetensors"))}


def train_args(params_path):
    return ["train", "--params", str(params_path), "--run", RUN, "--quiet", "--no-tracking"]


FULL_AT_SECOND_CHECKPOINT = """
import errno, os, sys
import alphaflow.io as io
real = io.write_bytes
def write_bytes(f, data):
    if ".tmp-step-0000004" in str(f.name):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real(f, data)
io.write_bytes = write_bytes
from alphaflow.cli import main
sys.exit(main(sys.argv[1:]))
"""


STEPS = {"steps": 8, "phema_every": 3}  # checkpoints at 2, 4, 6, 8; post-hoc EMA snapshots at 3, 6, 8


@pytest.fixture(scope="module")
def undisturbed(tiny_latents, tmp_path_factory):
    """(sha256 of the final weights, bytes of the final checkpoint) of the tiny run trained without a fault."""
    base = tmp_path_factory.mktemp("undisturbed")
    results = base / "results"
    shutil.copytree(tiny_latents / "results", results)
    params_path = base / "params.yaml"
    params_path.write_text(yaml.safe_dump(tiny_params_dict(results, tiny_latents / "images", **STEPS)))
    run_cli(*train_args(params_path))
    final = results / "runs" / RUN / "checkpoints" / "final"
    return final_digests(results), sum(f.stat().st_size for f in final.iterdir())


def assert_stopped_in_one_line(proc, ckpt_dir, start, says):
    """Exit 2 with one `alphaflow:` line starting `start` and saying `says`; no partial files; step 2 kept."""
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line, proc.stderr
    assert line.startswith(start) and says in line and "re-run the same command: it resumes" in line, line
    assert not list(ckpt_dir.glob(".tmp-*")) and not list(ckpt_dir.glob(".*.tmp"))
    assert json.loads((ckpt_dir / "latest.json").read_text())["step"] == 2


def test_a_full_disk_at_the_second_checkpoint_through_the_cli(tiny_project, undisturbed):
    write, results = tiny_project
    params_path, (reference, _) = write(**STEPS), undisturbed
    proc = subprocess.run(
        [sys.executable, "-c", FULL_AT_SECOND_CHECKPOINT, *train_args(params_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )  # the patch lives here, in the test
    ckpt_dir = results / "runs" / RUN / "checkpoints"
    assert_stopped_in_one_line(
        proc,
        ckpt_dir,
        f"alphaflow: no space left on device writing checkpoint step-0000004 "
        f"of run {RUN} ({ckpt_dir / 'step-0000004'}): it needs ",
        "nothing was lost",
    )
    run_cli(*train_args(params_path))
    assert final_digests(results) == reference


# ----------------------------------------------------------------------------
# A real small filesystem (a tmpfs; mounting needs root)


@pytest.fixture
def small_fs(tmp_path):
    """mount(folder, size) mounts a tmpfs of `size` bytes at `folder`; skips where this process cannot mount."""
    mounted = []

    def mount(folder, size, remount=False):
        if shutil.which("mount") is None:
            pytest.skip("no mount command here")
        folder.mkdir(parents=True, exist_ok=True)
        opts = f"{'remount,' if remount else ''}size={size}"
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        if not remount:
            mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", str(folder)], check=False)


def test_a_real_full_disk_during_a_checkpoint(tmp_path, small_fs, monkeypatch):
    disk = small_fs(tmp_path / "disk", 256 * 1024)
    path = disk / "old.bin"
    io.atomic_write_bytes(path, b"1" * 1000)
    with pytest.raises(OutOfSpace, match=r"^no space left on device writing .*big.bin: it needs 1.0 MiB, "):
        io.atomic_write_bytes(disk / "big.bin", b"2" * (1 << 20))
    monkeypatch.setattr(ckpt, "ensure_space", lambda *a: None)  # past the check: safetensors meets the full disk
    with pytest.raises(OutOfSpace) as err:
        save(disk, 1, Tiny(32 * 1024))
    assert isinstance(err.value.__cause__, SafetensorError) and "(os error 28)" in str(err.value.__cause__)
    assert listing(disk) == ["old.bin"] and path.read_bytes() == b"1" * 1000


def test_a_run_on_a_small_filesystem_stops_cleanly_and_resumes_exactly(tiny_project, undisturbed, small_fs):
    write, results = tiny_project
    params_path, (reference, checkpoint) = write(**STEPS), undisturbed
    # Room for the first checkpoint with its margin, not for the second beside it.
    run_dir = small_fs(results / "runs" / RUN, int(1.5 * checkpoint) + ckpt.SPACE_MARGIN + (64 << 10))
    first = run_cli(*train_args(params_path), check=False)
    ckpt_dir = run_dir / "checkpoints"
    assert_stopped_in_one_line(
        first,
        ckpt_dir,
        f"alphaflow: not enough free space to write checkpoint step-0000004 "
        f"of run {RUN} ({ckpt_dir / 'step-0000004'}): it needs ",
        "nothing was written",
    )
    small_fs(run_dir, 64 << 20, remount=True)  # space freed
    run_cli(*train_args(params_path))
    assert final_digests(results) == reference
