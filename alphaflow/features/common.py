"""What every feature extractor shares: the uint8 input it takes, the local weights file it loads (never a
download), and the error for a weights file that is not the published one."""

import os
from pathlib import Path

import torch

from alphaflow.errors import MissingInputError, UserError


class WeightsMismatchError(UserError):
    """A weights file is not the published one (wrong hash or not a plain state_dict); refused unloaded."""


def to_rgb_uint8(x):
    """Checks uint8 [N, C, H, W] with C in (1, 3); grey → RGB by repetition."""
    if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4):
        raise ValueError(
            f"expected a uint8 tensor [N, C, H, W], got {getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}"
        )
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]}")
    return x


def resolve_file(weights_path, env, what, how):
    """weights_path, else $env; a missing file raises one error saying where to get it."""
    path = weights_path or os.environ.get(env)
    if path and Path(path).is_file():
        return Path(path)
    where = f"{path!r} does not exist" if path else f"no weights path given and ${env} is not set"
    raise MissingInputError(f"{what}: {where}. {how} Then pass weights_path=... or set {env}=/path/to/file.")
