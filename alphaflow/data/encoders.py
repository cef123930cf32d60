"""Image encoders: pixel-space identity and the SD-VAE (paper Table 3: sd-vae-ft-ema).

An encoder maps uint8 images [B,C,H,W] to a diagonal Gaussian posterior (mean, logvar) and
decodes latents back to uint8 images. There is no 0.18215 scale: latents are normalised per
element from dataset statistics instead (latents.finalize_latents).

The SD-VAE weights (`stabilityai/sd-vae-ft-ema`) always come from a local directory: the
`path` argument or $ALPHAFLOW_VAE_PATH. Nothing is downloaded at run time.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch

from alphaflow.errors import MissingInputError

VAE_ENV = "ALPHAFLOW_VAE_PATH"
VAE_REPO = "stabilityai/sd-vae-ft-ema"
ENCODERS = ("identity", "sd-vae-ft-ema", "sd-vae-official")
OFFICIAL_VAE_FILE = "sd_vae_ft_ema.pt"  # the released SD-VAE in the authors' snapshot format


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float() / 127.5 - 1.0


ROUNDINGS = ("round", "truncate")


def to_uint8(x: torch.Tensor, rounding: str = "round") -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], clamped. rounding "round" (this project's default protocol) or
    "truncate" (the official α-Flow/ADM protocol: `((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)`)."""
    y = (x.float() + 1.0) * 127.5
    if rounding == "round":
        y = y.round()
    elif rounding != "truncate":
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return y.clamp(0, 255).to(torch.uint8)


def official_real_round_trip(images: torch.Tensor) -> torch.Tensor:
    """Real images as the official evaluation hands them to its detectors (its `rearrange_videos`): uint8 →
    float32 `x·(2/255) − 1` → an area resize to their own size (the identity, left out) → `(x + 1)·127.5`,
    clamped and truncated to uint8. In float32 this maps pixel values 1–47 to 0–46 and keeps the others;
    generated images skip it. The same in-place float32 operations, in the same order, as the official code."""
    _check_images(images)
    x = images.float().mul_(2 / 255).sub_(1)
    return x.add_(1).mul_(255 / 2).clamp_(0, 255).to(torch.uint8)


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images [B,C,H,W], got {images.dtype} {tuple(images.shape)}")


# ----------------------------------------------------------------------------
# Pixel space.


class IdentityEncoder:
    """Pixel space: the 'latent' is the image scaled to [-1, 1]; no posterior noise."""

    name = "identity"
    fingerprint = "identity"  # resume/provenance key

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        _check_images(images)
        return _to_unit(images.to(self.device)), None  # [B,C,H,W], no logvar

    def decode(self, latents: torch.Tensor, rounding: str = "round") -> torch.Tensor:
        return to_uint8(latents, rounding)  # [B,C,H,W] uint8

    def latent_shape(self, image_shape) -> tuple[int, int, int]:
        return tuple(int(s) for s in image_shape)


# ----------------------------------------------------------------------------
# SD-VAE (diffusers AutoencoderKL).


