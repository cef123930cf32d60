"""Pre-extracted latents: the latent directory's layout, its statistics, and the training loader.

As in the official code, each image is encoded once (alphaflow.data.encode) and its posterior mean and
log-variance are stored; training draws a fresh posterior sample every epoch, z = mean + exp(logvar/2)·N(0,1);
latents are normalised per element with mean/std arrays of shape [1,c,h,w] estimated from 2048 samples,
z_norm = (z − μ)/√(var + 1e-16). Data loading: one shuffled stream of micro-batches per epoch
(drop_last), dealt round-robin to the W ranks, so the global batch is the same for any W.

Layout of a latent directory:
  latents-00000.safetensors ...  {"mean": f16 [n,c,h,w], "logvar": f16 [n,c,h,w] (absent for identity),
                                  "labels": int64 [n]}; latent shard k encodes prepared shard k
  part-000-of-002.json ...       one resume record per encode part (shard sha256s, data manifest hash)
  manifest.json, stats.safetensors   written by finalize_latents once every part is done

Storage dtype is float16 (STORE_DTYPE): ImageNet's 1.28M × 4×32×32 mean + logvar is 21 GB
(42 GB in float32), which LatentLoader memory-maps: the ranks of a node share one copy in the
page cache, and each rank reads the samples its micro-batches need. float16 keeps 11 significant bits
(relative error ≤ 4.9e-4, e.g. ≤ 0.004 at |z| ≈ 8); pixel-space values k/127.5 − 1 still decode back to the
exact uint8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from alphaflow.errors import InvalidInputError

from .shards import MANIFEST, ShardError, map_shard, read_manifest, read_shard

STORE_DTYPE = np.float16
SHARD_NAME = "latents-{:05d}.safetensors"
PART_NAME = "part-{:03d}-of-{:03d}.json"
STATS = "stats.safetensors"
# fmt: off
STATS_EPS = 1e-16               # official code: (z − μ)/√(var + 1e-16); std below includes it
STD_FLOOR = 0.1                 # std >= STD_FLOOR · median(std); see alphaflow.data.encode
# fmt: on
NOISE_STREAM, SHUFFLE_STREAM, STATS_STREAM = 1, 2, 3  # independent seed streams


def rebuild_hint(latent_dir) -> str:
    return (
        f"Rebuild it by rerunning `alphaflow encode` for {latent_dir} (every part; shards whose "
        f"checksums match are kept, bad ones are re-encoded), which also re-finalizes the manifest; "
        f"or delete {latent_dir} and encode again."
    )


def stream_seed(*words: int) -> int:
    """A 64-bit seed hashed from integers (numpy SeedSequence), for torch.Generator."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0])


def map_latent_shard(latent_dir: Path, rec: dict) -> dict:
    """A latent shard's arrays, memory-mapped after its sha256 and count are checked against the manifest."""
    arrays = map_shard(latent_dir / rec["file"], sha256=rec["sha256"], hint=rebuild_hint(latent_dir))
    if len(arrays["labels"]) != rec["count"]:
        raise ShardError(
            f"shard {latent_dir / rec['file']} holds {len(arrays['labels'])} latents, "
            f"the manifest says {rec['count']}. {rebuild_hint(latent_dir)}"
        )
    return arrays


def posterior_sample(mean: np.ndarray, logvar: np.ndarray | None, global_index: np.ndarray, stream: tuple):
    """z = mean + exp(logvar/2)·ε, ε ~ N(0,1) seeded by (*stream, global sample index); mean, logvar f16 [B,c,h,w]."""
    # float16 -> float32 in numpy: torch's intra-op threads cost more than they save here
    mean = torch.from_numpy(mean.astype(np.float32))
    if logvar is None:
        return mean
    logvar = torch.from_numpy(logvar.astype(np.float32))
    return mean + torch.exp(0.5 * logvar) * _noise(mean.shape, global_index, stream)


def _noise(shape, global_index, stream: tuple) -> torch.Tensor:
    """ε [B, c, h, w]: one generator per sample, so ε depends only on (stream, sample index),
    not on batch composition, rank count or resume point."""
    eps = torch.empty(shape)
    for row, g in enumerate(global_index):
        gen = torch.Generator().manual_seed(stream_seed(*stream, int(g)))
        eps[row] = torch.randn(shape[1:], generator=gen)
    return eps


