"""Cost of one training step per objective, side by side (the fast JVP).

    python benchmarks/step_cost.py --model T/4 --input-size 28 --channels 1 --batch 64      # CPU demo scale
    python benchmarks/step_cost.py --model B/2 --batch 256 --bf16                          # one GPU

Every row is timed in each of `--repeats` rounds (rows interleaved, so a machine that slows down mid-run
slows every row alike); the table gives the median ms/step and the median and range of the per-round
ratio to that round's FM step. MFU counts the useful work of a step as 3× the forward FLOPs (the analytic
count of alphaflow.plan.dit_flops) against the device's dense bf16 peak (BF16_PEAK_TFLOPS, named in the header
and the JSON). `--budget-s` stops starting new rounds once that many seconds have passed (at least one round
runs), so a time-boxed run still writes its table.

The table is also written as Markdown and JSON to `--out` (default benchmarks/results/), one file pair
per device, model, batch and dtype; `alphaflow plan` reads the JSON's measured step costs.
"""

import argparse
import contextlib
import datetime
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from alphaflow.io import atomic_write_text
from alphaflow.models import PRESETS, build_model
from alphaflow.objectives import alpha_flow_loss, sample_times
from alphaflow.plan import dit_flops
from official_meanflow import official_meanflow_loss  # benchmarks/ is on sys.path when run as a script

# Dense (no sparsity) bf16 tensor-core peaks of the vendors' spec sheets, TFLOP/s; the first name the GPU's
# contains is used (H100/H200: the SXM parts).
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
TARGETS = {"alphaflow": 1.20, "meanflow": 1.25, "official_speedup": 1.4}
FM_RATIO = 0.5  # r = t share of the α-Flow and MeanFlow rows (the paper's α-Flow ratio is 0.25–0.5)

# (label, objective, jvp_mode, cfg): objective ∈ forward | fm | alphaflow | meanflow | official
ROWS = [
    ("forward (no grad)", "forward", None, False),
    ("FM step", "fm", None, False),
    ("α-Flow step (α=½, 50% r≠t)", "alphaflow", None, False),
    ("MeanFlow step, tangent pass (default)", "meanflow", "tangent", False),
    ("MeanFlow step, torch.func.jvp split", "meanflow", "split", False),
    ("MeanFlow step, torch.func.jvp fused", "meanflow", "fused", False),
    ("MeanFlow, official formulation (autograd.functional.jvp)", "official", None, False),
]
CFG_ROWS = [
    ("FM step + CFG teachers", "fm", None, True),
    ("α-Flow step + CFG teachers", "alphaflow", None, True),
    ("MeanFlow step + CFG teachers", "meanflow", "tangent", True),
]
COMPILED_ROWS = [  # torch.compile(net): the params option train.compile
    ("FM step, compiled", "fm", None, False),
    ("α-Flow step, compiled", "alphaflow", None, False),
    ("MeanFlow step, tangent pass, compiled", "meanflow", "tangent", False),
]


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def device_peak(device):
    """(name, dense bf16 peak TFLOP/s) of a known GPU, else (None, None): MFU is then n/a."""
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    return next(((k, v) for k, v in BF16_PEAK_TFLOPS.items() if k in name), (None, None))


def make_step(objective, net, opt, x, y, noise, autocast, jvp_mode=None, cfg=False):
    """Returns a closure running one optimiser step of the given objective."""
    alpha = {"fm": 1.0, "alphaflow": 0.5, "meanflow": 0.0, "official": 0.0}.get(objective)
    fm_ratio = 1.0 if objective == "fm" else FM_RATIO
    guidance = dict(omega=0.2, kappa=0.92, cfg_interval=(0.0, 0.75), null_label=net.null_label) if cfg else {}
    gen = torch.Generator(x.device).manual_seed(0)

    def step():
        with autocast():
            if objective == "forward":
                with torch.no_grad():
                    t = torch.rand(x.shape[0], device=x.device, generator=gen)
                    return net(noise, t, t, y)
            t, r = sample_times(x.shape[0], fm_ratio, generator=gen)
            if objective == "official":
                loss = official_meanflow_loss(net, x, y, t, r, noise)
            else:
                loss = alpha_flow_loss(net, x, y, t, r, noise, alpha, jvp_mode=jvp_mode or "tangent", **guidance).loss
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step, device, iters):
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


