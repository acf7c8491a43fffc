"""Networks and the one way to use a trained model.

archs (one spec per architecture) · small (simple CNN, pixel MLP) · networks (the CXRNet wrapper) ·
weights (state dicts, ImageNet) · wrappers (ensemble, test-time augmentation) · linear (the logistic-regression
baseline's twin) · build (a network from names or from a saved spec) · card (the typed model card) · predictor (load, save, infer).
A new architecture is one spec in archs.py (SPECS) and nothing else needs to change.
"""

from cxr.models.build import build_from_spec, build_model, model_spec
from cxr.models.networks import ARCHS, CXRNet, ModelError, SimpleCNN
from cxr.models.weights import (
    imagenet_weights_path,
    imagenet_weights_url,
    load_imagenet_state_dict,
    load_weights,
    read_state_dict,
)
from cxr.models.wrappers import Ensemble, TestTimeAugmentation

__all__ = [
    "ARCHS",
    "CXRNet",
    "Ensemble",
    "ModelError",
    "SimpleCNN",
    "TestTimeAugmentation",
    "build_from_spec",
    "build_model",
    "imagenet_weights_path",
    "imagenet_weights_url",
    "load_imagenet_state_dict",
    "load_weights",
    "model_spec",
    "read_state_dict",
]
