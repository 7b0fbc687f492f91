"""Mixed precision for the backbone, float32 for everything after it.

    precision = resolve_precision("auto", device)   # bf16 on recent GPUs and bf16-capable CPUs, else fp16 / fp32
    with autocast(precision, device):
        logits = model(images)                        # VGG16 in bf16/fp16; the bilinear head in float32

The bilinear pooling, signed square root, L2 normalisation, classifier and loss always run in float32 (the
head turns autocast off): the square root amplifies rounding near zero, and a 262,144-long normalisation
sums too many terms for half precision. fp16 needs a gradient scaler (its range underflows small gradients);
bf16 has float32's range and does not.
"""

from __future__ import annotations

import contextlib

import torch

from bcnn.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_supports_bf16() -> bool:
    """CPUs with native bf16 (AVX512-BF16, AMX) run bf16 convolutions fast; elsewhere bf16 is emulated, slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    """"auto" -> bf16 where the device has it, fp16 on older GPUs, fp32 on other CPUs; a named one is checked."""
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if name == "auto":
            return "bf16" if bf16 else "fp16"
        if name == "bf16" and not bf16:
            raise UserError(f"{torch.cuda.get_device_name(device)} has no bf16; use train.precision=fp16 or fp32.")
        return name
    if name == "auto":
        return "bf16" if device.type == "cpu" and cpu_supports_bf16() else "fp32"
    if name == "fp16":
        raise UserError("train.precision=fp16 needs a CUDA GPU; on the CPU use bf16 or fp32.")
    return name


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 only; disabled, it passes everything through unchanged (and checkpoints as {})."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def configure_device(device: torch.device, tf32: bool = True) -> None:
    """On a GPU, let cuDNN pick the fastest convolution for the fixed input size, and run what is float32 in
    TF32 (Ampere and later) or in IEEE float32.

    Training takes TF32 for all of train.precision=fp32, and for the head's Gram matrix and classifier
    otherwise: it keeps float32's range with 10 mantissa bits, more than the bf16 feature map that enters the
    head carries. `bcnn.eval --precision fp32` takes IEEE float32, so that its numbers are float32's on any
    device (cuDNN's own default would be TF32)."""
    if device.type == "cuda":
        set_float32_precision("tf32" if tf32 else "ieee")
        torch.backends.cudnn.benchmark = True


def set_float32_precision(mode: str) -> None:
    """"tf32" or "ieee" for float32 matmuls and cuDNN convolutions, through torch's newer per-backend flags where
    they exist (mixing them with the older allow_tf32 flags is an error there)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = mode
        conv.fp32_precision = mode
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
