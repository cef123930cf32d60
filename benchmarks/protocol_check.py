"""The official evaluation protocol on a device: its noise streams checked, its sampling job timed.

    python benchmarks/protocol_check.py --device cuda --model XL/2 --bf16 --n 1024 --batch 256   # the GPU suite
    python benchmarks/protocol_check.py --device cpu --tiny                                       # --smoke

1. Noise: `sampling.protocol_noise(..., protocol="alphaflow")` on the device against the official code restated
   here: per seed, `torch.Generator(device).manual_seed(seed % 2**32)`, the initial noise its first float32
   `[1, C, H, W]` draw, the consistency sampler's ε′ its next float64 draw. Bit equality is required (on CUDA
   the Philox stream is not the CPU's, so this is checked where it runs).
2. Sampling: `samples.generate` as the released profile's sample stage calls it (eval.protocol alphaflow,
   per-seed generators, bf16 autocast on CUDA, uint8 by truncation) with a random-init network of the preset,
   1 NFE and the 2-NFE consistency sampler; images/s and the time 50,000 images take (decoding apart: the
   SD-VAE has its own row in eval_throughput.py).

Writes protocol-<device>.json and .md to --out; exit 1 when the noise differs.
"""

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alphaflow.data.encoders import IdentityEncoder
from alphaflow.models import build_model
from alphaflow.samples import generate
from alphaflow.sampling import protocol_noise

SEEDS = [0, 1, 7, 49_999, 2**32 + 7]
SAMPLERS = [
    {"name": "1nfe", "mode": "ode", "t_steps": [1.0, 0.0]},
    {"name": "2nfe-cons-0.5", "mode": "consistency", "t_steps": [1.0, 0.5, 0.0]},
]


def official_draws(seed, shape, device):
    """The official generator of one seed: (initial noise float32 [1, *shape], ε′ float64 [1, *shape])."""
    g = torch.Generator(device).manual_seed(seed % 2**32)
    first = torch.randn([1, *shape], generator=g, device=device)
    return first, torch.randn([1, *shape], generator=g, device=device, dtype=torch.float64)


def noise_parity(shape, device):
    noise, fresh = protocol_noise(SEEDS, shape, device=device, protocol="alphaflow")
    second = fresh.randn(shape, dtype=torch.float64)
    ok = True
    for i, seed in enumerate(SEEDS):
        first, eps = official_draws(seed, shape, device)
        ok &= torch.equal(noise[i : i + 1], first) and torch.equal(second[i : i + 1], eps)
    return ok


def timed_generate(net, sampler, n, batch, device, autocast):
    """images/s of samples.generate over seeds 0..n-1 (labels RandomState-free: seed mod classes)."""
    encoder = IdentityEncoder()

    def run():
        for start in range(0, n, batch):
            seeds = list(range(start, min(start + batch, n)))
            generate(
                net,
                encoder,
                seeds,
                [s % net.num_classes for s in seeds],
                sampler,
                device,
                autocast,
                protocol="alphaflow",
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":  # warm-up (kernels, allocator) where it matters
        run()
    t0 = time.perf_counter()
    run()
    return n / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="XL/2")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="T/4 on 8×8×4 latents, 16 images (the CPU smoke test)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if args.tiny:
        args.model, args.input_size, args.num_classes, args.n, args.batch = "T/4", 8, 10, 16, 8
    device = torch.device(args.device)
    shape = (args.channels, args.input_size, args.input_size)

    parity = noise_parity(shape, device)
    torch.manual_seed(0)
    net = (
        build_model(args.model, num_classes=args.num_classes, input_size=args.input_size, in_channels=args.channels)
        .to(device)
        .eval()
    )
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    rows = []
    for sampler in SAMPLERS:
        ips = timed_generate(net, sampler, args.n, args.batch, device, autocast)
        rows.append(
            {"sampler": sampler["name"], "images_per_s": round(ips, 2), "seconds_per_50k": round(50_000 / ips, 1)}
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    result = {
        "device": name,
        "torch": torch.__version__,
        "model": args.model,
        "latent": list(shape),
        "batch": args.batch,
        "n": args.n,
        "dtype": "bf16" if args.bf16 else "fp32",
        "weights": "random init",
        "noise_parity": parity,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"protocol-{device.type}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"Official protocol on {name} (torch {torch.__version__}): noise streams "
        f"{'equal to' if parity else 'DIFFER from'} the official generator's; samples.generate, "
        f"{args.model} ({result['weights']}), batch {args.batch}, {result['dtype']}, decoding apart:",
        "",
        "| sampler | images/s | 50K images |",
        "|---|---|---|",
    ]
    lines += [f"| {r['sampler']} | {r['images_per_s']} | {r['seconds_per_50k']} s |" for r in rows]
    (out / f"protocol-{device.type}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if parity else 1


if __name__ == "__main__":
    sys.exit(main())
