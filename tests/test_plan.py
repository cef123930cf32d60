"""`alphaflow plan`: the curriculum's step mix, the FLOP scaling and the cost arithmetic."""

import json
from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from alphaflow.config import load_params
from alphaflow.models import build_model
from alphaflow.plan import dit_flops, plan, step_mix
from helpers import ROOT, run_cli


def test_step_mix_counts_the_curriculum_like_training_does():
    params = load_params(ROOT / "params" / "default.yaml")
    for name in params.run_names:
        run = params.run(name)
        for variant in (run, replace(run, discrete_only=True), replace(run, alpha_start=500, alpha_end=900)):
            brute = {"fm": 0, "alphaflow": 0, "meanflow": 0}
            for step in range(variant.steps):
                a = variant.alpha(step)
                brute["fm" if a == 1.0 else "meanflow" if a == 0.0 else "alphaflow"] += 1
            assert step_mix(variant) == brute, (name, variant.discrete_only)


@pytest.mark.parametrize("name, size, channels", [("T/4", 28, 1), ("S/2", 32, 4), ("N/7", 28, 1)])
def test_dit_flops_is_close_to_the_counted_forward(name, size, channels):
    net = build_model(name, num_classes=10, input_size=size, in_channels=channels)
    # On the math attention path the counter sees the attention products too (it has no rule for CPU flash).
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        t = torch.full((1,), 0.5)
        net(torch.zeros(1, channels, size, size), t * 0.5, t, torch.zeros(1, dtype=torch.long))
    assert dit_flops(name, size, channels) == pytest.approx(counter.get_total_flops(), rel=0.01)


def bench_record(model="T/4", batch=64, fm=100.0, alphaflow=120.0, meanflow=130.0, forward=30.0):
    rows = [
        {"objective": "forward", "jvp_mode": None, "cfg": False, "ms": forward},
        {"objective": "fm", "jvp_mode": None, "cfg": False, "ms": fm},
        {"objective": "alphaflow", "jvp_mode": None, "cfg": False, "ms": alphaflow},
        {"objective": "meanflow", "jvp_mode": "tangent", "cfg": False, "ms": meanflow},
    ]
    return {
        "device": "cpu (x86_64)",
        "device_type": "cpu",
        "date": "2026-11-29",
        "model": model,
        "batch": batch,
        "input": [1, 28, 28],
        "dtype": "fp32",
        "threads": 1,
        "forward_flops_per_image": 1.0,
        "rows": rows,
    }


def test_plan_arithmetic_on_the_demo_profile(tmp_path):
    (tmp_path / "cpu-T4-b64-fp32-t1.json").write_text(json.dumps(bench_record()))
    params = load_params(ROOT / "params" / "default.yaml")
    rows, notes = plan(params, device_type="cpu", threads=1, bench_dir=tmp_path)
    by = {r["run"]: r for r in rows}
    # meanflow-T-4: 450 MeanFlow steps at 25 % r ≠ t: 100 ms + (130 − 100) · 0.25 / 0.5 = 115 ms each.
    assert by["meanflow-T-4"]["train_device_h"] * 3600 == pytest.approx(450 * 0.115)
    # alphaflow-T-4 (50 % r ≠ t): FM 100 ms, α-Flow 120 ms, MeanFlow 130 ms per step.
    mix = step_mix(params.run("alphaflow-T-4"))
    assert by["alphaflow-T-4"]["train_device_h"] * 3600 == pytest.approx(
        (mix["fm"] * 100 + mix["alphaflow"] * 120 + mix["meanflow"] * 130) / 1e3
    )
    assert by["alphaflow-T-4"]["step_cost"] == "measured" and by["alphaflow-N-4"]["step_cost"] == "scaled from T/4"
    ratio = dit_flops("N/4", 28, 1) / dit_flops("T/4", 28, 1)
    assert by["meanflow-N-4"]["train_device_h"] == pytest.approx(by["meanflow-T-4"]["train_device_h"] * ratio)
    # Sampling: ema and raw × (1 + 2) NFE, two post-hoc EMA sets × 1 NFE; 1,000 images × 30 ms / 64 per image.
    assert by["meanflow-T-4"]["sample_device_h"] * 3600 == pytest.approx((2 * 3 + 2 * 1) * 1000 * 30 / 64 / 1e3)
    assert any("2026-11-29" in n for n in notes)


