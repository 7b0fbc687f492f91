"""Mixed precision: the backbone in bf16 (channels_last), the bilinear head and the loss in float32."""

import pytest
import torch
import torch.nn.functional as F

from bcnn.config import ModelConfig
from bcnn.errors import UserError
from bcnn.models import build_model
from bcnn.precision import autocast, cpu_supports_bf16, grad_scaler, resolve_precision
from helpers.numerics import FORWARD_RTOL, assert_same_training, relative_error

CPU = torch.device("cpu")
# bf16 keeps 8 significant bits (unit roundoff u = 2^-9 per operation); through 13 convolutions the errors
# partly cancel. We allow 10u = 2% relative (L2) for the logits of a random VGG16 at 64 px; measured: about 0.5%.
LOGIT_TOLERANCE = 10 * 2.0**-9


@pytest.fixture(scope="module")
def model_and_images():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone_weights="none", freeze_backbone=False), num_classes=10, input_size=64)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return model, images


def test_bf16_logits_stay_close_to_float32_and_gradients_are_finite(model_and_images):
    model, images = model_and_images
    reference = model(images)  # float32, NCHW
    fast = model.to(memory_format=torch.channels_last)
    with autocast("bf16", CPU):
        feature_map = fast.backbone(images.to(memory_format=torch.channels_last))
        logits = fast(images.to(memory_format=torch.channels_last))
    assert feature_map.dtype == torch.bfloat16, "the backbone runs in bf16"
    assert logits.dtype == torch.float32, "autocast is off for the pooling, sqrt, norm and classifier: float32"
    error = relative_error(logits, reference)
    assert error < LOGIT_TOLERANCE, error
    assert error > 0, "bf16 really ran (identical logits would mean autocast did nothing)"

    loss = F.cross_entropy(logits, torch.arange(4))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(list(model.parameters()))
    assert all(torch.isfinite(g).all() and g.dtype == torch.float32 for g in grads)
    model.zero_grad(set_to_none=True)


def test_channels_last_changes_the_layout_not_the_result(model_and_images):
    model, images = model_and_images
    model = model.to(memory_format=torch.contiguous_format)
    reference = model(images)
    fast = model.to(memory_format=torch.channels_last)
    assert fast.backbone[0].weight.is_contiguous(memory_format=torch.channels_last)
    # Another convolution algorithm, the same maths: equal to forward-pass rounding.
    assert relative_error(fast(images.to(memory_format=torch.channels_last)), reference) < FORWARD_RTOL


def test_auto_precision_follows_the_device():
    assert resolve_precision("auto", CPU) == ("bf16" if cpu_supports_bf16() else "fp32")
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", CPU)


def test_only_fp16_scales_the_loss():
    assert not grad_scaler("bf16", CPU).is_enabled() and not grad_scaler("fp32", CPU).is_enabled()
    assert grad_scaler("bf16", CPU).state_dict() == {}


def test_compiling_the_backbone_trains_the_same_model_with_plain_checkpoint_keys(tmp_path):
    from pathlib import Path

    from bcnn import train as train_cli
    from bcnn.data import write_synthetic_cub

    data = write_synthetic_cub(tmp_path / "cub", classes=3, per_class=6, seed=0)
    stage1 = str(Path(__file__).resolve().parent.parent / "experiments" / "demo_stage1.yaml")
    weights = {}
    for compiled in ("false", "true"):
        run_dir = tmp_path / f"compile_{compiled}"
        torch._dynamo.utils.counters.clear()
        train_cli.main(["--config", stage1, f"--data-root={data}", "--device=cpu", f"--run-dir={run_dir}",
                        "--data.crop=32", "--data.resize=40", "--train.epochs=1", "--train.precision=fp32",
                        f"--train.compile={compiled}",
                        # one batch shape for every step and the val pass (6 train, 3 val images): one compile of the
                        # backbone, not one more for each other shape
                        "--data.val_fraction=0.34", "--train.batch_size=3", "--train.eval_batch_size=3",
                        # each of these compiles the backbone twice more (captum's forward hooks, other strides):
                        # about half of this test's compile time with a cold cache, and not what it checks
                        "--train.heatmap_images=0", "--train.projector=false"])
        weights[compiled] = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    # the frozen backbone runs without autograd's record in the train steps as in the val pass: one graph for both
    # (grad mode is among torch.compile's guards: a second graph doubled this test's time)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert set(weights["true"]) == set(weights["false"]), "no _orig_mod. in the keys"
    torch.manual_seed(0)  # what bcnn.train does (train.seed 0) before it builds the model
    initial = build_model(ModelConfig(backbone_weights="none", freeze_backbone=True), num_classes=3,
                          input_size=32).state_dict()
    # The compiled backbone fuses and reorders its float32 work: the classifier trains to the same weights up to
    # rounding, and the frozen backbone stays bit for bit what it was.
    assert_same_training(weights["false"], weights["true"], initial)
