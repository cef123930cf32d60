"""One training run from a params entry, as the paper trains (paper Table 3).

    alphaflow train --params params/default.yaml --run alphaflow-T-4

Adam (β = 0.9, 0.95), lr warm-up, global batch split into per-device micro-batches with gradient
accumulation, NaN/Inf gradients zeroed and counted, global-norm clip, EMA with a ramped half-life,
DDP from the environment, atomic checkpoints with exact resume, SIGTERM/SIGUSR2 → checkpoint + requeue
exit code, MLflow + metrics.jsonl. Starting a run whose folder has a checkpoint resumes it.
"""

import contextlib
import json
import math
import os
import shutil
import signal
import time

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from alphaflow import checkpoint as ckpt
from alphaflow import distributed, runlock
from alphaflow.config import ParamsError
from alphaflow.errors import REQUEUE_EXIT_CODE
from alphaflow.data import LatentLoader
from alphaflow.io import atomic_write_bytes, sha256_file
from alphaflow.ema import EMA
from alphaflow.phema import PowerEMA, save_snapshot
from alphaflow.models import build_model
from alphaflow.objectives import alpha_flow_loss, drop_labels, gradient_conflict, sample_times
from alphaflow.provenance import TRAIN_VOLATILE, file_hash, fingerprint, latents_content_hash, stage_reads
from alphaflow.tracking import Tracker, append_jsonl, git_commit, metric_key, truncate_jsonl

LOG_KEYS = ("loss", "L_TFM", "L_TC", "L_sum", "delta_sq")


class Preempted(SystemExit):
    """Raised after the checkpoint is written on SIGTERM/SIGUSR2; exits with REQUEUE_EXIT_CODE."""


def learning_rate(run, step):
    """Linear warm-up from lr/1e4 to lr over warmup_steps, then constant (official code: num_warmup_steps)."""
    if step >= run.warmup_steps:
        return run.lr
    return run.lr * (1e-4 + (1 - 1e-4) * step / run.warmup_steps)


#----------------------------------------------------------------------------
# Set-up


def batch_split(run, world_size):
    """(per-device batch, micro-batch, accumulation steps) with clear errors."""
    if run.batch_size % world_size:
        raise ParamsError(f"params key 'runs.{run.name}.batch_size' = {run.batch_size}: not divisible by the "
                          f"{world_size} processes of this job (change batch_size or the job's GPUs/nodes)")
    per_rank = run.batch_size // world_size
    micro = run.micro_batch_size or per_rank
    if per_rank % micro:
        raise ParamsError(f"params key 'runs.{run.name}.micro_batch_size' = {micro}: the per-device batch {per_rank} "
                          f"is not divisible by micro_batch_size {micro}")
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


@torch.no_grad()
def estimate_latent_stats(latent_dir, n, seed, device):
    """Per-element mean/std from n posterior samples (official code: 2048 at the start of training)."""
    loader = LatentLoader(latent_dir, min(n, 256), seed=seed + 7919, device=device)
    xs, count = [], 0
    while count < n:
        x, _ = next(loader)
        xs.append(x.double())
        count += x.shape[0]
    x = torch.cat(xs)[:n]
    std = x.std(0, keepdim=True)
    # A pixel that happens to be constant in these n samples (Fashion-MNIST borders) would get std ≈ 0 and
    # blow up on the images where it is not: floor at 0.1 × the median std, as finalize_latents does.
    std = std.clamp_min(0.1 * float(std.median()))
    return x.mean(0, keepdim=True).float(), std.float()


def build_run_model(run, loader, device):
    c, h, w = loader.latent_shape
    torch.manual_seed(run.seed)
    return build_model(run.model, num_classes=loader.num_classes, input_size=h, in_channels=c,
                       **run.model_overrides).to(device)


def changed_keys(saved, current):
    keys = set(saved) | set(current)
    return sorted(k for k in keys - TRAIN_VOLATILE
                  if json.dumps(saved.get(k), default=list) != json.dumps(current.get(k), default=list))


