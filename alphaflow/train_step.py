"""One optimizer step of the α-Flow loss (paper Alg. 1), over a global batch of micro-batches.

The global batch is split into per-device micro-batches with gradient accumulation; every rank draws the
randomness of the whole global batch from one stream (`micro_batch_draws`), so a step depends on the global
batch only, not on the number of devices. NaN/Inf gradients are zeroed and counted, the global norm is
clipped, the EMAs follow. A step whose gradient norm makes a divergence event the policy acts on raises
`DivergenceEvent` before the update.
"""

import contextlib
import math

import torch

from alphaflow.divergence import bucket_means, bucket_sums, poison, worst_bucket
from alphaflow.objectives import alpha_flow_loss, drop_labels, sample_times


class DivergenceEvent(Exception):
    """A step whose events reached the divergence policy's limit (train_step raises it before the update)."""

    def __init__(self, event, where):
        super().__init__(event)
        self.event, self.where = event, where


def learning_rate(run, step):
    """Linear warm-up from lr/1e4 to lr over warmup_steps, then constant (official code: num_warmup_steps)."""
    if step >= run.warmup_steps:
        return run.lr
    return run.lr * (1e-4 + (1 - 1e-4) * step / run.warmup_steps)


def micro_batch_draws(gen, x, y, run, null_label, info):
    """This rank's ε, (t, r) and dropped labels for its micro-batch of the current global micro-step.

    Every rank draws, from the same stream, the randomness of all W micro-batches the W ranks train on
    now (LatentLoader deals micro-batch j to rank j mod W) and keeps its own. So the draws, like the data,
    equal those of one process that accumulates the W micro-batches in order: the result depends on the
    global batch only. The extra draws are W micro-batches of noise per micro-step (cheap beside a forward).
    """
    for k in range(info.world_size):
        noise = torch.randn(x.shape, generator=gen, device=x.device)
        t, r = sample_times(len(y), run.fm_ratio, run.time_loc, run.time_scale, generator=gen)
        t, r = t.to(x.device), r.to(x.device)
        dropped = drop_labels(y, t, run.label_dropout, null_label, run.cfg_interval, gen)
        if k == info.rank:
            mine = noise, t, r, dropped
    return mine


def skip_batch(state):
    """Consumes global batch `state.batch` without a step: its micro-batches and their draws, as a step would."""
    for _ in range(state.accum):
        x, y = next(state.loader)
        micro_batch_draws(state.gen, x, y, state.run, state.net.null_label, state.info)
    state.batch += 1


def train_step(state, forward, teacher, autocast, ddp, faults=frozenset()):
    """One optimizer step of the α-Flow loss (paper Alg. 1) over `accum` micro-batches; returns (α, lr, ‖g‖).

    Raises DivergenceEvent, before the update, when the step's events reach the divergence policy's limit.
    faults: global batches whose loss is poisoned (divergence.fault_batches)."""
    run, net, info = state.run, state.net, state.info
    alpha, lr = run.alpha(state.step), learning_rate(run, state.step)
    for group in state.opt.param_groups:
        group["lr"] = lr
    step_sums = torch.zeros_like(state.bucket_sums)
    step_counts = torch.zeros_like(state.bucket_counts)
    for i in range(state.accum):
        x, y = next(state.loader)
        x = net.normalize(x)
        noise, t, r, y = micro_batch_draws(state.gen, x, y, run, net.null_label, info)
        sync = contextlib.nullcontext() if (i == state.accum - 1 or info.world_size == 1) else ddp.no_sync()
        with sync, autocast():
            terms = alpha_flow_loss(
                forward,
                x,
                y,
                t,
                r,
                noise,
                alpha,
                omega=run.cfg_omega,
                kappa=run.cfg_kappa,
                cfg_interval=run.cfg_interval,
                null_label=net.null_label,
                clamp_target=run.clamp_target,
                weight_eps=run.weight_eps,
                shift=run.shift,
                jvp_mode=run.jvp_mode,
                teacher=teacher,
            )
            if state.batch in faults:
                terms.loss = poison(terms.loss, t)
            (terms.loss.mean() / state.accum).backward()
        with torch.no_grad():
            sums, counts = bucket_sums(terms.loss, t, r)
            step_sums += sums
            step_counts += counts
            for key, value in (
                ("loss", terms.loss.detach()),
                ("L_TFM", terms.tfm),
                ("L_TC", terms.tc),
                ("L_sum", terms.tfm + terms.tc),
                ("delta_sq", terms.delta_sq.detach()),
            ):
                state.sums[key] += value.mean() / state.accum
    # NaN/Inf gradients → zero and count (official code: grad_nan_to_num); then the global-norm clip.
    params_list = list(net.parameters())
    norm = torch.nn.utils.get_total_norm([p.grad for p in params_list if p.grad is not None])
    norm_value = float(norm)  # the step's one device sync
    finite = math.isfinite(norm_value)
    event = state.monitor.observe(state.step, state.batch, norm_value)
    if event is not None:
        where = worst_bucket(bucket_means(step_sums, step_counts), bucket_means(state.bucket_sums, state.bucket_counts))
        raise DivergenceEvent(event, where)
    state.bucket_sums += step_sums
    state.bucket_counts += step_counts
    if not finite:
        for p in params_list:
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        state.bad_total, state.bad_run = state.bad_total + 1, state.bad_run + 1
        if state.bad_run >= run.max_bad_steps:
            raise RuntimeError(
                f"{run.name}: {state.bad_run} consecutive steps with NaN/Inf gradients at step "
                f"{state.step}; aborting (lower lr, check the data, or raise max_bad_steps)"
            )
    else:
        state.bad_run = 0
    if run.grad_clip is not None:
        if finite:
            torch.nn.utils.clip_grads_with_norm_(params_list, run.grad_clip, norm)
        else:
            torch.nn.utils.clip_grad_norm_(params_list, run.grad_clip)
    state.opt.step()
    state.opt.zero_grad(set_to_none=True)
    state.ema.update(net, state.ema_offset + state.step)
    state.step += 1
    state.batch += 1
    if state.phema is not None:  # t counts this run's images (a fine-tune's profiles start at its first step)
        state.phema.update(net, t=state.step * run.batch_size, dt=run.batch_size)
    state.window_n += 1
    state.window_images += run.batch_size
    return alpha, lr, norm
