"""One training run from a params entry, as the paper trains (paper Table 3).

    alphaflow train --params params/default.yaml --run alphaflow-T-4

Adam (β = 0.9, 0.95), lr warm-up, global batch split into per-device micro-batches with gradient
accumulation, NaN/Inf gradients zeroed and counted, global-norm clip, EMA with a ramped half-life,
DDP from the environment, atomic checkpoints with exact resume, SIGTERM/SIGUSR2 → checkpoint + requeue
exit code, MLflow + metrics.jsonl with the loss per t bucket. A diverging run stops or rolls back to its last
checkpoint (params `divergence`, alphaflow.divergence). Starting a run whose folder has a checkpoint resumes it.
"""

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field

import torch
import yaml
from tqdm import tqdm

from alphaflow import checkpoint as ckpt
from alphaflow import distributed, runlock
from alphaflow.config import ParamsError, RunConfig
from alphaflow.data import LatentLoader, build_encoder
from alphaflow.data.latents import estimate_latent_stats
from alphaflow.divergence import (
    BUCKETS,
    Diverged,
    bucket_means,
    bucket_sums,
    fault_batches,
    monitor_for,
    poison,
    worst_bucket,
)
from alphaflow.ema import EMA
from alphaflow.errors import REQUEUE_EXIT_CODE
from alphaflow.images import save_grid
from alphaflow.io import atomic_write_bytes
from alphaflow.jsonl import append_jsonl, truncate_jsonl
from alphaflow.models import build_model
from alphaflow.objectives import alpha_flow_loss, drop_labels, gradient_conflict, sample_times
from alphaflow.official import load_official_weight_sets
from alphaflow.phema import PowerEMA, discard_after, save_snapshot
from alphaflow.released import import_released, released_file
from alphaflow.run_folder import discard_stale, train_fingerprint
from alphaflow.sampling import class_grid
from alphaflow.tracking import Tracker, git_commit, metric_key

LOG_KEYS = ("loss", "L_TFM", "L_TC", "L_sum", "delta_sq")


class Preempted(SystemExit):
    """Raised after the checkpoint is written on SIGTERM/SIGUSR2; exits with REQUEUE_EXIT_CODE."""


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


# ----------------------------------------------------------------------------
# Set-up


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


def build_run_model(run, loader, device):
    c, h, w = loader.latent_shape
    torch.manual_seed(run.seed)
    return build_model(
        run.model, num_classes=loader.num_classes, input_size=h, in_channels=c, **run.model_overrides
    ).to(device)


class SignalFlag:
    """SIGTERM / SIGUSR2 (SLURM pre-emption and time limit, submitit) → stop at the next step boundary."""

    def __init__(self):
        self.received = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGUSR2):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. the debug executor): leave signals alone
                pass

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------
# The training state, and the functions that set it up, advance it and save it


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


def open_tracker(params, state, tracking):
    """The run's MLflow run (rank 0), and its resolved params.yaml."""
    run, run_dir = state.run, params.run_dir(state.run.name)
    tracker = Tracker(
        params.tracking_uri(),
        params.profile,
        run.name,
        run_id_file=run_dir / "mlflow_run_id",
        tags={
            "method": run.method,
            "scale": run.model,
            "profile": params.profile,
            "git_commit": git_commit(),
            "paper_row": str(run.paper_row),
        },
        enabled=tracking and state.info.is_main,
    )
    with distributed.main_work("writing params.yaml") as mine:
        if mine:
            resolved = yaml.safe_dump(
                {
                    "run": run.to_dict(),
                    "profile": params.profile,
                    "data": params.raw["data"],
                    "encoder": params.raw["encoder"],
                },
                sort_keys=False,
            )
            atomic_write_bytes(run_dir / "params.yaml", resolved.encode())
            if state.step == 0:
                tracker.log_params(run.to_dict())
            tracker.log_artifact(run_dir / "params.yaml")
    return tracker


