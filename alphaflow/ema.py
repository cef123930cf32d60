"""Exponential moving average of the weights with a half-life in steps (paper Table 3).

β = 0.5^(1/h) with h = min(halflife, rampup · step): at step 0 the EMA equals the network, and the full
half-life (6931 steps) is reached at step 138,620. Float buffers are averaged too.
"""

import copy

import torch


def ema_beta(step, halflife, rampup=0.05):
    h = halflife if rampup is None else min(halflife, rampup * step)
    return 0.0 if h <= 0 else 0.5 ** (1.0 / h)


class EMA:
    """Holds an eval-mode, grad-free copy of `net`; `update(net, step)` after every optimiser step."""

    def __init__(self, net, halflife=6931.0, rampup=0.05):
        self.halflife = halflife
        self.rampup = rampup
        self.module = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net, step):
        beta = ema_beta(step, self.halflife, self.rampup)
        for ema_t, t in zip(self.tensors(self.module), self.tensors(net)):
            ema_t.lerp_(t.detach().to(ema_t.dtype), 1.0 - beta)
        return beta

    @staticmethod
    def tensors(module):
        yield from module.parameters()
        yield from (b for b in module.buffers() if b.is_floating_point())

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state):
        self.module.load_state_dict(state)
