"""The model package: backbones (a registry), pooling heads, the BilinearCNN that joins them, and weight reading.

    from bcnn.models import build_model, load_model_weights
    model = build_model(cfg.model, num_classes=200, input_size=cfg.data.crop)
    mean, std = input_normalisation(cfg.model.backbone)   # what the data transforms normalise with
"""

from bcnn.models.backbones import input_normalisation
from bcnn.models.bilinear_cnn import BilinearCNN, build_model
from bcnn.models.weights import load_model_weights

__all__ = ["BilinearCNN", "build_model", "input_normalisation", "load_model_weights"]
