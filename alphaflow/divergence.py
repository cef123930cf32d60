"""Where in t a run's loss goes wrong, and what a diverging run does (params `divergence`).

Large guided MeanFlow and α-Flow runs go unstable now and then (the paper's limitations, App. B and C). Two tools:

- **The per-t-bucket loss.** Every logged record carries the loss of the window's samples split into
  `BUCKETS` equal buckets of t (`loss_t0` … `loss_t7`: t ∈ [k/8, (k+1)/8)) and of t − r (`loss_dt0` … `loss_dt7`),
  so a spike's location shows in the curves (plots.training_curves_figure) and in MLflow.
- **The policy** (`divergence: off | stop | rollback`). An *event* is an optimizer step whose gradient norm is
  non-finite, or, with `spike_factor`, larger than `spike_factor` × the running mean of the finite norms. When
  `divergence_events` events fall within `divergence_window` steps:
  - `off`: nothing more than before (non-finite gradients are zeroed and counted; `max_bad_steps` in a row abort);
  - `stop`: the run ends with one line naming the step, the event and the t bucket (`Diverged`, exit 2);
  - `rollback`: the run restores its newest checkpoint from before the window's first event and skips the global
    batches of those events from then on, so it continues on a trajectory that equals a fresh run with
    `skip_batches` = the skipped batches. Each rollback is a record in metrics.jsonl and tags on the MLflow run;
    after `max_rollbacks` it stops as `stop`.

The gradient norm is the same number on every rank (DDP all-reduces the gradients before it), so every rank
takes the same decision without a collective. The monitor's state is saved in checkpoints (exact resume).

Fault injection for tests and drills: `ALPHAFLOW_FAULT_NONFINITE=25,40` makes the loss of the largest-t sample of
global batches 25 and 40 NaN (a "poison batch"), deterministically.
"""

import math
import os
from collections import deque

from alphaflow.errors import UserError

# torch is imported inside the two functions that need it: the report's plots read the bucket names from here
# on a login node without importing torch.

BUCKETS = 8
FAULT_ENV = "ALPHAFLOW_FAULT_NONFINITE"
POLICIES = ("off", "stop", "rollback")


class Diverged(UserError):
    """A run whose loss diverged under `divergence: stop` (or after `max_rollbacks` rollbacks)."""


# ----------------------------------------------------------------------------
# The per-t-bucket loss


def bucket_index(x, n=BUCKETS):
    """Bucket k of x ∈ [0, 1]: [k/n, (k+1)/n), with x = 1 in the last bucket."""
    return (x.detach().float() * n).long().clamp_(0, n - 1)


def bucket_keys(n=BUCKETS):
    return [f"loss_t{k}" for k in range(n)] + [f"loss_dt{k}" for k in range(n)]


def bucket_sums(loss, t, r, n=BUCKETS):
    """(sums [2n], counts [2n]) of the per-sample `loss` over the buckets of t, then of t − r (float64)."""
    import torch

    loss = loss.detach().to(torch.float64)
    index = torch.cat([bucket_index(t, n), n + bucket_index(t - r, n)])
    sums = torch.zeros(2 * n, dtype=torch.float64, device=loss.device).index_add_(0, index, loss.repeat(2))
    counts = torch.zeros(2 * n, dtype=torch.float64, device=loss.device).index_add_(
        0, index, torch.ones_like(loss).repeat(2)
    )
    return sums, counts


def bucket_means(sums, counts, n=BUCKETS):
    """{loss_t<k>: mean, loss_dt<k>: mean} of the buckets that saw a sample."""
    return {key: float(s / c) for key, s, c in zip(bucket_keys(n), sums.tolist(), counts.tolist()) if c > 0}


def bucket_label(key, n=BUCKETS):
    """'t ∈ [0.875, 1]' for loss_t7, 't − r ∈ [0, 0.125)' for loss_dt0."""
    var, k = ("t − r", int(key[7:])) if key.startswith("loss_dt") else ("t", int(key[6:]))
    hi = "1]" if k == n - 1 else f"{(k + 1) / n:g})"
    return f"{var} ∈ [{k / n:g}, {hi}"


