"""The state of one training run: what the loop advances, how it is built, where it starts, how it is saved.

`setup` builds the loader, the DiT with its latent statistics, the EMAs, Adam and the draw generator into a
`TrainState`; `start` resumes it from a checkpoint (exact: weights, optimizer, every rank's generator, the loader
position, the logging window), fine-tunes it from a released file or another run, or leaves it fresh; `save`
writes it atomically, `checkpoint` saves and prunes, `finish` publishes `checkpoints/final` with the last grid.
"""

import math
from dataclasses import dataclass, field

import torch

from alphaflow import checkpoint as ckpt
from alphaflow import distributed
from alphaflow.config import ParamsError, RunConfig
from alphaflow.data import LatentLoader, build_encoder
from alphaflow.data.latents import estimate_latent_stats
from alphaflow.divergence import BUCKETS, monitor_for
from alphaflow.ema import EMA
from alphaflow.images import save_grid
from alphaflow.jsonl import truncate_jsonl
from alphaflow.models import build_model
from alphaflow.official import load_official_weight_sets
from alphaflow.phema import PowerEMA
from alphaflow.released import released_file
from alphaflow.sampling import class_grid

LOG_KEYS = ("loss", "L_TFM", "L_TC", "L_sum", "delta_sq")


def batch_split(run, world_size):
    """(per-device batch, micro-batch, accumulation steps) with clear errors."""
    if run.batch_size % world_size:
        raise ParamsError(
            f"params key 'runs.{run.name}.batch_size' = {run.batch_size}: not divisible by the "
            f"{world_size} processes of this job (change batch_size or the job's GPUs/nodes)"
        )
    per_rank = run.batch_size // world_size
    micro = run.micro_batch_size or per_rank
    if per_rank % micro:
        raise ParamsError(
            f"params key 'runs.{run.name}.micro_batch_size' = {micro}: the per-device batch {per_rank} "
            f"is not divisible by micro_batch_size {micro}"
        )
    return per_rank, micro, per_rank // micro


def build_run_model(run, loader, device):
    c, h, w = loader.latent_shape
    torch.manual_seed(run.seed)
    return build_model(
        run.model, num_classes=loader.num_classes, input_size=h, in_channels=c, **run.model_overrides
    ).to(device)


# ----------------------------------------------------------------------------
# The state, and how it is built and started


@dataclass
class TrainState:
    """What the loop advances; `save` writes it (with the networks', optimizer's and generators' tensors)."""

    run: RunConfig
    info: distributed.DistInfo
    device: torch.device
    fingerprint: str  # train_fingerprint: what the weights depend on
    loader: LatentLoader
    net: torch.nn.Module  # the raw weights (DDP wraps it in `forward`)
    ema: EMA
    phema: PowerEMA | None  # post-hoc EMA profiles (phema_every), else None
    opt: torch.optim.Optimizer
    # fmt: off
    gen: torch.Generator        # ε, (t, r) and label dropout of the whole global batch (micro_batch_draws)
    accum: int                  # micro-batches per optimizer step on this rank
    monitor: object = None      # divergence.Monitor: events and the policy
    step: int = 0               # optimizer steps done
    batch: int = 0              # global batches consumed (= step, plus the skipped ones)
    # fmt: on
    skip: set = field(default_factory=set)  # global batches not trained on (skip_batches, rollbacks)
    # fmt: off
    ema_offset: int = 0         # steps of a fine-tune's source, so its EMA ramp-up continues
    bad_total: int = 0          # steps whose non-finite gradients were zeroed, over the run
    bad_run: int = 0            # … in a row now
    # fmt: on
    sums: dict = field(default_factory=dict)  # LOG_KEYS summed over the logging window (float64 tensors)
    bucket_sums: object = None  # per-t-bucket loss sums and sample counts of the window (divergence.bucket_sums)
    bucket_counts: object = None
    # fmt: off
    window_n: int = 0           # steps in the logging window
    window_t0: float = 0.0      # when the window started (perf_counter), for images/s
    # fmt: on
    window_images: int = 0