def failure(err):
    return f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"


def measure(rows, steps, device, args):
    """Times every row in each round; a row that fails (OOM, an op's dtype) is recorded and skipped after."""
    results = {label: {"seconds": [], "peak_gib": None, "error": None} for label, *_ in rows}
    start, budget = time.perf_counter(), getattr(args, "budget_s", None)
    for round_ in range(args.repeats):
        if round_ and budget and time.perf_counter() - start > budget:
            print(f"time budget of {budget:.0f} s spent: {round_} of {args.repeats} rounds", flush=True)
            break
        for label, *_ in rows:
            res = results[label]
            if res["error"]:
                continue
            try:
                if round_ == 0:
                    for _ in range(args.warmup):
                        steps[label]()
                sec, peak = timed(steps[label], device, args.iters)
            except (RuntimeError, torch.OutOfMemoryError, NotImplementedError) as err:
                res["error"] = failure(err)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            res["seconds"].append(sec)
            res["peak_gib"] = peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return results


def summarise(rows, results, batch, flops_img, peak_tflops):
    """One dict per row: median ms, ratio to the FM step of the same round (median, range), MFU."""
    fm = results["FM step"]["seconds"]
    out = []
    for label, objective, jvp_mode, cfg in rows:
        res = results[label]
        row = {
            "label": label,
            "objective": objective,
            "jvp_mode": jvp_mode,
            "cfg": cfg,
            "compiled": "compiled" in label,
            "error": res["error"],
        }
        secs = res["seconds"]
        if secs:
            med = statistics.median(secs)
            ratios = [s / f for s, f in zip(secs, fm)] if fm else []
            work = (1 if objective == "forward" else 3) * flops_img * batch
            row.update(
                ms=1e3 * med,
                ms_all=[1e3 * s for s in secs],
                images_per_s=batch / med,
                ratio_fm=statistics.median(ratios) if ratios else None,
                ratio_fm_range=[min(ratios), max(ratios)] if ratios else None,
                peak_gib=res["peak_gib"],
                mfu=work / med / (peak_tflops * 1e12) if peak_tflops else None,
            )
        out.append(row)
    return out


def markdown(header, table, targets):
    lines = [
        header,
        "",
        "| step | ms/step | images/s | × FM step (median, range) | peak GiB | MFU |",
        "|---|---|---|---|---|---|",
    ]
    for row in table:
        if "ms" not in row:
            lines.append(f"| {row['label']} | failed: {row['error']} | | | | |")
            continue
        ratio = (
            f"{row['ratio_fm']:.2f} ({row['ratio_fm_range'][0]:.2f}–{row['ratio_fm_range'][1]:.2f})"
            if row["ratio_fm"] is not None
            else "—"
        )
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        lines.append(
            f"| {row['label']} | {row['ms']:.1f} | {row['images_per_s']:.1f} | {ratio} | "
            f"{row['peak_gib']:.2f} | {mfu} |"
        )
    lines += ["", *targets]
    return "\n".join(lines)


