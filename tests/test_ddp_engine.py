"""Under DDP the tangent pass runs inside the DDP forward (no torch.func.jvp through the wrapper), the
teacher passes through `.module`; gradients must synchronise and equal the torch.func.jvp path."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alphaflow.models import build_model
from alphaflow.objectives import per_sample_loss, sample_times
from helpers import free_port


def make_net():
    torch.manual_seed(0)
    net = build_model("T/2", num_classes=3, input_size=8, in_channels=2, depth=2, hidden_size=32, num_heads=2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.double()


def global_batch(n=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    parts = [sample_times(n // 2, 0.25, generator=g) for _ in range(2)]  # per micro-batch split
    t = torch.cat([p[0] for p in parts]).double()
    r = torch.cat([p[1] for p in parts]).double()
    return x, y, t, r, noise


def flat_grads(net):
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


ALPHAS = (0.0, 0.5)  # the JVP (MeanFlow) and the extra-forward (α-Flow) branches


def worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for alpha in ALPHAS:
        net = make_net()
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        x, y, t, r, noise = (a.chunk(2)[rank] for a in global_batch())
        loss = per_sample_loss(ddp, x, y, t, r, noise, alpha, teacher=ddp.module)
        loss.mean().backward()
        if rank == 0:
            torch.save(flat_grads(net), os.path.join(out_dir, f"g{alpha}.pt"))
    dist.destroy_process_group()


def reference_grads(alpha):
    net = make_net()
    x, y, t, r, noise = global_batch()
    # Per-sample losses are independent, so the mean over the global batch is the DDP average of halves.
    per_sample_loss(net, x, y, t, r, noise, alpha, jvp_mode="split").mean().backward()  # torch.func.jvp
    return flat_grads(net)


def test_two_process_gloo_gradients_equal_single_process(tmp_path):
    mp.start_processes(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for alpha in ALPHAS:
        ddp_grads = torch.load(tmp_path / f"g{alpha}.pt", weights_only=True)
        torch.testing.assert_close(ddp_grads, reference_grads(alpha), rtol=1e-10, atol=1e-12)