def setup(params, run, info, dev, fp):
    """The loader, the DiT with its latent statistics, EMA, post-hoc EMA, Adam and the draw generator."""
    _, micro, accum = batch_split(run, info.world_size)
    latent_dir = params.latent_dir()
    loader = LatentLoader(latent_dir, micro, seed=run.seed, rank=info.rank, world_size=info.world_size, device=dev)
    net = build_run_model(run, loader, dev)
    mean, std = estimate_latent_stats(latent_dir, run.stats_samples, run.seed, dev)
    net.latent_mean.copy_(mean)
    net.latent_std.copy_(std)
    ema = EMA(net, run.ema_halflife, run.ema_rampup)
    # Post-hoc EMA: power-function EMAs of the raw weights, snapshotted every phema_every steps.
    phema = PowerEMA(net, run.phema_sigma_rels) if run.phema_every else None
    opt = torch.optim.Adam(
        net.parameters(),
        lr=run.lr,
        betas=tuple(run.betas),
        eps=run.adam_eps,
        weight_decay=0.0,
        fused=(dev.type == "cuda") or None,
    )
    # One generator stream for the whole global batch, the same on every rank (see micro_batch_draws).
    gen = torch.Generator(dev).manual_seed(run.seed * 1000)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return TrainState(
        run=run,
        info=info,
        device=dev,
        fingerprint=fp,
        loader=loader,
        net=net,
        ema=ema,
        phema=phema,
        opt=opt,
        gen=gen,
        accum=accum,
        monitor=monitor_for(run),
        skip=set(run.skip_batches),
    )


def start(state, params, latest, quiet):
    """Resume from `latest` (the same fingerprint: a kill, a requeue, or more steps for a finished run), or
    fine-tune from a released file or another run, or start fresh; then open the logging window."""
    run, dev, say = state.run, state.device, state.info.is_main and not quiet
    window = {}
    if latest is not None:
        saved, rng = ckpt.load_checkpoint(
            latest, net=state.net, ema=state.ema, optimizer=state.opt, device=dev, phema=state.phema
        )
        state.loader.load_state_dict(saved["loader"])
        state.gen.set_state(rng[f"gen.{state.info.rank}"].to(torch.uint8))
        state.step, state.bad_total, window = saved["step"], saved["bad_total"], saved.get("window", {})
        state.ema_offset = saved.get("ema_step_offset", 0)
        state.batch = saved.get("batch", state.step)
        state.skip = set(run.skip_batches) | set(saved.get("skipped", []))
        state.monitor.load_state_dict(saved.get("divergence", {}))
        with distributed.main_work("truncating metrics.jsonl") as mine:
            if mine:
                truncate_jsonl(params.run_dir(run.name) / "metrics.jsonl", state.step)
                if not quiet:
                    print(f"[alphaflow] {run.name}: resuming from {latest.name} (step {state.step} of {run.steps})")
    elif params.init_file(run.name) is not None:  # a released snapshot (e.g. the XL/2 that XL/2+ fine-tunes)
        source = released_file(params, run.name, "init_from")
        sets = load_official_weight_sets(source, state.loader.num_classes)
        state.net.load_state_dict({k: v.to(dev) for k, v in sets["raw"].items()})
        state.ema.load_state_dict({k: v.to(dev) for k, v in sets["ema"].items()})
        # The snapshot's step is not known: the EMA continues with its full half-life (ramp-up complete).
        state.ema_offset = math.ceil(run.ema_halflife / run.ema_rampup) if run.ema_rampup else 0
        if say:
            print(f"[alphaflow] {run.name}: fine-tuning from the released {source} (EMA at its full half-life)")
    elif run.init_from is not None:
        source = params.run_dir(run.init_from) / "checkpoints" / "final"
        state.net.load_state_dict(ckpt.load_weights(source, "raw", dev))
        state.ema.load_state_dict(ckpt.load_weights(source, "ema", dev))
        # The fine-tune continues the source's EMA with its full half-life: its ramp-up counts the source's
        # steps too (restarting at 0 would set β = 0 and throw the loaded EMA away at the first update).
        state.ema_offset = ckpt.read_state(source)["step"]
        if say:
            print(f"[alphaflow] {run.name}: fine-tuning from {source} (EMA continues at step {state.ema_offset})")
    state.sums = {k: torch.tensor(window.get(k, 0.0), device=dev, dtype=torch.float64) for k in LOG_KEYS}
    zeros = [0.0] * 2 * BUCKETS
    state.bucket_sums = torch.tensor(window.get("bucket_sums", zeros), device=dev, dtype=torch.float64)
    state.bucket_counts = torch.tensor(window.get("bucket_counts", zeros), device=dev, dtype=torch.float64)
    state.window_n = window.get("n", 0)