def test_requeues_and_the_short_time_limit_warning(tmp_path):
    (tmp_path / "cpu-T4-b64-fp32-t1.json").write_text(
        json.dumps(bench_record(fm=60_000.0, alphaflow=60_000.0, meanflow=60_000.0))
    )
    d = json.loads(json.dumps(load_params(ROOT / "params" / "default.yaml").raw))
    d["defaults"]["resources"] = {"timeout_min": 60}  # 450 one-minute steps: 7.5 h, checkpoints every 150
    d["results"] = str(tmp_path / "results")
    path = tmp_path / "p.yaml"
    path.write_text(json.dumps(d))
    rows, _ = plan(load_params(path), device_type="cpu", threads=1, bench_dir=tmp_path)
    r = {r["run"]: r for r in rows}["meanflow-T-4"]
    assert r["train_wall_h"] == pytest.approx(7.5) and r["requeues"] == 7
    assert r["warning"] == "time limit shorter than one checkpoint interval"  # 150 steps = 2.5 h > 1 h


def test_no_measurement_for_the_device_is_a_clear_error(tmp_path):
    (tmp_path / "cpu-T4-b64-fp32-t1.json").write_text(json.dumps(bench_record()))
    with pytest.raises(LookupError, match=r"measured: cpu.*Pass --gpu with a measured name.*step_cost.py there first"):
        plan(load_params(ROOT / "params" / "default.yaml"), device_type="cuda", gpu="H100", bench_dir=tmp_path)
    # through the CLI: one line and exit 2, no traceback (a GPU whose step costs are not measured yet)
    proc = run_cli("plan", "--params", "params/default.yaml", "--gpu", "H100", "--bench", tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("alphaflow: no step-cost measurement for device 'cuda' H100 bf16; measured: cpu")


def test_plan_command_prints_the_paper_profile_totals():
    out = run_cli("plan", "--params", "params/paper.yaml", "--gpu", "H200").stdout
    assert "| alphaflow-XL-2-cfg | XL/2 |" in out and "device-hours of training" in out


def test_the_measurement_at_the_runs_batch_is_preferred():
    from alphaflow.plan import pick_measurement

    records = [
        {"device_type": "cpu", "dtype": "fp32", "device": "cpu", "threads": 1, "model": "N/7", "batch": b}
        for b in (32, 64)
    ] + [{"device_type": "cpu", "dtype": "fp32", "device": "cpu", "threads": 1, "model": "T/4", "batch": 128}]
    assert pick_measurement(records, "cpu", "N/7", "fp32", batch=32)[0]["batch"] == 32
    assert pick_measurement(records, "cpu", "N/7", "fp32", batch=16)[0]["batch"] == 64  # the largest measured
    assert pick_measurement(records, "cpu", "S/2", "fp32", batch=32) == (records[2], "scaled from T/4")


def test_plan_prices_the_hardware_the_profile_asks_for():
    """No --gpu, no --device: the paper profile (8 GPUs per run) is priced on a measured GPU, not this CPU."""
    from alphaflow.plan import profile_device

    assert profile_device(load_params(ROOT / "params" / "paper.yaml")) == "cuda"
    assert profile_device(load_params(ROOT / "params" / "released.yaml")) == "cuda"  # imports on CPU, sampling on GPUs
    assert profile_device(load_params(ROOT / "params" / "default.yaml")) == "cpu"
    out = run_cli("plan", "--params", "params/paper.yaml").stdout
    assert out.startswith("Cost plan on cuda") and "step costs: NVIDIA H200 bf16" in out
    assert "time limit shorter than one checkpoint interval" not in out
    cpu = run_cli("plan", "--params", "params/paper.yaml", "--device", "cpu").stdout
    assert cpu.startswith("Cost plan on cpu")


def eval_record(device="cpu (1 threads)", device_type="cpu", threads=1, **ips):
    rows = [
        {"name": name, "images_per_s": v, **({"resolution": 128} if name == "sd-vae-decode" else {})}
        for name, v in ips.items()
    ]
    return {
        "kind": "eval-throughput",
        "device": device,
        "device_type": device_type,
        "threads": threads,
        "date": "2026-12-01",
        "rows": rows,
    }


def test_plan_counts_evaluation_from_measured_throughputs(tmp_path):
    (tmp_path / "cpu-T4-b64-fp32-t1.json").write_text(json.dumps(bench_record()))
    (tmp_path / "eval-cpu-t1.json").write_text(json.dumps(eval_record(classifier=1000.0, inception=4.0)))
    params = load_params(ROOT / "params" / "default.yaml")
    rows, notes = plan(params, device_type="cpu", threads=1, bench_dir=tmp_path)
    r = {r["run"]: r for r in rows}["meanflow-T-4"]
    # Six weights × sampler sets (ema, raw × 2 samplers; two post-hoc EMAs × 1 NFE): the classifier scores
    # 1,000 images of each; the Inception only the two EMA sets (slow_metric_weights), 20 images each (fid_samples).
    assert r["metrics_device_h"] * 3600 == pytest.approx(6 * 1000 / 1000.0 + 2 * 20 / 4.0)
    assert r["decode_device_h"] == 0.0 and r["eval_unmeasured"] == []  # pixel space: nothing to decode
    assert "FID Inception-v3: 4.0 images/s on cpu (1 threads), 2026-12-01" in notes
    assert not any("not measured" in n for n in notes)


def test_an_unmeasured_throughput_is_one_line_not_a_number(tmp_path):
    """The released profile decodes with the SD-VAE and scores with Inception, DINOv2 and CLIP; only DINOv2 and the
    VAE (at 128 px: 256 px costs 4× per image) are measured on this GPU."""
    gpu = {
        **bench_record(model="B/2"),
        "device": "NVIDIA H200",
        "device_type": "cuda",
        "dtype": "bf16",
        "input": [4, 32, 32],
    }
    (tmp_path / "cuda-B2-b64-bf16.json").write_text(json.dumps(gpu))
    (tmp_path / "eval-cuda-nvidia-h200.json").write_text(
        json.dumps(eval_record("NVIDIA H200", "cuda", None, dinov2=500.0, **{"sd-vae-decode": 400.0}))
    )
    params = load_params(ROOT / "params" / "released.yaml")
    rows, notes = plan(params, device_type="cuda", gpu="H200", bench_dir=tmp_path)
    r = rows[0]
    cells = 2 * 8  # ema, raw × 8 samplers
    assert r["decode_device_h"] * 3600 == pytest.approx(cells * 50_000 * 4 / 400.0)
    assert r["metrics_device_h"] * 3600 == pytest.approx(cells * 50_000 / 500.0)
    assert r["eval_unmeasured"] == ["clip", "inception"]
    missing = [n for n in notes if "not measured" in n]
    assert sorted(missing) == [
        "CLIP ViT-B/32 (FCD): images/s not measured on cuda H200, not counted (measure it with "
        "benchmarks/eval_throughput.py; on a GPU benchmarks/gpu_suite.sh)",
        "FID Inception-v3: images/s not measured on cuda H200, not counted (measure it with "
        "benchmarks/eval_throughput.py; on a GPU benchmarks/gpu_suite.sh)",
    ]
    from alphaflow.plan import format_plan

    table = format_plan(rows, notes, "cuda H200")
    assert f"| {r['run']} | B/2 |" in table and " + not measured |" in table
    decode_h = sum(row["decode_device_h"] for row in rows)
    assert f"{decode_h:,.1f} of SD-VAE decoding and " in table and "of metric networks (+ some not measured)" in table
    # Nothing measured for the device at all: the column says so instead of 0.
    (tmp_path / "eval-cuda-nvidia-h200.json").unlink()
    rows, notes = plan(params, device_type="cuda", gpu="H200", bench_dir=tmp_path)
    table = format_plan(rows, notes, "cuda H200")
    assert "| not measured |" in table and "SD-VAE decoding not measured and metric networks not measured" in table
    assert any(n.startswith("SD-VAE decoding: images/s not measured on cuda H200") for n in notes)


def test_an_empty_bench_folder_is_a_clear_error(tmp_path):
    from alphaflow.plan import NoMeasurementsError

    with pytest.raises(NoMeasurementsError, match=r"no measured tables.*Pass --bench"):
        plan(load_params(ROOT / "params" / "default.yaml"), device_type="cpu", bench_dir=tmp_path)