def train_fingerprint(params, run):
    """What the run's outputs depend on: its settings, the latents' content, the fine-tune source's weights
    (and with eval_every, the classifier and reference images of the in-training FD_clf)."""
    upstream = [latents_content_hash(params.latent_dir())]
    if run.eval_every:  # in-training FD_clf: the classifier and the held-out images it is measured against
        needed = (params.classifier_path(), params.data_dir(params.reference_split()) / "manifest.json")
        upstream += [file_hash(p) if p.exists() else None for p in needed]  # missing: the evaluation says so
    if params.init_file(run.name) is not None:  # a released file: its content
        from alphaflow.released import released_file

        upstream.append("sha256:" + sha256_file(released_file(params, run.name, "init_from")))
    elif run.init_from is not None:
        source = ckpt.read_state(params.run_dir(run.init_from) / "checkpoints" / "final")
        upstream.append(source["fingerprint"] + f"@{source['step']}")
    return fingerprint("train", stage_reads(params, "train", run=run.name), upstream)


def discard_stale(run_dir, latest, fp, run, quiet):
    """Returns the checkpoint to resume from (`latest` when it has this fingerprint), or None after
    clearing the run folder of what other params or data produced.

    Checkpoints, metrics, samples and evaluations of other settings would otherwise be resumed or
    reported under the new ones. Old final weights are kept in superseded/<fingerprint>/ (a rename).
    """
    ckpt_dir = run_dir / "checkpoints"
    old = ckpt.read_state(latest if latest is not None else ckpt_dir / "final", missing_ok=True)
    if latest is not None and old is not None and old.get("fingerprint") == fp:
        return latest
    if not ckpt_dir.exists() and not (run_dir / "metrics.jsonl").exists():
        return None  # a fresh run
    if not quiet:
        why = (f"no checkpoint at or before step {run.steps}" if old is None or old.get("fingerprint") == fp
               else f"trained with other params or data (changed keys: "
                    f"{changed_keys(old.get('run', {}), run.to_dict()) or 'none: upstream data or code'})")
        print(f"[alphaflow] {run.name}: {run_dir}: {why}; starting over", flush=True)
    final = ckpt.read_state(ckpt_dir / "final", missing_ok=True)
    if final is not None:
        keep = run_dir / "superseded" / f"{final.get('fingerprint')}-step{final['step']}"
        shutil.rmtree(keep, ignore_errors=True)
        keep.parent.mkdir(parents=True, exist_ok=True)
        os.replace(ckpt_dir / "final", keep)
    for path in (ckpt_dir, run_dir / "samples", run_dir / "eval", run_dir / "plots", run_dir / "phema"):
        shutil.rmtree(path, ignore_errors=True)
    for path in (run_dir / "metrics.jsonl", run_dir / "mlflow_run_id"):
        path.unlink(missing_ok=True)
    return None


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


def any_rank(flag, device):
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def rank_spread(net):
    """max − min over ranks of a float64 checksum of the weights: 0 when DDP keeps ranks in sync."""
    with torch.no_grad():
        total = sum(p.detach().double().sum() for p in net.parameters())
        both = torch.stack([total, -total]).reshape(2)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return float(both[0] + both[1])


def gather_states(tensor):
    """Every rank's generator state, so rank 0 can checkpoint them all."""
    if not dist.is_initialized():
        return [tensor]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, tensor.cpu())
    return out


#----------------------------------------------------------------------------
# Sample grids (snapshots and the end of training)


@torch.no_grad()
def sample_grid(net, encoder, num_classes, path, per_class=8, t_steps=(1.0, 0.5, 0.0)):
    from alphaflow.images import save_grid
    from alphaflow.sampling import SeededNoise, sample

    classes = min(num_classes, 10)
    device = next(net.parameters()).device
    y = torch.arange(classes, device=device).repeat_interleave(per_class)
    shape = (net.in_channels, net.latent_mean.shape[-2], net.latent_mean.shape[-1])
    noise = SeededNoise(range(len(y)), device=device).randn(shape)
    x = net.denormalize(sample(net, noise, y, list(t_steps)).float())
    images = encoder.decode(x)
    # One row per class: per_class images each.
    return save_grid(images, path, nrow=per_class, scale=2 if images.shape[-1] < 64 else 1)