# ----------------------------------------------------------------------------
# Saving it


def save(state, ckpt_dir):
    """Checkpoint `step-<N>`: weights, EMA, post-hoc EMA, optimizer, every rank's generator, loader position and
    the logging window, atomically (rank 0 writes)."""
    states = distributed.gather_states(state.gen.get_state())
    name = step_name(state.step)
    with distributed.main_work(f"writing checkpoint {ckpt_dir / name}") as mine:
        if mine:
            saved = {
                "step": state.step,
                "bad_total": state.bad_total,
                "loader": state.loader.state_dict(),
                "fingerprint": state.fingerprint,
                "run": state.run.to_dict(),
                "world_size": state.info.world_size,
                "ema_step_offset": state.ema_offset,
                "batch": state.batch,
                "skipped": sorted(state.skip),
                "divergence": state.monitor.state_dict(),
                "window": {
                    **{k: float(v) for k, v in state.sums.items()},
                    "n": state.window_n,
                    "bucket_sums": state.bucket_sums.tolist(),
                    "bucket_counts": state.bucket_counts.tolist(),
                },
            }
            rng = {f"gen.{r}": s for r, s in enumerate(states)}
            ckpt.save_checkpoint(
                ckpt_dir,
                name,
                net=state.net,
                ema=state.ema,
                optimizer=state.opt,
                rng=rng,
                state=saved,
                phema=state.phema,
                what=f"checkpoint {name} of run {state.run.name}",
            )


def checkpoint(state, params, ckpt_dir, tracker):
    """save, then prune to the snapshots and the last two; a sample grid at every snapshot."""
    run, done = state.run, state.step
    save(state, ckpt_dir)
    with distributed.main_work(f"pruning checkpoints / the sample grid at step {done}") as mine:
        if mine:
            ckpt.prune(ckpt_dir, set(range(run.snapshot_every, run.steps + 1, run.snapshot_every)))
            if done % run.snapshot_every == 0:
                log_grid(
                    state.ema.module,
                    params,
                    params.run_dir(run.name) / "samples" / f"grid-{done:07d}.png",
                    tracker,
                    state.loader,
                )


def finish(state, params, ckpt_dir, tracker, plot_curves):
    """checkpoints/final → the last step; the final sample grid and the training curves. Returns the grid."""
    run_dir = params.run_dir(state.run.name)
    with distributed.main_work("the final checkpoint, sample grid and training curves") as mine:
        if not mine:
            return None
        ckpt.publish_final(ckpt_dir, step_name(state.run.steps))
        grid = log_grid(state.ema.module, params, run_dir / "samples" / "grid-final.png", tracker, state.loader)
        if plot_curves is not None:
            curves = plot_curves(run_dir / "metrics.jsonl", run_dir / "plots" / "training.png", title=state.run.name)
            tracker.log_artifact(curves, "plots")
        return str(grid)


def step_name(step):
    return ckpt.step_dir_name(step)


def log_grid(net, params, path, tracker, loader, per_class=8):
    """A class-sorted sample grid of `net` (one row per class) as a PNG, logged to MLflow; returns its path."""
    decoder = build_encoder(**params.encoder_args(), device=next(net.parameters()).device)
    images = class_grid(net, decoder, loader.num_classes, per_class)
    grid = save_grid(images, path, nrow=per_class, scale=2 if images.shape[-1] < 64 else 1)
    tracker.log_artifact(grid, "samples")
    return grid
