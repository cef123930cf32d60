"""Model zoo: DiT presets conditioned on (t, t − r)."""

from alphaflow.models.dit import DiT, PRESETS, build_model

__all__ = ["DiT", "PRESETS", "build_model"]