def load_latent_stats(latent_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) float32 [1,c,h,w] from stats.safetensors (sha256 checked against the manifest)."""
    latent_dir = Path(latent_dir)
    manifest = read_latent_manifest(latent_dir)
    arrays = read_shard(
        latent_dir / manifest["stats"]["file"], sha256=manifest["stats"]["sha256"], hint=rebuild_hint(latent_dir)
    )
    return torch.from_numpy(arrays["mean"]), torch.from_numpy(arrays["std"])


def read_latent_manifest(latent_dir) -> dict:
    latent_dir = Path(latent_dir)
    manifest = read_manifest(
        latent_dir, hint=f"Run `alphaflow encode` for {latent_dir} (it ends with finalize, which writes the manifest)."
    )
    if manifest.get("kind") != "latents":
        raise ShardError(f"{latent_dir / MANIFEST} is not a latent manifest (kind={manifest.get('kind')!r})")
    return manifest


# ----------------------------------------------------------------------------
# Training loader (the official code's latent sampling).


class LatentLoader:
    """Infinite iterator of micro-batches (x float32 [B,c,h,w], y int64 [B]) for one DDP rank.

    One global stream, the same for every world size W: epoch e shuffles all N latents with (seed, e)
    and cuts them into N // B micro-batches (the last partial one dropped); micro-batch j of the stream
    is number j mod (N // B) of epoch j // (N // B). Rank r takes micro-batches r, W + r, 2W + r, …
    So W ranks with gradient accumulation a see, at every optimiser step, the same a·W micro-batches
    as one process with accumulation a·W: the global batch does not depend on how it is split.
    x is a fresh posterior sample per epoch, seeded by (seed, epoch, global index), so a resumed
    loader yields bit-identical batches. Shards are memory-mapped: any rank reads any sample, and
    the ranks of a node share one copy in the page cache.
    """

    def __init__(self, latent_dir, batch_size: int, *,
                 seed: int,                                # drives shuffle and posterior noise
                 rank: int = 0,                            # this process's DDP rank
                 world_size: int = 1,                      # number of DDP ranks
                 device="cpu",                             # where batches are delivered
                 ):  # fmt: skip
        if not (0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size <= 0 or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"need batch_size > 0 and an integer seed >= 0, got {batch_size}, {seed!r}")
        self.latent_dir, self.batch_size, self.seed = Path(latent_dir), batch_size, seed
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.manifest = read_latent_manifest(self.latent_dir)
        self.num_classes = self.manifest["num_classes"]
        # fmt: off
        self.latent_shape = tuple(self.manifest["latent_shape"])             # (c, h, w)
        self.num_samples = self.manifest["count"]                            # N, all ranks together
        self.batches_per_epoch = self.num_samples // batch_size              # of the global stream
        # fmt: on
        if self.batches_per_epoch == 0:
            raise InvalidInputError(
                f"{self.latent_dir}: {self.num_samples} latents are fewer than one "
                f"micro-batch of {batch_size}; lower the batch size or use more data"
            )
        self._shards = [map_latent_shard(self.latent_dir, rec) for rec in self.manifest["shards"]]
        counts = [rec["count"] for rec in self.manifest["shards"]]
        if sum(counts) != self.num_samples:
            raise ShardError(
                f"{self.latent_dir / MANIFEST}: its shards hold {sum(counts)} latents, its count says "
                f"{self.num_samples}. {rebuild_hint(self.latent_dir)}"
            )
        self._starts = np.cumsum([0] + counts)  # first global index per shard
        self._labels = np.concatenate([np.asarray(a["labels"]) for a in self._shards])  # [N] int64
        self.taken = 0  # micro-batches this rank took
        self._perm_epoch, self._perm = None, None
        self.last_index = None  # global indices of the last batch

    def _permutation(self, epoch: int) -> np.ndarray:
        """The epoch's shuffle of all N latents (the trailing 0 keeps earlier single-process runs' stream)."""
        if self._perm_epoch != epoch:
            rng = np.random.default_rng(stream_seed(self.seed, SHUFFLE_STREAM, epoch, 0))
            self._perm, self._perm_epoch = rng.permutation(self.num_samples), epoch
        return self._perm

    def _gather(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `index` (global) of the shards' latent arrays ("mean", and "logvar" when stored), in order."""
        shard = np.searchsorted(self._starts, index, side="right") - 1
        out = {
            name: np.empty((len(index), *a.shape[1:]), a.dtype)
            for name, a in self._shards[0].items()
            if name in ("mean", "logvar")
        }
        for k in np.unique(shard):
            sel = shard == k
            for name in out:
                out[name][sel] = self._shards[k][name][index[sel] - self._starts[k]]
        return out

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.taken * self.world_size + self.rank  # this rank's next global micro-batch
        epoch, position = divmod(j, self.batches_per_epoch)
        b = self.batch_size
        index = self._permutation(epoch)[position * b : (position + 1) * b]  # global indices [B]
        self.taken += 1
        rows = self._gather(index)
        x = posterior_sample(rows["mean"], rows.get("logvar"), index, (self.seed, NOISE_STREAM, epoch))  # [B,c,h,w]
        y = torch.from_numpy(self._labels[index])  # [B]
        self.last_index = index
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict:
        return {"taken": self.taken, "seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise InvalidInputError(
                    f"loader state was saved with {key}={state[key]}, this loader has "
                    f"{getattr(self, key)}; exact resume needs the same value"
                )
        if "taken" in state:
            self.taken = int(state["taken"])
        elif state.get("world_size", 1) == 1:  # a checkpoint of the per-rank loader (before the global stream)
            self.taken = int(state["epoch"]) * self.batches_per_epoch + int(state["position"])
        else:
            raise InvalidInputError(
                f"loader state {state} comes from the per-rank loader of a {state['world_size']}-"
                f"process run, whose stream this version does not reproduce; start the run "
                f"again (delete its checkpoints)"
            )


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
    # blow up on the images where it is not: floor at STD_FLOOR × the median std, as finalize_latents does.
    std = std.clamp_min(STD_FLOOR * float(std.median()))
    return x.mean(0, keepdim=True).float(), std.float()
