"""A model's cost, the figures fine-grained papers print beside accuracy: parameters and forward GFLOPs.

    cost = model_cost(model, input_size=448)
    cost["total_params"], cost["vector_size"], cost["gflops"]     # VGG16 + bilinear, 200 classes: 67.3M, 262,144, 123.3

Parameters are split into the backbone(s), the pooling head's own layers and the classifier; buffers (batch-norm
statistics, the compact head's hashes) are not parameters and are not counted. GFLOPs are those of one image's
forward pass as torch.utils.flop_counter.FlopCounterMode counts them: 2 FLOPs per multiply-add of the convolutions
and matrix products (bias additions, ReLUs, pooling, square roots and normalisations are not counted; they are
well under 1% of a B-CNN's forward).
"""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode


REAL_FORWARD_MAX = 128  # px: up to this size a real forward is the cheaper way to count


def parameter_count(modules: list[nn.Module]) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


def model_cost(model, input_size: int, device: str | torch.device = "cpu") -> dict:
    """The cost of a bcnn.models.BilinearCNN on input_size x input_size images: parameters by part, the pooled
    vector's size and one image's forward GFLOPs. device: where a real forward runs if the counting cannot do
    without one (it is where the model's weights are)."""
    backbone, head, classifier = (parameter_count(model.backbones()), parameter_count([model.pooling]),
                                  parameter_count([model.classifier]))
    return {"backbone_params": backbone, "head_params": head, "classifier_params": classifier,
            "total_params": backbone + head + classifier, "vector_size": model.pooling.output_dim,
            "gflops": forward_flops(model, input_size, torch.device(device)) / 1e9}


def forward_flops(model: nn.Module, input_size: int, device: torch.device) -> int:
    """FLOPs of the model's forward on one zero image, in eval mode (a forward in train mode would move batch-norm
    statistics), the model's mode restored after.

    Counted on fake tensors (shapes only, no arithmetic: a 448-px VGG16 takes milliseconds), except on images of
    at most REAL_FORWARD_MAX px, whose real forward costs less than fake tensors' per-operation overhead (a Swin-B
    at 64 px: 0.2 s against 4 s); a head whose shapes depend on values (the compact head's bucket table, built with
    bincount) is run for real too. Both count the same operations."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if input_size <= REAL_FORWARD_MAX:
                with FlopCounterMode(display=False) as counter:
                    model(torch.zeros(1, 3, input_size, input_size, device=device))
                return counter.get_total_flops()
            try:
                with FakeTensorMode(allow_non_fake_inputs=True), FlopCounterMode(display=False) as counter:
                    model(torch.zeros(1, 3, input_size, input_size, device=device))
            except Exception:  # an op fake tensors cannot run (a real error raises again below)
                with FlopCounterMode(display=False) as counter:
                    model(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops()
