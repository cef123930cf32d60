"""A short α-Flow training through the CLI on synthetic data, stopped half-way and resumed (the GPU suite's check
that training runs end to end on a device: bf16 autocast on CUDA, as `alphaflow train` always trains there).

    python benchmarks/train_check.py --device cuda --model B/2 --steps 200 --out /tmp/train-check   # one GPU
    python benchmarks/train_check.py --device cpu --tiny --out /tmp/train-check                     # CPU smoke

Writes class-structured random images (class k: a bright square in quadrant k on noise) and a profile (identity
encoder, so the latents are the images: 3 × size × size), then runs `alphaflow prepare`, `encode`,
`train --stop-after steps/2` and `train` again, which resumes from the half-way checkpoint and finishes. Checks
that the second call resumed, that every logged loss is finite and that the run reached its last step; prints one
line per check and writes train-check.json to `--out`. Exit status 1 if a check failed.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_images(folder, classes, per_class, size, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(classes):
        d = Path(folder) / f"class{k}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            r0, c0 = (k // 2 % 2) * size // 2, (k % 2) * size // 2
            img[r0 : r0 + size // 2, c0 : c0 + size // 2] = 200 + rng.integers(0, 55)
            Image.fromarray(img).save(d / f"img{i}.png")


def profile(out, args):
    steps, half = args.steps, args.steps // 2
    return {
        "profile": "train-check",
        "seed": 0,
        "results": str(out / "results"),
        "tracking_uri": None,
        "executor": "none",
        "device": args.device,
        "data": {
            "name": "synthetic",
            "source": "folder",
            "path": str(out / "images"),
            "resolution": args.size,
            "workers": 1,
        },
        "encoder": {"kind": "identity", "batch_size": 256, "parts": 1},
        "defaults": {
            "model": args.model,
            **({"model_overrides": {"depth": 1, "hidden_size": 32, "num_heads": 2}} if args.tiny else {}),
            "steps": steps,
            "batch_size": args.batch,
            "lr": 1e-4,
            "warmup_steps": steps // 10,
            "ema_halflife": steps // 4,
            "ema_rampup": 0.5,
            "fm_ratio": 0.5,
            "alpha_start": steps // 4,
            "alpha_end": 3 * steps // 4,
            "stats_samples": 64,
            "log_every": max(steps // 20, 1),
            "checkpoint_every": half,
            "snapshot_every": steps * 10,
            "conflict_every": None,
            "seed": 1,
        },
        "runs": {"alphaflow": {"method": "alphaflow"}},
        "eval": {
            "num_samples": 16,
            "batch_size": 16,
            "labels": "balanced",
            "weights": ["ema"],
            "samplers": [{"name": "1nfe", "mode": "ode", "t_steps": [1.0, 0.0]}],
            "metrics": ["fd_classifier"],
            "n_boot": 10,
            "classifier_epochs": 1,
            "ref_samples": 16,
        },
    }


def cli(*argv, env):
    """One `python -m alphaflow` call: (return code, seconds, output)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "alphaflow", *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    return proc.returncode, time.perf_counter() - t0, proc.stdout + proc.stderr


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="B/2")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32, help="image (= latent) size")
    ap.add_argument("--tiny", action="store_true", help="a 1-block, 32-wide model at 8 px, 8 steps (CPU smoke)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.tiny:
        args.model, args.steps, args.batch, args.size = "T/2", 8, 8, 8
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_images(out / "images", classes=4, per_class=max(args.batch, 16), size=args.size)
    params = out / "params.yaml"
    params.write_text(yaml.safe_dump(profile(out, args), sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}

    report = {
        "kind": "train-check",
        "model": args.model,
        "steps": args.steps,
        "batch": args.batch,
        "device": args.device,
        "calls": {},
        "checks": {},
    }
    train = ["train", "--run", "alphaflow", "--no-tracking"]
    calls = [
        ("prepare", ["prepare"]),
        ("encode", ["encode"]),
        ("train-first-half", [*train, "--stop-after", str(args.steps // 2)]),
        ("train-resumed", train),
    ]
    logs = {}
    for name, call in calls:
        quiet = [] if call[0] == "train" else ["--quiet"]  # train --quiet would not say that it resumed
        code, seconds, text = cli(*call, "--params", str(params), *quiet, env=env)
        logs[name] = text
        report["calls"][name] = {"returncode": code, "seconds": round(seconds, 1)}
        print(f"  {name:18s} exit {code} in {seconds:6.1f} s", flush=True)
        if code:
            print(text[-2000:], flush=True)
            break
    run_dir = out / "results" / "runs" / "alphaflow"
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    losses = [r["loss"] for r in records if "loss" in r]
    report["checks"] = {
        "every call succeeded": all(c["returncode"] == 0 for c in report["calls"].values())
        and len(report["calls"]) == len(calls),
        "the second call resumed": f"(step {args.steps // 2} of {args.steps})" in logs.get("train-resumed", ""),
        "every logged loss is finite": bool(losses) and all(math.isfinite(v) for v in losses),
        "the run reached its last step": bool(records) and records[-1]["step"] == args.steps,
        "each step was logged once": [r["step"] for r in records] == sorted({r["step"] for r in records}),
        "the final checkpoint exists": (run_dir / "checkpoints" / "final" / "state.json").is_file(),
    }
    report["losses"] = {
        "first": losses[0] if losses else None,
        "last": losses[-1] if losses else None,
        "logged": len(losses),
    }
    steps_per_s = [r["images_per_s"] / args.batch for r in records if "images_per_s" in r]
    report["steps_per_s_median"] = float(np.median(steps_per_s)) if steps_per_s else None
    for check, ok in report["checks"].items():
        print(f"  {'ok ' if ok else 'FAILED'} {check}", flush=True)
    (out / "train-check.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