def held_out_batch(params, run, dev):
    """The fixed batch the gradient-conflict cosines are measured on (conflict_every; rank 0)."""
    with distributed.main_work("loading the gradient-conflict batch", when=run.conflict_every) as mine:
        if not mine:
            return None
        held = LatentLoader(params.latent_dir(), run.conflict_batch, seed=run.seed + 104729, device=dev)
        hx, hy = next(held)
        hg = torch.Generator(dev).manual_seed(run.seed + 104729)
        ht, hr = sample_times(run.conflict_batch, 0.0, run.time_loc, run.time_scale, generator=hg)
        return hx, hy, ht.to(dev), hr.to(dev), torch.randn(hx.shape, generator=hg, device=dev)


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


def log_step(state, params, tracker, bar, alpha, lr, norm, conflict_batch):
    """A metrics.jsonl record (and MLflow) of the logging window's means; then a new window."""
    run, done = state.run, state.step
    spread = distributed.rank_spread(state.net) if state.info.world_size > 1 else None
    with distributed.main_work(f"logging step {done}") as mine:
        if mine:
            elapsed = time.perf_counter() - state.window_t0
            record = {
                "step": done,
                "alpha": alpha,
                "fm_ratio": run.fm_ratio,
                "lr": lr,
                "grad_norm": float(norm),
                "bad_steps": state.bad_total,
                "images_per_s": state.window_images / max(elapsed, 1e-9),
            }
            if spread is not None:
                record["rank_param_spread"] = spread
            record.update({k: float(v) / max(state.window_n, 1) for k, v in state.sums.items()})
            record.update(bucket_means(state.bucket_sums, state.bucket_counts))
            if run.conflict_every and done % run.conflict_every == 0:
                record.update(gradient_conflict(state.net, *conflict_batch))
            append_jsonl(params.run_dir(run.name) / "metrics.jsonl", record)
            tracker.log_metrics({metric_key(k): v for k, v in record.items() if k != "step"}, step=done)
            bar.set_postfix(loss=f"{record['loss']:.4f}", alpha=f"{alpha:.3f}", img_s=f"{record['images_per_s']:.0f}")
            for v in (*state.sums.values(), state.bucket_sums, state.bucket_counts):
                v.zero_()
            state.window_n, state.window_t0, state.window_images = 0, time.perf_counter(), 0


def evaluate_in_training(state, params, tracker, evaluate):
    """The in-training metrics (FD_clf of EMA and raw: metric-vs-step curves), outside the images/s window."""
    done = state.step
    with distributed.main_work(f"the in-training evaluation at step {done}") as mine:
        if mine:
            t_eval = time.perf_counter()
            scores = evaluate(params, {"ema": state.ema.module, "raw": state.net}, str(state.device))
            append_jsonl(params.run_dir(state.run.name) / "metrics.jsonl", {"step": done, **scores})
            tracker.log_metrics(scores, step=done)
            state.window_t0 += time.perf_counter() - t_eval


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


# ----------------------------------------------------------------------------
# The loop


@contextlib.contextmanager
def run_lock(params, run_name):
    """The run's lock `<run>/.lock` (alphaflow.runlock), held by the main process (the one that writes) only;
    a refusal ends every rank (distributed.main_work)."""
    with contextlib.ExitStack() as held:
        with distributed.main_work(f"taking the lock of run {run_name}") as mine:
            if mine:
                held.enter_context(runlock.hold(params.run_dir(run_name) / ".lock", f"train {run_name}"))
        yield


def train(
    params, run_name, *, device=None, quiet=False, stop_after=None, tracking=True, evaluate=None, plot_curves=None
):
    """Trains (or resumes) `run_name`; returns a summary dict. stop_after: optional step at which to stop.

    The CLI passes the two pieces that belong to later stages: `evaluate(params, {"ema": net, "raw": net}, device)
    -> {name: value}`, the in-training metrics every `eval_every` steps (evaluate.in_training_metrics), and
    `plot_curves(metrics_jsonl, png, title=...) -> path`, the training curves at the end
    (plots.plot_training_curves); without `plot_curves` no curves are drawn.

    Holds the run lock throughout, from before the checkpoints are read: a second writer of the run (a double
    launch, a requeued job racing its predecessor) ends with runlock.RunLocked (exit 2) instead."""
    run = params.run(run_name)  # an unknown run: its error, before a lock folder is made
    if run.checkpoint is None and run.eval_every and evaluate is None:
        raise ParamsError(
            f"runs.{run_name}.eval_every is {run.eval_every}, but no in-training evaluator was "
            "given: train through `alphaflow train` or pass evaluate="
        )
    if distributed.env_info().world_size > 1:
        distributed.init(device)  # the process group run_lock's main_work needs
    with run_lock(params, run_name):
        if run.checkpoint is not None:  # released weights: imported, not trained
            return import_released(params, run_name, quiet=quiet)
        info, dev = distributed.init(device)
        return training_loop(
            params,
            run,
            info,
            dev,
            quiet=quiet,
            stop_after=stop_after,
            tracking=tracking,
            evaluate=evaluate,
            plot_curves=plot_curves,
        )


