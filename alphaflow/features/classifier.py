"""The demo classifier (alphaflow.classifier.SmallCNN) as a torch-fidelity extractor: penultimate features for
FD_classifier, logits for the IS analogue."""

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from alphaflow.classifier import load_classifier
from alphaflow.features.common import resolve_file, to_rgb_uint8

ENV_CLASSIFIER = "ALPHAFLOW_CLASSIFIER_WEIGHTS"  # SmallCNN safetensors (Params.classifier_path)


class ClassifierLocal(FeatureExtractorBase):
    """SmallCNN penultimate features (FD_classifier) and logits (IS analogue)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.model = load_classifier(self.resolve_weights(feature_extractor_weights_path))

    @staticmethod
    def resolve_weights(weights_path=None):
        return resolve_file(
            weights_path,
            ENV_CLASSIFIER,
            "classifier weights not found",
            "Train it with `alphaflow classifier --params ...` (alphaflow.classifier.train_classifier).",
        )

    def forward(self, x):
        # fmt: off
        to_rgb_uint8(x)                                                        # shape/dtype check only
        h, logits = self.model.features_and_logits(self.model.preprocess(x))   # (N, 128), (N, classes)
        # fmt: on
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