def target_lines(table):
    by = {(r["objective"], r["jvp_mode"], r["cfg"], r["compiled"]): r for r in table}
    nan = float("nan")
    get = lambda key, field="ratio_fm": (by.get(key) or {}).get(field) or nan
    mf, af = get(("meanflow", "tangent", False, False)), get(("alphaflow", None, False, False))
    official = get(("official", None, False, False), "ms") / get(("meanflow", "tangent", False, False), "ms")
    split = get(("meanflow", "split", False, False), "ms") / get(("meanflow", "tangent", False, False), "ms")
    verdict = lambda ok: "met" if ok else "missed"
    return [
        f"- α-Flow / FM step: {af:.2f} (target ≤ {TARGETS['alphaflow']:.2f}: {verdict(af <= TARGETS['alphaflow'])})",
        f"- MeanFlow (tangent pass) / FM step: {mf:.2f} "
        f"(target ≤ {TARGETS['meanflow']:.2f}: {verdict(mf <= TARGETS['meanflow'])})",
        f"- speed-up over the official formulation: {official:.2f}× (target ≥ {TARGETS['official_speedup']:.1f}×: "
        f"{verdict(official >= TARGETS['official_speedup'])}); over torch.func.jvp split: {split:.2f}×",
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="T/4", choices=sorted(PRESETS))
    ap.add_argument("--input-size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads; default: torch's)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5, help="steps per row and round")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; medians over rounds")
    ap.add_argument("--no-cfg", action="store_true", help="skip the CFG-teacher rows")
    ap.add_argument("--compile", action="store_true", help="add torch.compile'd rows (train.compile)")
    ap.add_argument("--only", nargs="*", default=None, help="objectives to time (default: all rows)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new round after this many seconds")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="folder for the .md/.json tables ('' = do not write)",
    )
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    net = build_model(
        args.model, num_classes=args.num_classes, input_size=args.input_size, in_channels=args.channels
    ).to(device)
    with torch.no_grad():  # non-zero outputs so every branch does real work
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.95))
    shape = (args.batch, args.channels, args.input_size, args.input_size)
    x, noise = torch.randn(shape, device=device), torch.randn(shape, device=device)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)
    dtype = "bf16" if args.bf16 else "fp32"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    flops_img = dit_flops(args.model, args.input_size, args.channels)
    peak_name, peak_tflops = device_peak(device)

    rows = ROWS + ([] if args.no_cfg else CFG_ROWS)
    if args.only:
        rows = [row for row in rows if row[1] in args.only or row[1] == "fm"]
    steps = {label: make_step(obj, net, opt, x, y, noise, autocast, mode, cfg) for label, obj, mode, cfg in rows}
    if args.compile:
        compiled = torch.compile(net)
        rows = rows + COMPILED_ROWS
        steps.update(
            {
                label: make_step(obj, compiled, opt, x, y, noise, autocast, mode, cfg)
                for label, obj, mode, cfg in COMPILED_ROWS
            }
        )

    n_params = sum(p.numel() for p in net.parameters())
    header = (
        f"DiT {args.model} ({n_params / 1e6:.1f}M params), batch {args.batch}, input {list(shape[1:])}, "
        f"{device_name(device)} {dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{flops_img / 1e9:.3f} GFLOP/img forward (analytic), "
        f"MFU against {f'the {peak_name} dense bf16 peak, {peak_tflops:.0f} TFLOP/s' if peak_name else 'n/a'}, "
        f"{args.repeats} rounds × {args.iters} steps, "
        f"{datetime.date.today().isoformat()}"
    )
    print(header, flush=True)
    results = measure(rows, steps, device, args)
    table = summarise(rows, results, args.batch, flops_img, peak_tflops)
    text = markdown(header, table, target_lines(table))
    print(text.split("\n", 1)[1])
    if str(args.out):
        args.out.mkdir(parents=True, exist_ok=True)
        threads = f"-t{torch.get_num_threads()}" if device.type == "cpu" else ""
        stem = f"{device.type}-{args.model.replace('/', '')}-b{args.batch}-{dtype}{threads}"
        record = {
            "device": device_name(device),
            "device_type": device.type,
            "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            "model": args.model,
            "params": n_params,
            "batch": args.batch,
            "input": list(shape[1:]),
            "dtype": dtype,
            "threads": torch.get_num_threads(),
            "fm_ratio": FM_RATIO,
            "forward_flops_per_image": flops_img,
            "flops": "analytic (alphaflow.plan.dit_flops)",
            "peak_tflops": peak_tflops,
            "peak": f"{peak_name} dense bf16" if peak_name else None,
            "repeats": args.repeats,
            "iters": args.iters,
            "rows": table,
        }
        for suffix, content in ((".md", text + "\n"), (".json", json.dumps(record, indent=1) + "\n")):
            atomic_write_text(args.out / f"{stem}{suffix}", content)
        print(f"\nwrote {args.out / stem}.md and .json")


if __name__ == "__main__":
    main()