def worst_bucket(step_means, window_means):
    """The t bucket that explains a bad step best: a non-finite one, else the largest ratio of this step's loss to
    the window's (or the largest loss when the window has none); a phrase for the message."""
    t_keys = [k for k in step_means if k.startswith("loss_t")]
    bad = [k for k in t_keys if not math.isfinite(step_means[k])]
    if bad:
        return "non-finite loss in " + ", ".join(bucket_label(k) for k in bad)
    if not t_keys:
        return "no samples"

    def ratio(k):
        ref = window_means.get(k)
        return step_means[k] / ref if ref and math.isfinite(ref) and ref > 0 else step_means[k]

    key = max(t_keys, key=ratio)
    ref = window_means.get(key)
    return f"largest loss in {bucket_label(key)}: {step_means[key]:.4g}" + (
        f" (window mean {ref:.4g})" if ref is not None else ""
    )


def fault_batches():
    """The global batch indices whose loss ALPHAFLOW_FAULT_NONFINITE poisons (empty without it)."""
    value = os.environ.get(FAULT_ENV, "").strip()
    try:
        return frozenset(int(b) for b in value.split(",") if b.strip())
    except ValueError:
        raise UserError(f"{FAULT_ENV}={value!r}: expected comma-separated batch indices, e.g. 25,40") from None


def poison(loss, t):
    """The per-sample loss with its largest-t sample scaled by NaN (fault injection): its value and, through the
    backward pass, the step's gradient become non-finite, as in a real blow-up."""
    import torch

    scale = torch.ones_like(loss).index_fill_(0, t.argmax().reshape(1), float("nan"))
    return loss * scale


# ----------------------------------------------------------------------------
# The policy


class Monitor:
    """Counts events (non-finite or spiking gradient norms) per global batch and says when the policy acts.

    observe(batch, norm) → None, or the event's description when the events within the window reached the limit
    (the caller stops or rolls back). `events` holds the batch indices of the window's events."""

    def __init__(self, policy="off", window=100, max_events=1, spike_factor=None, max_rollbacks=5):
        if policy not in POLICIES:
            raise ValueError(f"divergence policy {policy!r}; one of {POLICIES}")
        self.policy, self.window, self.max_events = policy, window, max_events
        self.spike_factor, self.max_rollbacks = spike_factor, max_rollbacks
        # fmt: off
        self.events = deque()       # (step, batch) of the events within the window
        self.norm_mean = None       # running mean of the finite, non-spiking gradient norms
        # fmt: on
        self.norm_n = 0
        self.rollbacks = 0

    def is_spike(self, norm):
        return (
            self.spike_factor is not None and self.norm_n >= self.window and norm > self.spike_factor * self.norm_mean
        )

    def observe(self, step, batch, norm):
        """Records the gradient norm of optimizer step `step` (global batch `batch`); returns None, or a phrase
        describing the event that reached the limit."""
        finite = math.isfinite(norm)
        event = (
            None
            if finite and not self.is_spike(norm)
            else (
                "non-finite gradient norm"
                if not finite
                else f"gradient norm {norm:.4g} > {self.spike_factor:g} × its running mean {self.norm_mean:.4g}"
            )
        )
        if event is None:
            # A running mean over about `window` steps (exact mean until then)
            self.norm_n += 1
            w = 1.0 / min(self.norm_n, self.window)
            self.norm_mean = norm if self.norm_mean is None else (1 - w) * self.norm_mean + w * norm
        else:
            self.events.append((step, batch))
        while self.events and self.events[0][0] <= step - self.window:
            self.events.popleft()
        if event is None or self.policy == "off" or len(self.events) < self.max_events:
            return None
        return event

    def take_events(self):
        """(the first event's step, the events' global batches) of the window (a rollback returns to a checkpoint
        at or before that step and skips those batches); the window starts empty."""
        first, batches = min(s for s, _ in self.events), sorted(b for _, b in self.events)
        self.events.clear()
        return first, batches

    def state_dict(self):
        return {
            "events": [list(e) for e in self.events],
            "norm_mean": self.norm_mean,
            "norm_n": self.norm_n,
            "rollbacks": self.rollbacks,
        }

    def load_state_dict(self, d):
        self.events = deque(tuple(e) for e in d.get("events", []))
        self.norm_mean, self.norm_n = d.get("norm_mean"), d.get("norm_n", 0)
        self.rollbacks = d.get("rollbacks", 0)


def monitor_for(run):
    return Monitor(run.divergence, run.divergence_window, run.divergence_events, run.spike_factor, run.max_rollbacks)
