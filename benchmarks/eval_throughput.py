"""Images/s of the evaluation feature extractors next to 1-NFE sampling of a T/4 DiT.

    python benchmarks/eval_throughput.py                         # CPU, Fashion-MNIST-sized images
    python benchmarks/eval_throughput.py --device cuda --n 2048  # one GPU

Measures alphaflow.metrics.extract_features for classifier-local (a random-weight SmallCNN saved to
a temporary file: the cost does not depend on the weights) and inception-fid-ts (the packaged FID
Inception), and alphaflow.sampling.sample(net, noise, y, [1, 0]) for DiT T/4 at 28×28×1. Prints the
numbers, the ratios to sampling (how many images one could sample in the time of scoring one), and a
final JSON line.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from alphaflow import metrics as M
from alphaflow.classifier import SmallCNN, save_classifier
from alphaflow.models import build_model
from alphaflow.sampling import sample


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, n, device, repeats=1):
    """Images/s of fn() (which processes n images): one warm-up call, then the best of `repeats`."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return n / best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device",      default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n",           type=int, default=None, help="images per measurement (default 512 cpu, 4096 cuda)")
    ap.add_argument("--n-inception", type=int, default=None,
                    help="images for inception-fid-ts (default 16 cpu, = n cuda)")
    ap.add_argument("--batch",       type=int, default=64, help="feature-extraction batch size")
    ap.add_argument("--repeats",     type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    n = args.n or (4096 if device.type == "cuda" else 512)
    n_inc = args.n_inception or (n if device.type == "cuda" else 16)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)              # (n, 1, 28, 28)

    cpu = f"cpu ({torch.get_num_threads()} threads)"
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu}
    with tempfile.TemporaryDirectory() as tmp:
        clf = Path(tmp) / "smallcnn.safetensors"
        save_classifier(SmallCNN().eval(), clf)
        results["classifier-local"] = timed(lambda: M.extract_features(
            "classifier-local", images, weights_path=clf, device=device, batch_size=max(args.batch, 256),
            progress=False), n, device, args.repeats)
    results["inception-fid-ts"] = timed(lambda: M.extract_features(
        "inception-fid-ts", images[:n_inc], device=device, batch_size=args.batch, progress=False),
        n_inc, device, 1 if device.type == "cpu" else args.repeats)

    net = build_model("T/4", num_classes=10, input_size=28, in_channels=1).to(device).eval()
    noise = torch.randn(n, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)

    @torch.no_grad()
    def one_nfe():
        for i in range(0, n, 1024):
            sample(net, noise[i:i + 1024], y[i:i + 1024], [1.0, 0.0])

    results["sample-1nfe-T/4"] = timed(one_nfe, n, device, args.repeats)

    s = results["sample-1nfe-T/4"]
    print(f"device: {results['device']}")
    for k in ("sample-1nfe-T/4", "classifier-local", "inception-fid-ts"):
        print(f"  {k:18s} {results[k]:12.1f} images/s   sampling/this = {s / results[k]:8.2f}×")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
