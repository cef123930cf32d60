"""ADM (guided-diffusion) evaluator batches: the reference statistics of `eval.protocol: adm` and sample exports.

The DiT, SiT and MeanFlow papers report FID against ADM's `VIRTUAL_imagenet256_labeled.npz` (arrays `mu`,
`sigma`); `load_adm_reference` reads it without pickle. `write_adm_npz` writes a sample set in the batch
format ADM's evaluator reads (`arr_0` uint8 N×H×W×3, `arr_1` labels): `alphaflow export-npz`.
"""

import io
from pathlib import Path

import numpy as np
import torch

from alphaflow.errors import InvalidInputError, MissingInputError
from alphaflow.io import atomic_write_bytes


def load_adm_reference(path):
    """(mu [2048], sigma [2048, 2048]) float64 of an ADM reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz:
    arrays mu, sigma, arr_0), read with allow_pickle=False: a file holding object arrays is refused."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(
            f"ADM reference batch {path} does not exist (params eval.adm_reference): download "
            "VIRTUAL_imagenet256_labeled.npz from openai/guided-diffusion's evaluations page"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("mu", "sigma") if k not in npz.files]
            if missing:
                raise InvalidInputError(
                    f"{path}: not an ADM reference batch, arrays {missing} missing (it holds {npz.files})"
                )
            mu, sigma = npz["mu"], npz["sigma"]
    except ValueError as e:  # object arrays need pickle: never loaded (arbitrary code on load)
        if isinstance(e, InvalidInputError):
            raise
        raise InvalidInputError(
            f"{path}: refused, it holds object arrays (loading them needs allow_pickle, which "
            f"could run arbitrary code): {e}"
        ) from None
    except (OSError, EOFError) as e:
        raise InvalidInputError(f"{path} is not a readable .npz ({e})") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise InvalidInputError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance")
    return mu.astype(np.float64), sigma.astype(np.float64)


def adm_npz_bytes(images, labels=None):
    """An ADM evaluator sample batch as .npz bytes: arr_0 uint8 [N,H,W,3] (grey repeated to RGB) from uint8
    images [N,C,H,W], arr_1 int64 labels [N] when given."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images [N,1|3,H,W], got {images.dtype} {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    arrays = {"arr_0": np.ascontiguousarray(images.permute(0, 2, 3, 1).cpu().numpy())}
    if labels is not None:
        arrays["arr_1"] = np.asarray(torch.as_tensor(labels).cpu().numpy(), dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_adm_npz(path, images, labels=None):
    """Writes an ADM evaluator sample batch (adm_npz_bytes) atomically; returns its sha256."""
    return atomic_write_bytes(path, adm_npz_bytes(images, labels))