def training_loop(params, run, info, dev, *, quiet, stop_after, tracking, evaluate, plot_curves):
    """train's body, under the run lock: set up or resume, step, log, evaluate, checkpoint, finish."""
    run_dir, ckpt_dir = params.run_dir(run.name), params.run_dir(run.name) / "checkpoints"
    fp = train_fingerprint(params, run)
    finished = ckpt.read_state(ckpt_dir / "final", missing_ok=True)
    if finished is not None and finished.get("fingerprint") == fp and finished["step"] == run.steps:
        if info.is_main and not quiet:
            print(f"[alphaflow] {run.name}: already finished ({ckpt_dir / 'final'}, fingerprint {fp})")
        return {
            "run": run.name,
            "step": finished["step"],
            "bad_steps": finished.get("bad_total", 0),
            "already_finished": True,
        }
    with distributed.main_work("clearing outputs of other params and partial checkpoints") as mine:
        if mine:
            ckpt.clear_partial(ckpt_dir)  # a save a kill interrupted: its space is needed now
            discard_stale(run_dir, ckpt.latest_checkpoint(ckpt_dir, max_step=run.steps), fp, run, quiet)
    latest = ckpt.latest_checkpoint(ckpt_dir, max_step=run.steps)
    run_dir.mkdir(parents=True, exist_ok=True)

    state = setup(params, run, info, dev, fp)
    start(state, params, latest, quiet)
    ddp = (
        torch.nn.parallel.DistributedDataParallel(state.net, device_ids=[dev.index] if dev.type == "cuda" else None)
        if info.world_size > 1
        else state.net
    )
    # torch.compile (params `compile`): the gradient forward (with its tangent pass) and the no-grad teachers.
    forward, teacher = (torch.compile(ddp), torch.compile(state.net)) if run.compile else (ddp, state.net)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else contextlib.nullcontext
    tracker = open_tracker(params, state, tracking)
    conflict_batch = held_out_batch(params, run, dev)

    signals = SignalFlag()
    last_step = run.steps if stop_after is None else min(run.steps, stop_after)
    if run.divergence == "rollback" and latest is None:
        save(state, ckpt_dir)  # a rollback before the first periodic checkpoint returns here
    faults = fault_batches()
    bar = tqdm(
        total=run.steps,
        initial=state.step,
        disable=quiet or not info.is_main,
        desc=run.name,
        dynamic_ncols=True,
        smoothing=0.1,
    )
    state.window_t0 = time.perf_counter()
    try:
        while state.step < last_step:
            if state.batch in state.skip:
                skip_batch(state)
                continue
            try:
                alpha, lr, norm = train_step(state, forward, teacher, autocast, ddp, faults)
            except DivergenceEvent as diverged:
                roll_back(state, params, ckpt_dir, tracker, diverged, quiet)
                bar.reset(total=run.steps)
                bar.update(state.step)
                continue
            done = state.step
            bar.update(1)
            if state.phema is not None and (done % run.phema_every == 0 or done == run.steps):
                with distributed.main_work(f"the post-hoc EMA snapshot at step {done}") as mine:
                    if mine:
                        save_snapshot(
                            ckpt_dir / "phema",
                            state.phema,
                            done,
                            done * run.batch_size,
                            getattr(torch, run.phema_dtype),
                        )
            if done % run.log_every == 0 or done == last_step:
                log_step(state, params, tracker, bar, alpha, lr, norm, conflict_batch)
            if run.eval_every and done % run.eval_every == 0:
                evaluate_in_training(state, params, tracker, evaluate)
            stop = distributed.any_rank(signals.received is not None, dev)
            # The last step of this call is always saved: the end of the run (final links to it), and
            # --stop-after N (no work since the last periodic checkpoint is lost).
            if done % run.checkpoint_every == 0 or done % run.snapshot_every == 0 or stop or done == last_step:
                checkpoint(state, params, ckpt_dir, tracker)
            if stop:
                if info.is_main:
                    print(
                        f"[alphaflow] {run.name}: {signals.received} at step {done}; checkpoint written, "
                        f"exiting {REQUEUE_EXIT_CODE} for requeue",
                        flush=True,
                    )
                tracker.close(status="KILLED")
                raise Preempted(REQUEUE_EXIT_CODE)
    finally:
        bar.close()
        signals.restore()

    summary = {"run": run.name, "step": last_step, "bad_steps": state.bad_total}
    if last_step == run.steps:
        grid = finish(state, params, ckpt_dir, tracker, plot_curves)
        if grid is not None:
            summary["grid"] = grid
    tracker.close()
    distributed.barrier()
    return summary


