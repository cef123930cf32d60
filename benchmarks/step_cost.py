"""Cost of one training step per objective, side by side (issue: α-Flow engine, GPU performance).

    python benchmarks/step_cost.py --model T/4 --input-size 28 --channels 1 --batch 64      # CPU demo scale
    python benchmarks/step_cost.py --model B/2 --batch 256 --bf16                          # one GPU

Prints ms/step, images/s, the ratio to the flow-matching step, peak memory and (CUDA) MFU against
the device's dense bf16 peak. MFU counts the useful work of a step as 3× the forward FLOPs (measured
with torch.utils.flop_counter on one forward), the convention of the GPU-performance issue.
"""

import argparse
import contextlib
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from alphaflow.models import PRESETS, build_model
from alphaflow.objectives import alpha_flow_loss, sample_times
from official_meanflow import official_meanflow_loss  # benchmarks/ is on sys.path when run as a script

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def device_peak_tflops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def forward_flops(net, z, y):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        t = torch.full((z.shape[0],), 0.5, device=z.device)
        net(z, t * 0.5, t, y)
    return counter.get_total_flops() / z.shape[0]


def make_step(kind, net, opt, x, y, noise, autocast, jvp_mode="split", cfg=False):
    """Returns a closure running one optimiser step of the given objective."""
    settings = {
        "forward": None,
        "fm": dict(alpha=1.0, fm_ratio=1.0),
        "alphaflow": dict(alpha=0.5, fm_ratio=0.5),
        "meanflow": dict(alpha=0.0, fm_ratio=0.5),
        "official": dict(alpha=0.0, fm_ratio=0.5),
    }[kind]
    guidance = dict(omega=0.2, kappa=0.92, cfg_interval=(0.0, 0.75), null_label=net.null_label) if cfg else {}
    gen = torch.Generator(x.device).manual_seed(0)

    def step():
        with autocast():
            if settings is None:
                with torch.no_grad():
                    t = torch.rand(x.shape[0], device=x.device, generator=gen)
                    return net(noise, t, t, y)
            t, r = sample_times(x.shape[0], settings["fm_ratio"], generator=gen)
            if kind == "official":
                loss = official_meanflow_loss(net, x, y, t, r, noise)
            else:
                loss = alpha_flow_loss(net, x, y, t, r, noise, settings["alpha"], jvp_mode=jvp_mode, **guidance).loss
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step, device, warmup, iters):
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="T/4", choices=sorted(PRESETS))
    ap.add_argument("--input-size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--no-cfg", action="store_true", help="skip the CFG-teacher rows")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    net = build_model(args.model, num_classes=args.num_classes, input_size=args.input_size,
                      in_channels=args.channels).to(device)
    with torch.no_grad():  # non-zero outputs so every branch does real work
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.95))
    shape = (args.batch, args.channels, args.input_size, args.input_size)
    x, noise = torch.randn(shape, device=device), torch.randn(shape, device=device)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    flops_img = forward_flops(net, x[:1], y[:1])
    peak_tflops = device_peak_tflops(device)

    rows = [("forward (no grad)", "forward", "split", False), ("FM step", "fm", "split", False),
            ("α-Flow step (α=½, 50% r≠t)", "alphaflow", "split", False),
            ("MeanFlow JVP step, split", "meanflow", "split", False),
            ("MeanFlow JVP step, fused", "meanflow", "fused", False),
            ("MeanFlow, official formulation (autograd.functional.jvp)", "official", "split", False)]
    if not args.no_cfg:
        rows += [("FM step + CFG teachers", "fm", "split", True),
                 ("α-Flow step + CFG teachers", "alphaflow", "split", True),
                 ("MeanFlow step + CFG teachers", "meanflow", "split", True)]

    n_params = sum(p.numel() for p in net.parameters())
    print(f"# {args.model} ({n_params / 1e6:.1f}M params), batch {args.batch}, input {shape[1:]}, "
          f"device {device} {'bf16' if args.bf16 else 'fp32'}, torch {torch.__version__}, "
          f"{flops_img / 1e9:.3f} GFLOP/img forward, threads {torch.get_num_threads()}")
    print(f"| step | ms/step | images/s | × FM step | peak GiB | MFU |")
    print(f"|---|---|---|---|---|---|")
    fm_ms, ms_of = None, {}
    for label, kind, jvp_mode, cfg in rows:
        step = make_step(kind, net, opt, x, y, noise, autocast, jvp_mode=jvp_mode, cfg=cfg)
        try:
            sec, peak = timed(step, device, args.warmup, args.iters)
        except (RuntimeError, torch.OutOfMemoryError) as err:  # one row failing (OOM, an op's dtype) keeps the rest
            print(f"| {label} | failed: {type(err).__name__}: {str(err).splitlines()[0][:120]} | | | | |", flush=True)
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        ms = 1e3 * sec
        if kind == "fm" and not cfg:
            fm_ms = ms
        ms_of[(kind, jvp_mode, cfg)] = ms
        ratio = f"{ms / fm_ms:.2f}" if fm_ms else "—"
        work = (1 if kind == "forward" else 3) * flops_img * args.batch
        mfu = f"{100 * work / sec / (peak_tflops * 1e12):.1f}%" if peak_tflops else "n/a"
        mem = f"{peak:.2f}" if peak is not None else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} (RSS)"
        print(f"| {label} | {ms:.1f} | {args.batch / sec:.1f} | {ratio} | {mem} | {mfu} |", flush=True)

    # The GPU-performance targets, as ratios measured in this one run.
    nan = float("nan")
    best_mf = min([ms_of[("meanflow", m, False)] for m in ("split", "fused") if ("meanflow", m, False) in ms_of] or [nan])
    print(f"\nα-Flow / FM step: {ms_of.get(('alphaflow', 'split', False), nan) / fm_ms:.2f} (target ≤ 1.20)")
    print(f"MeanFlow / FM step: {best_mf / fm_ms:.2f} (target ≤ 1.35)")
    print(f"speed-up over the official formulation: {ms_of.get(('official', 'split', False), nan) / best_mf:.2f}× "
          f"(target ≥ 1.5×)")


if __name__ == "__main__":
    main()
