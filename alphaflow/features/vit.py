"""The timm ViT extractors, from local checkpoints: DINOv2 ViT-L/14 (the paper's FDD, `dinov2-timm-local`) and
OpenAI's CLIP ViT-B/32 image tower (the paper's FCD, `clip-vit-b32-local`). Weights are safetensors, or
.pth/.bin loaded with weights_only=True."""

import os

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from alphaflow.features.common import WeightsMismatchError, resolve_file, to_rgb_uint8

# fmt: off
ENV_DINOV2_WEIGHTS    = "ALPHAFLOW_DINOV2_WEIGHTS"      # timm / Meta DINOv2 checkpoint (.safetensors/.pth)
ENV_DINOV2_MODEL      = "ALPHAFLOW_DINOV2_MODEL"        # timm model name, default below
ENV_CLIP_WEIGHTS      = "ALPHAFLOW_CLIP_WEIGHTS"        # OpenAI CLIP ViT-B/32 (open_clip .pt/.bin or timm .safetensors)
# fmt: on

DINOV2_DEFAULT_MODEL = "vit_large_patch14_dinov2.lvd142m"  # FDD of the paper (DINOv2 ViT-L/14)
CLIP_MODEL = "vit_base_patch32_clip_224.openai"  # FCD of the paper (CLIP ViT-B/32)
# Overrides of CLIP_MODEL's architecture (timm.create_model kwargs), read at construction; only the tests set it,
# for a tiny random CLIP-shaped ViT (the real 350 MB ViT-B/32 cannot be fetched offline).
CLIP_MODEL_KWARGS = {}


# ----------------------------------------------------------------------------
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
    out = torch.nn.functional.interpolate(
        patches.float().reshape(1, m, m, dim).permute(0, 3, 1, 2),
        scale_factor=(scale, scale),
        mode="bicubic",
        antialias=False,
    )
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
        feature_extractor_weights_path=None,  # None = $ALPHAFLOW_DINOV2_WEIGHTS
        dinov2_model_name=None,  # None = $ALPHAFLOW_DINOV2_MODEL, else ViT-L/14 lvd142m
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
        return resolve_file(
            weights_path,
            ENV_DINOV2_WEIGHTS,
            "DINOv2 weights not found",
            "Get timm's vit_large_patch14_dinov2.lvd142m model.safetensors (Hugging Face "
            "timm/vit_large_patch14_dinov2.lvd142m) or Meta's dinov2_vitl14_pretrain.pth.",
        )

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

    FEATURE = "dinov2"  # (N, D) CLS token


# ----------------------------------------------------------------------------
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
        feature_extractor_weights_path=None,  # None = $ALPHAFLOW_CLIP_WEIGHTS
        clip_model_kwargs=None,  # None = CLIP_MODEL_KWARGS (architecture overrides, tests only)
        **kwargs,
    ):
        super().__init__(name, features_list)
        path = self.resolve_weights(feature_extractor_weights_path)
        os.environ["HF_HUB_OFFLINE"] = "1"  # the file is local; never let timm reach the hub
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn

        overrides = CLIP_MODEL_KWARGS if clip_model_kwargs is None else clip_model_kwargs
        self.model = timm.create_model(
            CLIP_MODEL, pretrained=False, **{"num_classes": 512, "act_layer": "quick_gelu", **overrides}
        )
        state = dict(load_state_file(path))
        try:
            self.model.load_state_dict(checkpoint_filter_fn(state, self.model))
        except (RuntimeError, KeyError) as e:  # wrong network (e.g. ViT-B/16, a text-only file)
            raise WeightsMismatchError(
                f"{path} is not a CLIP ViT-B/32 image tower checkpoint "
                f"({type(e).__name__}: {str(e)[:300]}). {_GET_CLIP}"
            ) from e
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def resolve_weights(weights_path=None):
        return resolve_file(weights_path, ENV_CLIP_WEIGHTS, "CLIP ViT-B/32 weights not found", _GET_CLIP)

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

    FEATURE = "clip"  # (N, 512) un-normalised


_GET_CLIP = (
    "Get OpenAI's CLIP ViT-B/32 weights on a machine with internet: Hugging Face "
    "timm/vit_base_patch32_clip_224.openai, either open_clip_pytorch_model.bin / open_clip_model.safetensors "
    "(open_clip's `ViT-B-32` `openai` weights, OpenAI key layout) or model.safetensors (timm layout); "
    "OpenAI's own ViT-B-32.pt is TorchScript: save its state_dict() to a .pth first."
)
