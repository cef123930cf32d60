"""Few-step samplers for u_θ(z, r, t) (paper Alg. 3, as the official code implements it).

  "ode":         z_{t_m} = z_{t_n} − (t_n − t_m) · u_θ(z_{t_n}, r = t_m, t = t_n)
  "consistency": x̂₀ = z_{t_n} − t_n · u_θ(z_{t_n}, 0, t_n);  z_{t_m} = (1 − t_m) x̂₀ + t_m ε′, fresh ε′

With t_steps = [1, 0] both are the 1-NFE map x̂₀ = ε − u_θ(ε, 0, 1). Updates run in float64; the
network sees its own dtype. Noise is drawn per sample from its own seed (`SeededNoise`), so a sample is
reproducible from its seed alone, whatever the batch it lands in.
"""

import torch

from alphaflow.config import parse_t_steps


STREAMS = ("default", "alphaflow")


class SeededNoise:
    """One torch.Generator per sample seed (like edm2's StackedRandomGenerator).

    stream "default": generator seeded with seed mod 2**63, one draw of `shape` per call (this project's
    stream; consistency sampling takes its fresh noise from a second SeededNoise of seeds + 2**40).
    stream "alphaflow": the official α-Flow protocol: generator seeded with seed mod 2**32, every draw is
    [1, *shape] from the same generator, so the consistency sampler's fresh ε′ (a float64 draw) is the next
    draw of the seed's own generator after its float32 initial noise.
    """

    def __init__(self, seeds, device="cpu", stream="default"):
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
        self.device = torch.device(device)
        self.stream = stream
        modulus = 1 << (32 if stream == "alphaflow" else 63)
        self.generators = [torch.Generator(self.device).manual_seed(int(s) % modulus) for s in seeds]

    def randn(self, shape, dtype=torch.float32):
        """shape excludes the batch dimension; returns [len(seeds), *shape]."""
        shape = tuple(shape)
        if self.stream == "alphaflow":
            return torch.cat(
                [torch.randn([1, *shape], generator=g, device=self.device, dtype=dtype) for g in self.generators]
            )
        return torch.stack([torch.randn(shape, generator=g, device=self.device, dtype=dtype) for g in self.generators])


def protocol_noise(seeds, shape, device="cpu", protocol="default"):
    """(initial noise float32 [len(seeds), *shape], generator of the consistency sampler's fresh noise) of an
    evaluation protocol (params eval.protocol): "default" = this project's streams (fresh noise from seeds +
    2**40), "alphaflow"/"adm" = the official α-Flow streams (fresh noise: the same per-seed generators)."""
    if protocol == "default":
        return (
            SeededNoise(seeds, device=device).randn(shape),
            SeededNoise([s + (1 << 40) for s in seeds], device=device),
        )
    noise = SeededNoise(seeds, device=device, stream="alphaflow")
    return noise.randn(shape), noise


def randn_like(z, generator):
    if isinstance(generator, SeededNoise):
        return generator.randn(z.shape[1:], dtype=z.dtype).to(z.device)
    return torch.randn(
        z.shape, generator=generator, device=z.device if generator is None else generator.device, dtype=z.dtype
    ).to(z.device)


def uniform_t_steps(num_steps):
    """[1, (N−1)/N, …, 1/N, 0]."""
    return [1.0 - i / num_steps for i in range(num_steps)] + [0.0]


@torch.no_grad()
def sample(net, noise, y, t_steps, *, mode="ode", generator=None):
    """Integrates from z_1 = noise to t = 0 along t_steps; returns x̂₀ in float64.

    generator supplies the fresh noise of consistency sampling: a torch.Generator or a SeededNoise.
    """
    if mode not in ("ode", "consistency"):
        raise ValueError(f"mode must be 'ode' or 'consistency', got {mode!r}")
    t_steps = parse_t_steps(t_steps)
    net_dtype = next(net.parameters()).dtype
    z = noise.to(torch.float64)
    batch = torch.ones(z.shape[0], device=z.device, dtype=net_dtype)

    def u(z, r, t):
        return net(z.to(net_dtype), batch * r, batch * t, y).to(torch.float64)

    for t_n, t_m in zip(t_steps[:-1], t_steps[1:]):
        if mode == "ode":
            z = z - (t_n - t_m) * u(z, t_m, t_n)
        else:
            x0 = z - t_n * u(z, 0.0, t_n)
            z = x0 if t_m == 0.0 else (1 - t_m) * x0 + t_m * randn_like(z, generator)
    return z


@torch.no_grad()
def class_grid(net, decoder, num_classes, per_class=8, t_steps=(1.0, 0.5, 0.0)):
    """uint8 images of the first ≤ 10 classes, `per_class` each in class order (seeds 0…), from `t_steps`
    (default: 2-NFE ODE): the sample grids of training snapshots."""
    classes = min(num_classes, 10)
    device = next(net.parameters()).device
    y = torch.arange(classes, device=device).repeat_interleave(per_class)
    shape = (net.in_channels, net.latent_mean.shape[-2], net.latent_mean.shape[-1])
    noise = SeededNoise(range(len(y)), device=device).randn(shape)
    x = net.denormalize(sample(net, noise, y, list(t_steps)).float())
    return decoder.decode(x)