def roll_back(state, params, ckpt_dir, tracker, diverged, quiet):
    """The divergence policy's answer to `diverged`: `stop` (or a spent `max_rollbacks`) raises Diverged; `rollback`
    restores the newest checkpoint from before the window's first event and adds the window's event batches to the
    skipped ones, so the run continues as a fresh run with those skip_batches would."""
    run, step, batch, monitor = state.run, state.step, state.batch, state.monitor
    what = f"{run.name}: diverged at step {step} (global batch {batch}): {diverged.event}; {diverged.where}"

    def give_up(why):
        tracker.set_tags({"diverged": f"step {step}: {diverged.event}; {diverged.where}"})
        tracker.close(status="FAILED")
        raise Diverged(f"{what}{why}")

    if run.divergence == "stop":
        give_up(
            ". The last checkpoint is kept; lower lr, or set divergence: rollback (it restores a checkpoint from "
            "before and skips the batches that did this)"
        )
    if monitor.rollbacks >= run.max_rollbacks:
        give_up(f", after {monitor.rollbacks} rollback{'s' * (monitor.rollbacks != 1)} (max_rollbacks); lower lr")
    first, batches = monitor.take_events()
    skipped, rollbacks = state.skip | set(batches), monitor.rollbacks + 1
    latest = ckpt.latest_checkpoint(ckpt_dir, max_step=first)  # from before the window's first event
    if latest is None:
        give_up(
            f". No checkpoint from before step {first} (the window's first event) is left to roll back to: "
            "lower divergence_window below checkpoint_every, or lower lr"
        )
    state.opt.zero_grad(set_to_none=True)  # the abandoned step's gradients
    start(state, params, latest, quiet=True)  # weights, optimizer, EMA, generators, loader, window; metrics.jsonl
    state.skip, state.monitor.rollbacks = state.skip | skipped, rollbacks
    with distributed.main_work(f"recording rollback {rollbacks}") as mine:
        if mine:
            ckpt.rewind(ckpt_dir, latest)  # the abandoned trajectory's checkpoints and post-hoc EMA snapshots
            if state.phema is not None:
                discard_after(ckpt_dir / "phema", state.step)
            record = {
                "step": state.step,
                "rollback": rollbacks,
                "from_step": step,
                "event": diverged.event,
                "where": diverged.where,
                "skipped_batches": sorted(state.skip),
            }
            append_jsonl(params.run_dir(run.name) / "metrics.jsonl", record)
            tracker.set_tags({"rollbacks": rollbacks, "skipped_batches": ",".join(map(str, sorted(state.skip)))})
            if not quiet:
                print(
                    f"[alphaflow] {what}; rolled back to {latest.name} (rollback {rollbacks} of at most "
                    f"{run.max_rollbacks}), skipping global batches {sorted(state.skip)}",
                    flush=True,
                )


def step_name(step):
    return ckpt.step_dir_name(step)


def log_grid(net, params, path, tracker, loader, per_class=8):
    """A class-sorted sample grid of `net` (one row per class) as a PNG, logged to MLflow; returns its path."""
    decoder = build_encoder(**params.encoder_args(), device=next(net.parameters()).device)
    images = class_grid(net, decoder, loader.num_classes, per_class)
    grid = save_grid(images, path, nrow=per_class, scale=2 if images.shape[-1] < 64 else 1)
    tracker.log_artifact(grid, "samples")
    return grid
