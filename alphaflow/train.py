"""One training run from a params entry, as the paper trains (paper Table 3).

    alphaflow train --params params/default.yaml --run alphaflow-T-4

Adam (β = 0.9, 0.95), lr warm-up, global batch split into per-device micro-batches with gradient
accumulation, NaN/Inf gradients zeroed and counted, global-norm clip, EMA with a ramped half-life,
DDP from the environment, atomic checkpoints with exact resume, SIGTERM/SIGUSR2 → checkpoint + requeue
exit code, MLflow + metrics.jsonl with the loss per t bucket. A diverging run stops or rolls back to its last
checkpoint (params `divergence`, alphaflow.divergence). Starting a run whose folder has a checkpoint resumes it.
This module is the loop; the step is alphaflow.train_step's, the state and its checkpoints alphaflow.train_state's.
"""

import contextlib
import signal
import time

import torch
import yaml
from tqdm import tqdm

from alphaflow import checkpoint as ckpt
from alphaflow import distributed, runlock
from alphaflow.config import ParamsError
from alphaflow.data import LatentLoader
from alphaflow.divergence import Diverged, bucket_means, fault_batches
from alphaflow.errors import REQUEUE_EXIT_CODE
from alphaflow.io import atomic_write_bytes
from alphaflow.jsonl import append_jsonl
from alphaflow.objectives import gradient_conflict, sample_times
from alphaflow.phema import discard_after, save_snapshot
from alphaflow.released import import_released
from alphaflow.run_folder import discard_stale, train_fingerprint
from alphaflow.tracking import Tracker, git_commit, metric_key
from alphaflow.train_state import checkpoint, finish, save, setup, start
from alphaflow.train_step import DivergenceEvent, skip_batch, train_step


class Preempted(SystemExit):
    """Raised after the checkpoint is written on SIGTERM/SIGUSR2; exits with REQUEUE_EXIT_CODE."""


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
# Tracking and logging


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