class VAEEncoder:
    """diffusers AutoencoderKL: posterior mean/logvar, unscaled (no 0.18215, as the official code)."""

    name = "sd-vae-ft-ema"

    def __init__(self, vae, device="cpu", fingerprint: str | None = None):
        self.device = torch.device(device)
        self.fingerprint = fingerprint or self.name  # sha256 of the weight files
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        # fmt: off
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)          # 8 for sd-vae-ft-ema
        self.channels = int(vae.config.latent_channels)                      # 4
        self.in_channels = int(vae.config.in_channels)                       # 3
        # fmt: on

    def _autocast(self):
        # bf16 autocast only on CUDA ; CPU stays float32.
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_images(images)
        x = _to_unit(images.to(self.device))  # [B,C,H,W] in [-1,1]
        if x.shape[1] == 1 and self.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB  [B,3,H,W]
        with self._autocast():
            posterior = self.vae.encode(x).latent_dist
        return posterior.mean.float(), posterior.logvar.float()  # [B,4,H/8,W/8] each

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, rounding: str = "round") -> torch.Tensor:
        """rounding: see to_uint8 (the evaluation protocol's)."""
        with self._autocast():
            x = self.vae.decode(latents.to(self.device, torch.float32)).sample  # [B,3,H,W]
        return to_uint8(x, rounding)

    def latent_shape(self, image_shape) -> tuple[int, int, int]:
        _, h, w = image_shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"image size {h}×{w} is not divisible by the VAE's factor {self.factor}")
        return (self.channels, h // self.factor, w // self.factor)


def resolve_vae_path(path=None) -> Path:
    """A directory with config.json + weights; accepts a plain directory, a Stable Diffusion
    pipeline directory (vae/ sub-folder), a hub cache `models--stabilityai--sd-vae-ft-ema`
    directory or a hub cache root holding it."""
    given = path if path is not None else os.environ.get(VAE_ENV)
    if not given:
        raise MissingInputError(_missing_vae_message(None))
    root = Path(given).expanduser()
    candidates = [root, root / "vae"]
    for hub in (root, root / ("models--" + VAE_REPO.replace("/", "--"))):
        candidates += _hub_snapshots(hub)
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise MissingInputError(_missing_vae_message(root))


def _hub_snapshots(hub: Path) -> list[Path]:
    """Snapshot directories of a hub cache entry, the one refs/main points to first."""
    snapshots = hub / "snapshots"
    if not snapshots.is_dir():
        return []
    ref = hub / "refs" / "main"
    first = [snapshots / ref.read_text().strip()] if ref.is_file() else []
    return first + sorted(p for p in snapshots.iterdir() if p.is_dir())


def _missing_vae_message(path) -> str:
    where = (
        f"No VAE config.json found under {path}"
        if path is not None
        else f"No VAE path given (argument `path` or environment variable {VAE_ENV})"
    )
    return (
        f"{where}. The {VAE_REPO} weights are never downloaded at run time. On a machine with "
        f"internet run `huggingface-cli download {VAE_REPO} --local-dir <dir>` (or `hf download "
        f"{VAE_REPO} --local-dir <dir>`), copy <dir> here and pass it as the VAE path or set "
        f"{VAE_ENV}=<dir>."
    )


def load_vae(path=None):
    """(AutoencoderKL, fingerprint) from a local directory only (local_files_only=True)."""
    from diffusers import AutoencoderKL  # imported lazily: the identity path does not need it

    directory = resolve_vae_path(path)
    # low_cpu_mem_usage=False: the default needs `accelerate` and warns without it.
    vae = AutoencoderKL.from_pretrained(str(directory), local_files_only=True, low_cpu_mem_usage=False)
    return vae, _directory_fingerprint(directory)


def _directory_fingerprint(directory: Path) -> str:
    """sha256 over config.json and the weight files: latents from other weights are not reused."""
    h = hashlib.sha256()
    files = [directory / "config.json"] + sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return f"{VAEEncoder.name}:{h.hexdigest()}"


# ----------------------------------------------------------------------------


def build_encoder(
    kind: str,
    *,
    path: str | None = None,  # VAE dir; None = $ALPHAFLOW_VAE_PATH
    device="cpu",
):
    """Encoder by name: "identity", "sd-vae-ft-ema" (a diffusers folder) or "sd-vae-official" (the released
    sd_vae_ft_ema.pt; path relative to $ALPHAFLOW_RELEASED)."""
    if kind == "identity":
        return IdentityEncoder(device)
    if kind == "sd-vae-ft-ema":
        vae, fingerprint = load_vae(path)
        return VAEEncoder(vae, device, fingerprint)
    if kind == "sd-vae-official":  # the authors' file: no diffusers folder needed (config kept in the package)
        from alphaflow.config import released_path
        from alphaflow.io import sha256_file
        from alphaflow.official import load_official_vae

        file = released_path(path or OFFICIAL_VAE_FILE)
        if not file.is_file():
            raise MissingInputError(
                f"{file}: the released SD-VAE ({OFFICIAL_VAE_FILE} of Hugging Face "
                "snap-research/alphaflow) is not there; put it in released/ or in "
                "$ALPHAFLOW_RELEASED, or give encoder.path"
            )
        return VAEEncoder(load_official_vae(file), device, f"{VAEEncoder.name}:official:{sha256_file(file)}")
    raise ValueError(f"unknown encoder {kind!r}; choose one of {ENCODERS}")
