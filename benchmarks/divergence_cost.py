"""Per-step cost of the divergence bookkeeping (alphaflow.divergence) beside the training step it rides on.

    python benchmarks/divergence_cost.py                      # CPU, the demo's T/4 at batch 64
    python benchmarks/divergence_cost.py --model B/2 --batch 32 --size 32 --channels 4 --device cuda

Per optimizer step training adds: the per-t-bucket sums of the micro-batch's per-sample loss (two index_add_
over 2 × 8 buckets) and one Monitor.observe of the gradient norm, whose float() is the sync the non-finite check
already made. Prints the median microseconds of each, of one α-Flow training step, and the ratio.
"""

import argparse
import statistics
import time

import torch

from alphaflow.divergence import Monitor, bucket_sums
from alphaflow.models import build_model
from alphaflow.objectives import alpha_flow_loss, sample_times


def median_us(fn, repeats, sync):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="T/4")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    net = build_model(args.model, num_classes=10, input_size=args.size, in_channels=args.channels).to(dev)
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    t, r = (v.to(dev) for v in sample_times(args.batch, 0.5))
    noise = torch.randn_like(x)

    def step():
        terms = alpha_flow_loss(net, x, y, t, r, noise, 0.5, null_label=net.null_label, teacher=net)
        terms.loss.mean().backward()
        net.zero_grad(set_to_none=True)
        return terms.loss.detach()

    loss = step()
    monitor = Monitor("rollback", window=200, max_events=3, spike_factor=10.0)
    counter = iter(range(10**9))
    rows = {
        "training step (α = 0.5)": median_us(step, args.repeats, sync),
        "per-t-bucket sums": median_us(lambda: bucket_sums(loss, t, r), 20 * args.repeats, sync),
        "Monitor.observe": median_us(lambda: monitor.observe(next(counter), 0, 1.0), 20 * args.repeats, sync),
    }
    base = rows["training step (α = 0.5)"]
    print(f"{args.model} batch {args.batch} on {dev} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for name, us in rows.items():
        print(f"  {name:26s} {us:10.1f} µs   {us / base:9.4%} of a step")


if __name__ == "__main__":
    main()
