"""--runtime: what a deployed model costs to run, side by side in one run: the recipe's model (VGG16, bilinear, 200
classes; random weights, which cost what trained ones do) exported by bcnn.export's own steps to ONNX and run by ONNX
Runtime (CPU execution provider, every graph optimisation; on a GPU the CUDA one too, when its package has it),
against eager PyTorch in float32 and under bf16 autocast, at batch 1 (the deployment case) and batch 8, on uint8
crops as the exported graph takes them (its normalisation inside, the same for all).

    python -m bcnn.bench --runtime                                   # 448 px, batch 1 and 8, 3 rounds
    python -m bcnn.bench --runtime --image-size 224 --steps 5

Each round times one batch of each case in turn (the order reversed every other round), after --warmup rounds;
images/s is the batch over the median time. Target (issue 32) on the CPU at batch 1: ONNX Runtime at least 1.0x
eager float32.
"""

from __future__ import annotations

import contextlib
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bcnn.bench.probes import CpuShare, device_name
from bcnn.bench.settings import Settings
from bcnn.config import ModelConfig
from bcnn.errors import UserError
from bcnn.export import DeployedModel, export_onnx
from bcnn.models import build_model, input_normalisation

BATCHES = (1, 8)
TARGET = 1.0  # ONNX Runtime's images/s over eager float32's at batch 1, on the CPU


def onnx_session(path: Path, device: torch.device):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return onnxruntime.InferenceSession(str(path), options, providers=providers), providers[0]


def run_runtime(settings: Settings, backbone: str = "vgg16", pooling: str = "bilinear") -> dict:
    if importlib.util.find_spec("onnxruntime") is None:  # said in one sentence, before the export's minutes
        raise UserError("--runtime runs ONNX Runtime, an optional extra: pip install -e \".[export]\".")
    device, size = settings.device, settings.image_size
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, backbone_weights="none", pooling=pooling),
                        settings.classes, input_size=size).eval()
    deployed = DeployedModel(model, input_normalisation(backbone)).eval()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        with contextlib.redirect_stdout(None):
            export_onnx(deployed, torch.zeros(2, 3, size, size, dtype=torch.uint8), path, opset=18)
        session, provider = onnx_session(path, device)
        deployed.to(device)
        cases = {}
        for batch in BATCHES:
            images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator()
                                   .manual_seed(batch))
            on_device, as_numpy = images.to(device), images.numpy()
            cases[f"eager fp32, batch {batch}"] = (batch, lambda x=on_device: _eager(deployed, x, None))
            cases[f"eager bf16, batch {batch}"] = (batch, lambda x=on_device: _eager(deployed, x, torch.bfloat16))
            cases[f"onnxruntime, batch {batch}"] = (batch, lambda x=as_numpy: session.run(["logits"], {"images": x}))
        times = {name: [] for name in cases}
        names = list(cases)
        share = CpuShare()
        for round_ in range(settings.warmup + settings.steps):
            for name in (names if round_ % 2 == 0 else names[::-1]):
                start = time.perf_counter()
                cases[name][1]()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if round_ >= settings.warmup:
                    times[name].append(time.perf_counter() - start)
        others = share.others()
    rows = {name: {"batch": cases[name][0], "seconds": statistics.median(times[name]),
                   "images_per_second": cases[name][0] / statistics.median(times[name])} for name in names}
    ratio = rows["onnxruntime, batch 1"]["images_per_second"] / rows["eager fp32, batch 1"]["images_per_second"]
    return {"device": device.type, "device_name": device_name(device), "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__, "provider": provider,
            "model": f"{backbone}, {pooling}, {settings.classes} classes", "image_size": size, "rounds": settings.steps,
            "warmup": settings.warmup, "threads": torch.get_num_threads(), "other_cpu_share": others,
            "cases": rows, "onnx_over_eager_fp32_batch1": ratio,
            "target": {"onnx_over_eager_fp32_batch1": TARGET, "met": ratio >= TARGET}}


def _eager(deployed, images: torch.Tensor, dtype):
    with torch.no_grad(), torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return deployed(images)


def format_runtime(result: dict) -> str:
    lines = [f"bcnn.bench --runtime on {result['device_name']} ({result['device']}, {result['threads']} threads); "
             f"torch {result['torch']}, onnxruntime {result['onnxruntime']} ({result['provider']})",
             f"{result['model']} at {result['image_size']} px; uint8 crops in, normalisation in the graph; median of "
             f"{result['rounds']} rounds after {result['warmup']} warm-up, one batch of each case in turn",
             "other processes used "
             + (f"{result['other_cpu_share']:.0%}" if result["other_cpu_share"] is not None else "an unknown share")
             + " of the CPUs during the run (the figures are this machine's own only when that is near 0)", "",
             f"{'case':28} {'batch':>5} {'s/batch':>9} {'images/s':>9}"]
    for name, row in result["cases"].items():
        lines.append(f"{name:28} {row['batch']:>5} {row['seconds']:>9.3f} {row['images_per_second']:>9.2f}")
    target = result["target"]
    lines += ["", "target (issue 32): onnxruntime / eager fp32 images/s at batch 1 >= "
              f"{target['onnx_over_eager_fp32_batch1']}: {result['onnx_over_eager_fp32_batch1']:.3f}  "
              f"{'PASS' if target['met'] else 'MISS'}"]
    return "\n".join(lines)