#----------------------------------------------------------------------------
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


def train(params, run_name, *, device=None, quiet=False, stop_after=None, tracking=True, evaluate=None,
          plot_curves=None):
    """Trains (or resumes) `run_name`; returns a summary dict. stop_after: optional step at which to stop.

    The CLI passes the two pieces that belong to later stages: `evaluate(params, {"ema": net, "raw": net}, device)
    -> {name: value}`, the in-training metrics every `eval_every` steps (evaluate.in_training_metrics), and
    `plot_curves(metrics_jsonl, png, title=...) -> path`, the training curves at the end
    (plots.plot_training_curves); without `plot_curves` no curves are drawn.

    Holds the run lock throughout, from before the checkpoints are read: a second writer of the run (a double
    launch, a requeued job racing its predecessor) ends with runlock.RunLocked (exit 2) instead."""
    params.run(run_name)  # an unknown run: its error, before a lock folder is made
    if distributed.env_info().world_size > 1:
        distributed.init(device)  # the process group run_lock's main_work needs (_train's own call finds it)
    with run_lock(params, run_name):
        return _train(params, run_name, device=device, quiet=quiet, stop_after=stop_after, tracking=tracking,
                      evaluate=evaluate, plot_curves=plot_curves)


def _train(params, run_name, *, device, quiet, stop_after, tracking, evaluate, plot_curves):
    """train's body, under the run lock."""
    run = params.run(run_name)
    if run.checkpoint is not None:  # released weights: imported, not trained
        from alphaflow.released import import_released

        return import_released(params, run_name, quiet=quiet)
    if run.eval_every and evaluate is None:
        raise ParamsError(f"runs.{run_name}.eval_every is {run.eval_every}, but no in-training evaluator was "
                          "given: train through `alphaflow train` or pass evaluate=")
    info, dev = distributed.init(device)
    run_dir = params.run_dir(run_name)
    ckpt_dir = run_dir / "checkpoints"
    fp = train_fingerprint(params, run)
    finished = ckpt.read_state(ckpt_dir / "final", missing_ok=True)
    if finished is not None and finished.get("fingerprint") == fp and finished["step"] == run.steps:
        if info.is_main and not quiet:
            print(f"[alphaflow] {run_name}: already finished ({ckpt_dir / 'final'}, fingerprint {fp})")
        return finished
    with distributed.main_work("clearing outputs of other params") as mine:
        if mine:
            discard_stale(run_dir, ckpt.latest_checkpoint(ckpt_dir, max_step=run.steps), fp, run, quiet)
    latest = ckpt.latest_checkpoint(ckpt_dir, max_step=run.steps)
    run_dir.mkdir(parents=True, exist_ok=True)
    per_rank, micro, accum = batch_split(run, info.world_size)
    latent_dir = params.latent_dir()
    loader = LatentLoader(latent_dir, micro, seed=run.seed, rank=info.rank, world_size=info.world_size, device=dev)
    net = build_run_model(run, loader, dev)
    mean, std = estimate_latent_stats(latent_dir, run.stats_samples, run.seed, dev)
    net.latent_mean.copy_(mean)
    net.latent_std.copy_(std)
    ema = EMA(net, run.ema_halflife, run.ema_rampup)
    # Post-hoc EMA: power-function EMAs of the raw weights, snapshotted every phema_every steps.
    phema = PowerEMA(net, run.phema_sigma_rels) if run.phema_every else None
    fused = dev.type == "cuda"
    opt = torch.optim.Adam(net.parameters(), lr=run.lr, betas=tuple(run.betas), eps=run.adam_eps, weight_decay=0.0,
                           fused=fused or None)
    # One generator stream for the whole global batch, the same on every rank (see micro_batch_draws).
    gen = torch.Generator(dev).manual_seed(run.seed * 1000)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else contextlib.nullcontext

    # Resume (the same fingerprint: a kill, a requeue, or more steps for a finished run), or fine-tune
    # from another run, or start fresh.
    start_step, bad_total, window, ema_offset = 0, 0, {}, 0
    if latest is not None:
        state, rng = ckpt.load_checkpoint(latest, net=net, ema=ema, optimizer=opt, device=dev, phema=phema)
        loader.load_state_dict(state["loader"])
        gen.set_state(rng[f"gen.{info.rank}"].to(torch.uint8))
        start_step, bad_total, window = state["step"], state["bad_total"], state.get("window", {})
        ema_offset = state.get("ema_step_offset", 0)
        with distributed.main_work("truncating metrics.jsonl") as mine:
            if mine:
                truncate_jsonl(run_dir / "metrics.jsonl", start_step)
                if not quiet:
                    print(f"[alphaflow] {run_name}: resuming from {latest.name} (step {start_step} of {run.steps})")
    elif params.init_file(run_name) is not None:  # a released snapshot (e.g. the XL/2 that XL/2+ fine-tunes)
        from alphaflow.official import load_official_weight_sets
        from alphaflow.released import released_file

        source = released_file(params, run_name, "init_from")
        sets = load_official_weight_sets(source, loader.num_classes)
        net.load_state_dict({k: v.to(dev) for k, v in sets["raw"].items()})
        ema.load_state_dict({k: v.to(dev) for k, v in sets["ema"].items()})
        # The snapshot's step is not known: the EMA continues with its full half-life (ramp-up complete).
        ema_offset = math.ceil(run.ema_halflife / run.ema_rampup) if run.ema_rampup else 0
        if info.is_main and not quiet:
            print(f"[alphaflow] {run_name}: fine-tuning from the released {source} (EMA at its full half-life)")
    elif run.init_from is not None:
        source = params.run_dir(run.init_from) / "checkpoints" / "final"
        net.load_state_dict(ckpt.load_weights(source, "raw", dev))
        ema.load_state_dict(ckpt.load_weights(source, "ema", dev))
        # The fine-tune continues the source's EMA with its full half-life: its ramp-up counts the source's
        # steps too (restarting at 0 would set β = 0 and throw the loaded EMA away at the first update).
        ema_offset = ckpt.read_state(source)["step"]
        if info.is_main and not quiet:
            print(f"[alphaflow] {run_name}: fine-tuning from {source} (EMA continues at step {ema_offset})")

    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if fused else None) \
        if info.world_size > 1 else net
    # torch.compile (params `compile`): the gradient forward (with its tangent pass) and the no-grad teachers.
    forward, teacher = (torch.compile(ddp), torch.compile(net)) if run.compile else (ddp, net)

    tracker = Tracker(params.tracking_uri(), params.profile, run_name, run_id_file=run_dir / "mlflow_run_id",
                      tags={"method": run.method, "scale": run.model, "profile": params.profile,
                            "git_commit": git_commit(), "paper_row": str(run.paper_row)},
                      enabled=tracking and info.is_main)
    with distributed.main_work("writing params.yaml") as mine:
        if mine:
            resolved = yaml.safe_dump({"run": run.to_dict(), "profile": params.profile,
                                       "data": params.raw["data"], "encoder": params.raw["encoder"]}, sort_keys=False)
            atomic_write_bytes(run_dir / "params.yaml", resolved.encode())
            if start_step == 0:
                tracker.log_params(run.to_dict())
            tracker.log_artifact(run_dir / "params.yaml")

    conflict_batch = None
    with distributed.main_work("loading the gradient-conflict batch", when=run.conflict_every) as mine:
        if mine:
            held = LatentLoader(latent_dir, run.conflict_batch, seed=run.seed + 104729, device=dev)
            hx, hy = next(held)
            hg = torch.Generator(dev).manual_seed(run.seed + 104729)
            ht, hr = sample_times(run.conflict_batch, 0.0, run.time_loc, run.time_scale, generator=hg)
            conflict_batch = (hx, hy, ht.to(dev), hr.to(dev), torch.randn(hx.shape, generator=hg, device=dev))

    signals = SignalFlag()
    last_step = run.steps if stop_after is None else min(run.steps, stop_after)
    bar = tqdm(total=run.steps, initial=start_step, disable=quiet or not info.is_main, desc=run_name,
               dynamic_ncols=True, smoothing=0.1)
    sums = {k: torch.tensor(window.get(k, 0.0), device=dev, dtype=torch.float64) for k in LOG_KEYS}
    window_n = window.get("n", 0)
    bad_run = 0
    t0, images0 = time.perf_counter(), 0
    params_list = [p for p in net.parameters()]
    step = start_step
    try:
        for step in range(start_step, last_step):
            alpha = run.alpha(step)
            lr = learning_rate(run, step)
            for group in opt.param_groups:
                group["lr"] = lr
            for i in range(accum):
                x, y = next(loader)
                x = net.normalize(x)
                noise, t, r, y = micro_batch_draws(gen, x, y, run, net.null_label, info)
                sync = contextlib.nullcontext() if (i == accum - 1 or info.world_size == 1) else ddp.no_sync()
                with sync, autocast():
                    terms = alpha_flow_loss(
                        forward, x, y, t, r, noise, alpha, omega=run.cfg_omega, kappa=run.cfg_kappa,
                        cfg_interval=run.cfg_interval, null_label=net.null_label, clamp_target=run.clamp_target,
                        weight_eps=run.weight_eps, shift=run.shift, jvp_mode=run.jvp_mode, teacher=teacher)
                    (terms.loss.mean() / accum).backward()
                with torch.no_grad():
                    sums["loss"] += terms.loss.detach().mean() / accum
                    sums["L_TFM"] += terms.tfm.mean() / accum
                    sums["L_TC"] += terms.tc.mean() / accum
                    sums["L_sum"] += (terms.tfm + terms.tc).mean() / accum
                    sums["delta_sq"] += terms.delta_sq.detach().mean() / accum
            # NaN/Inf gradients → zero and count (official code: grad_nan_to_num); then the global-norm clip.
            norm = torch.nn.utils.get_total_norm([p.grad for p in params_list if p.grad is not None])
            if not bool(torch.isfinite(norm)):
                for p in params_list:
                    if p.grad is not None:
                        torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
                bad_total, bad_run = bad_total + 1, bad_run + 1
                if bad_run >= run.max_bad_steps:
                    raise RuntimeError(f"{run_name}: {bad_run} consecutive steps with NaN/Inf gradients at step "
                                       f"{step}; aborting (lower lr, check the data, or raise max_bad_steps)")
            else:
                bad_run = 0
            if run.grad_clip is not None:
                torch.nn.utils.clip_grads_with_norm_(params_list, run.grad_clip, norm) if bool(torch.isfinite(norm)) \
                    else torch.nn.utils.clip_grad_norm_(params_list, run.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(net, ema_offset + step)
            done = step + 1
            if phema is not None:  # t counts this run's images (a fine-tune's profiles start at its first step)
                phema.update(net, t=done * run.batch_size, dt=run.batch_size)
                if done % run.phema_every == 0 or done == run.steps:
                    with distributed.main_work(f"the post-hoc EMA snapshot at step {done}") as mine:
                        if mine:
                            save_snapshot(ckpt_dir / "phema", phema, done, done * run.batch_size,
                                          getattr(torch, run.phema_dtype))
            window_n += 1
            images0 += run.batch_size
            bar.update(1)

            log_now = done % run.log_every == 0 or done == last_step
            spread = rank_spread(net) if log_now and info.world_size > 1 else None
            with distributed.main_work(f"logging step {done}", when=log_now) as mine:
                if mine:
                    elapsed = time.perf_counter() - t0
                    record = {"step": done, "alpha": alpha, "fm_ratio": run.fm_ratio, "lr": lr,
                              "grad_norm": float(norm), "bad_steps": bad_total,
                              "images_per_s": images0 / max(elapsed, 1e-9)}
                    if spread is not None:
                        record["rank_param_spread"] = spread
                    record.update({k: float(v) / max(window_n, 1) for k, v in sums.items()})
                    if run.conflict_every and done % run.conflict_every == 0:
                        record.update(gradient_conflict(net, *conflict_batch))
                    append_jsonl(run_dir / "metrics.jsonl", record)
                    tracker.log_metrics({metric_key(k): v for k, v in record.items() if k != "step"}, step=done)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", alpha=f"{alpha:.3f}",
                                    img_s=f"{record['images_per_s']:.0f}")
                    for v in sums.values():
                        v.zero_()
                    window_n, t0, images0 = 0, time.perf_counter(), 0
            eval_now = bool(run.eval_every) and done % run.eval_every == 0
            with distributed.main_work(f"the in-training evaluation at step {done}", when=eval_now) as mine:
                if mine:
                    # In-training FD_clf (metric-vs-step curves); excluded from the images/s window.
                    t_eval = time.perf_counter()
                    scores = evaluate(params, {"ema": ema.module, "raw": net}, str(dev))
                    append_jsonl(run_dir / "metrics.jsonl", {"step": done, **scores})
                    tracker.log_metrics(scores, step=done)
                    t0 += time.perf_counter() - t_eval

            stop = any_rank(signals.received is not None, dev)
            periodic = done % run.checkpoint_every == 0 or done % run.snapshot_every == 0
            # The last step of this call is always saved: the end of the run (final links to it), and
            # --stop-after N (no work since the last periodic checkpoint is lost).
            if periodic or stop or done == last_step:
                save(ckpt_dir, step_name(done), net, ema, opt, gen, loader, run, done, bad_total, sums, window_n,
                     info, fp, ema_offset, phema)
                with distributed.main_work(f"pruning checkpoints / the sample grid at step {done}") as mine:
                    if mine:
                        snaps = {s for s in range(run.snapshot_every, run.steps + 1, run.snapshot_every)}
                        ckpt.prune(ckpt_dir, snaps)
                        if done % run.snapshot_every == 0:
                            log_grid(ema.module, params, run_dir / "samples" / f"grid-{done:07d}.png", tracker, loader)
            if stop:
                if info.is_main:
                    print(f"[alphaflow] {run_name}: {signals.received} at step {done}; checkpoint written, "
                          f"exiting {REQUEUE_EXIT_CODE} for requeue", flush=True)
                tracker.close(status="KILLED")
                raise Preempted(REQUEUE_EXIT_CODE)
    finally:
        bar.close()
        signals.restore()

    summary = {"run": run_name, "step": last_step, "bad_steps": bad_total}
    if last_step == run.steps:
        with distributed.main_work("the final checkpoint, sample grid and training curves") as mine:
            if mine:
                ckpt.publish_final(ckpt_dir, step_name(run.steps))
                grid = log_grid(ema.module, params, run_dir / "samples" / "grid-final.png", tracker, loader)
                summary["grid"] = str(grid)
                if plot_curves is not None:
                    curves = plot_curves(run_dir / "metrics.jsonl", run_dir / "plots" / "training.png",
                                         title=run_name)
                    tracker.log_artifact(curves, "plots")
    tracker.close()
    distributed.barrier()
    return summary


def step_name(step):
    return ckpt.step_dir_name(step)


def save(ckpt_dir, name, net, ema, opt, gen, loader, run, step, bad_total, sums, window_n, info, fp, ema_offset,
         phema=None):
    states = gather_states(gen.get_state())
    with distributed.main_work(f"writing checkpoint {ckpt_dir / name}") as mine:
        if mine:
            state = {"step": step, "bad_total": bad_total, "loader": loader.state_dict(),
                     "fingerprint": fp, "run": run.to_dict(), "world_size": info.world_size,
                     "ema_step_offset": ema_offset,
                     "window": {**{k: float(v) for k, v in sums.items()}, "n": window_n}}
            rng = {f"gen.{r}": s for r, s in enumerate(states)}
            ckpt.save_checkpoint(ckpt_dir, name, net=net, ema=ema, optimizer=opt, rng=rng, state=state, phema=phema)


def log_grid(net, params, path, tracker, loader):
    from alphaflow.data import build_encoder

    enc = params.raw["encoder"]
    encoder = build_encoder(enc["kind"], path=enc.get("path"), device=next(net.parameters()).device)
    grid = sample_grid(net, encoder, loader.num_classes, path)
    tracker.log_artifact(grid, "samples")
    return grid
