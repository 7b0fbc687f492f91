"""Ship a trained model: its best.pt as an ONNX file or a torch.export program, checked against the checkpoint on
real images, with a sidecar JSON that says how to feed it.

    python -m bcnn.export runs/cub_vgg16_stage2/best.pt                    # runs/cub_vgg16_stage2/best.onnx (+ .json)
    python -m bcnn.export runs/x/best.pt --format torch --output model.pt2  # torch.export.save's program
    python -m bcnn.onnx_predict --model runs/x/best.onnx photo.jpg          # onnxruntime, NumPy, Pillow: no torch

The graph takes uint8 RGB images (B, 3, crop, crop), already resized and centre-cropped as the sidecar's
"preprocess" says, the batch dynamic; the normalisation is inside it (x / 255, then the backbone's mean and std), and
it returns "logits" (B, classes) and "embed" (B, D), the head's normalised vector. LoRA updates are merged into their
weights first (peft's merge): the exported model costs what the plain one does.

Parity, checked by default: the exported model against the checkpoint's own model (bcnn.models.trained) on the first
images of its dataset's test split through the eval view (--check-images, 4 by default), the first alone and the
others in batches of 3 (the dynamic axis used at two sizes); the largest logit difference and the top-1 agreement are printed, and an export past TOLERANCE is refused
(its file removed). ONNX goes through torch's current exporter (torch.onnx.export(dynamo=True), checked with
onnx.checker) and is run by ONNX Runtime with every graph optimisation (pip install -e ".[export]").

Files are written atomically (a temporary file renamed), and a file at --output that bcnn.export did not write (no
sidecar beside it whose hash is the file's) is never replaced.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torchvision import transforms as T

from bcnn import __version__
from bcnn.errors import UserError, exit_on_user_error
from bcnn.models.adapt import merge_adapters
from bcnn.models.trained import TrainedModel, from_checkpoint
from bcnn.models.weights import first_line

FORMATS = {"onnx": ".onnx", "torch": ".pt2"}
PARITY_BATCHES = (1, 3)  # the first image alone, then batches of 3: the dynamic axis at two sizes
# The largest logit difference allowed between the export and eager PyTorch, relative to the largest logit. Both
# compute the same float32 operations, in other orders: a sum of D terms then differs by about sqrt(D) x 2^-24 of the
# sum of their magnitudes (a random walk of roundings), and a head's D reaches 262,144 (bilinear VGG16), where ONNX
# Runtime's sums measured 3e-4 of the logits' scale from PyTorch's (docs/deployment.md). 1e-3 leaves room for that;
# a wrong operation moves logits by a good share of their scale.
TOLERANCE = 1e-3
WRITER = "bcnn.export"
# Operations bcnn's heads avoid (Newton-Schulz is products only, the count sketch a gather) and a new head may not:
# how a word of the failing operation's name begins (aten._linalg_eigh: "eig"), what blocks it, the issue to follow.
# FFTs export through the current exporter as ONNX's DFT, and ONNX Runtime runs an rfft/irfft pair (measured here);
# the old exporter had none (pytorch/pytorch#44822, #112382), and ONNX Runtime fails on some FFT graphs (#188496).
BLOCKED_OPERATIONS = (
    (("svd", "eig", "cholesky", "solve", "inv", "lstsq", "qr", "lu"),
     "ONNX has no operator for matrix decompositions or solvers: follow onnx/onnx#5570 and pytorch/pytorch#81084"),
    (("fft", "dft", "stft"), "FFTs in ONNX: follow pytorch/pytorch#188496 (ONNX Runtime on exported FFT graphs), "
                             "#112382 and #44822"),
)


class DeployedModel(nn.Module):
    """The eval model as an exported graph sees it: uint8 RGB (B, 3, crop, crop) in, (logits, embed) out, the
    normalisation inside. BilinearCNN.embed's steps without its autocast context (an export is float32 throughout)."""

    def __init__(self, model: nn.Module, normalisation: tuple):
        super().__init__()
        self.model = model
        mean, std = normalisation
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = (images.to(torch.float32) / 255 - self.mean) / self.std  # ToTensor's x / 255, then Normalize
        model = self.model
        feature_map = model.backbone(pixels)
        feature_map_b = model.backbone_b(pixels) if model.backbone_b is not None else None
        vectors = model.pooling(feature_map.float(), None if feature_map_b is None else feature_map_b.float())
        return model.classifier(vectors), vectors


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bcnn.export", allow_abbrev=False,
                                     description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a best.pt or last.pt that bcnn.train wrote")
    parser.add_argument("--format", choices=tuple(FORMATS), default="onnx",
                        help="onnx (ONNX Runtime and anything that reads ONNX) or torch (a torch.export program, "
                        "torch.export.load) (default: onnx)")
    parser.add_argument("--output", help="the file to write (default: the checkpoint's path with .onnx or .pt2); its "
                        "sidecar is the same path + .json")
    parser.add_argument("--image-size", type=int,
                        help="the crop the graph takes (default: the run's data.crop, which it trained at)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    parser.add_argument("--data-root", help="where the checkpoint's dataset now lives, for the parity check's images "
                        "(default: the run's data.root)")
    parser.add_argument("--check-images", type=int, default=sum(PARITY_BATCHES),
                        help="how many of the test split's first images the parity check runs: the first alone, "
                        f"the others in batches of {PARITY_BATCHES[1]} (default: {sum(PARITY_BATCHES)})")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the parity check (no dataset at hand); the sidecar then says it was not checked")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Returns the sidecar's content."""
    args = parse_args(argv)
    checkpoint = Path(args.checkpoint)
    output = Path(args.output) if args.output else checkpoint.with_suffix(FORMATS[args.format])
    if args.check_images < 2 and not args.no_check:
        raise UserError(f"--check-images must be at least 2 (a batch of 1 and a batch of another size), got "
                        f"{args.check_images}.")
    refuse_to_replace(output)
    trained = from_checkpoint(checkpoint, "cpu", data_root=args.data_root)
    if args.image_size is not None and args.image_size != trained.config.data.crop:
        at_another_size(trained, args.image_size, checkpoint)
    merged = merge_adapters(trained.model)
    deployed = DeployedModel(trained.model, trained.normalisation).eval()
    crop = trained.config.data.crop
    example = torch.zeros(2, 3, crop, crop, dtype=torch.uint8)
    with _temporary_beside(output) as temporary:
        if args.format == "onnx":
            export_onnx(deployed, example, temporary, args.opset)
        else:
            export_program(deployed, example, temporary)
        parity = None if args.no_check else check_parity(deployed, trained, temporary, args.format,
                                                         args.check_images)
        sidecar = describe(trained, checkpoint, output, temporary, args.format, merged, parity)
        os.replace(temporary, output)
    write_json_atomically(sidecar_path(output), sidecar)
    print(f"wrote {output} and {sidecar_path(output).name} ({args.format}, {crop} x {crop} uint8 RGB in, logits and "
          f"embed out)")
    return sidecar


def at_another_size(trained: TrainedModel, size: int, checkpoint: Path) -> None:
    """The model fed size x size crops instead of the run's (a convolutional backbone takes any size; a transformer
    built for its crop refuses another), the resize scaled with it; trained.config says so for the sidecar."""
    data = trained.config.data
    try:
        with torch.no_grad():
            trained.model(torch.zeros(1, 3, size, size))
    except Exception as error:
        raise UserError(f"--image-size {size}: the model {checkpoint} holds cannot take {size} x {size} images "
                        f"({first_line(error)}); leave --image-size out to export at its crop, {data.crop}.") from None
    data.resize, data.crop = round(data.resize * size / data.crop), size


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + ".json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def refuse_to_replace(output: Path) -> None:
    """A file at `output` is replaced only when bcnn.export wrote it: its sidecar names this writer and its hash."""
    if not output.exists():
        return
    sidecar = sidecar_path(output)
    try:
        written = json.loads(sidecar.read_text())
        ours = written.get("written_by") == WRITER and written.get("sha256") == file_sha256(output)
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise UserError(f"{output} exists and bcnn.export did not write it (no sidecar {sidecar.name} records it); "
                        "give --output another path, or move that file away.")


class _temporary_beside:
    """A temporary file name in output's folder, removed unless it was renamed over output."""

    def __init__(self, output: Path):
        self.output = output

    def __enter__(self) -> Path:
        try:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            # the output's suffix last: torch.export.save and load want .pt2
            fd, name = tempfile.mkstemp(dir=self.output.parent, prefix=f".{self.output.name}.",
                                        suffix=f".tmp{self.output.suffix}")
        except OSError as error:
            raise UserError(f"cannot write {self.output} ({(error.strerror or str(error)).lower()}); give --output "
                            "a folder this user can write.") from None
        os.close(fd)
        self.path = Path(name)
        return self.path

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def write_json_atomically(path: Path, content: dict) -> None:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(content, f, indent=2)
            f.write("\n")
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


def _batch_axis():
    return {"images": {0: torch.export.Dim("batch", min=1, max=4096)}}


def export_program(deployed: nn.Module, example: torch.Tensor, path: Path) -> None:
    with torch.no_grad():
        try:
            program = torch.export.export(deployed, (example,), dynamic_shapes=_batch_axis())
        except Exception as error:  # torch.export's own errors name the operation or the line it cannot trace
            raise UserError(f"torch.export cannot trace this model ({first_line(error)}); "
                            f"{where_to_follow(failing_operation(error))}.") from None
    torch.export.save(program, str(path))


def export_onnx(deployed: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    try:
        import onnx
    except ImportError:
        raise UserError("--format onnx needs onnx, onnxscript and onnxruntime, an optional extra: pip install -e "
                        "\".[export]\" (or --format torch).") from None
    with torch.no_grad():
        try:
            torch.onnx.export(deployed, (example,), str(path), dynamo=True, opset_version=opset,
                              input_names=["images"], output_names=["logits", "embed"],
                              dynamic_shapes=_batch_axis(), external_data=False, verbose=False)
        except Exception as error:
            operation = failing_operation(error)
            what = f"has no ONNX function for {operation}" if operation else f"failed ({first_line(error)})"
            raise UserError(f"torch's ONNX exporter {what}, which this model computes; {where_to_follow(operation)}; "
                            "--format torch exports it as a torch.export program meanwhile.") from None
    onnx.checker.check_model(str(path))


def failing_operation(error: Exception) -> str | None:
    """The operation an exporter's or ONNX Runtime's error names (aten._linalg_eigh, DFT), if it names one."""
    text = str(error)
    for pattern in (r"OpOverload\(op='([\w.]+)'", r"torch\.ops\.(aten\.\w+)", r"aten::(\w+)",
                    r"implementation for (\w+)\(", r"node \S+ \((\w+)\)"):
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return None


def where_to_follow(operation: str | None) -> str:
    """The issue that tracks an operation's export (BLOCKED_OPERATIONS), or where to report one nobody tracks."""
    words = [word for word in re.split(r"[_.]", (operation or "").lower()) if word]
    for beginnings, issue in BLOCKED_OPERATIONS:
        if any(word.startswith(beginnings) for word in words):
            return issue
    return ("open an issue at github.com/pytorch/pytorch (component onnx or export) with the operation, and tell "
            "bcnn which model.backbone and model.pooling")


def parity_images(trained: TrainedModel, count: int) -> tuple[torch.Tensor, list[str]]:
    """The first `count` images of the checkpoint's test split, as uint8 (count, 3, crop, crop) through the eval
    view (resize, centre crop; the reader's own cuts first), and their paths."""
    from bcnn.data import build_dataset

    cfg = trained.config.data
    try:
        dataset = build_dataset(cfg, "test", train_transform=False, normalisation=trained.normalisation)
    except UserError as error:
        raise UserError(f"the parity check reads the checkpoint's test images, and {error} Pass --data-root where "
                        "the dataset is, or --no-check to export without the check.") from None
    dataset.transform = T.Compose([T.Resize(cfg.resize), T.CenterCrop(cfg.crop), T.PILToTensor()])
    indices = range(min(count, len(dataset)))
    return torch.stack([dataset[index][0] for index in indices]), [dataset.samples[index][0] for index in indices]


def run_exported(path: Path, fmt: str):
    """A function from a uint8 batch to its (logits, embed) as the exported file computes them."""
    if fmt == "torch":
        program = torch.export.load(str(path)).module()

        def run(images: torch.Tensor):
            with torch.no_grad():
                return tuple(output.float() for output in program(images))
        return run
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise _runtime_refusal(error) from None

    def run(images: torch.Tensor):
        try:
            logits, vectors = session.run(["logits", "embed"], {"images": images.numpy()})
        except Exception as error:
            raise _runtime_refusal(error) from None
        return torch.from_numpy(logits), torch.from_numpy(vectors)
    return run


def _runtime_refusal(error: Exception) -> UserError:
    """ONNX Runtime could not load or run a graph the exporter wrote and onnx.checker passed."""
    operation = failing_operation(error)
    return UserError(f"ONNX Runtime cannot run the exported graph ({first_line(error)}); nothing was written: "
                     f"{where_to_follow(operation)}; --format torch exports it as a torch.export program meanwhile.")


def check_parity(deployed: nn.Module, trained: TrainedModel, path: Path, fmt: str, count: int) -> dict:
    """The exported file against eager PyTorch's checkpoint model on the test split's first `count` images: the first
    alone (batch 1), then the others in batches of count - 1 at most (PARITY_BATCHES' second size by default), so
    the dynamic batch axis takes two sizes."""
    images, paths = parity_images(trained, count)
    mean, std = trained.normalisation
    normalise = T.Normalize(mean, std)
    run = run_exported(path, fmt)
    worst, agree, seen, scale = 0.0, 0, 0, 0.0
    rest = max(PARITY_BATCHES[1], 2)
    batches = [images[:1]] + [images[start:start + rest] for start in range(1, len(images), rest)]
    for chunk in batches:
        with torch.no_grad():
            eager = trained.model(normalise(chunk.float().div(255)))  # the eval transform's ToTensor, Normalize
        exported, _ = run(chunk)
        worst = max(worst, float((exported - eager).abs().max()))
        scale = max(scale, float(eager.abs().max()))
        agree += int((exported.argmax(1) == eager.argmax(1)).sum())
        seen += len(chunk)
    allowed = TOLERANCE * scale
    sizes = sorted({len(chunk) for chunk in batches})
    print(f"parity ({fmt} against eager PyTorch, {len(paths)} test images at batch sizes "
          f"{', '.join(map(str, sizes))}): largest logit difference {worst:.3g} (allowed {allowed:.3g}, "
          f"{TOLERANCE:g} of the largest logit), the same top-1 class {agree} times of {seen}")
    if worst > allowed or agree < seen:
        raise UserError(f"the exported model's logits differ from the checkpoint's by {worst:.3g} (more than "
                        f"{allowed:.3g}) or its top-1 disagrees on {seen - agree} of {seen} images; nothing was "
                        "written: open an issue with the checkpoint's model.backbone and model.pooling.")
    return {"images": len(paths), "batch_sizes": sizes, "max_logit_difference": worst,
            "allowed": allowed, "top1_agreement": agree / seen}


def describe(trained: TrainedModel, checkpoint: Path, output: Path, written: Path, fmt: str, merged: int,
             parity: dict | None) -> dict:
    """The sidecar: what a program feeding the file needs to know, and where it came from."""
    cfg = trained.config
    from bcnn.data import READERS

    mean, std = trained.normalisation
    evaluation = checkpoint.with_name(f"eval_{checkpoint.stem}_test.json")
    accuracy = None
    if evaluation.is_file():
        try:
            accuracy = {key: json.loads(evaluation.read_text()).get(key) for key in ("top1", "top5", "count")}
        except ValueError:
            accuracy = None
    return {
        "written_by": WRITER, "bcnn_version": __version__, "format": fmt, "file": output.name,
        "sha256": file_sha256(written),
        "input": {"name": "images", "dtype": "uint8", "layout": "NCHW", "channels": "RGB",
                  "height": cfg.data.crop, "width": cfg.data.crop, "batch": "dynamic"},
        "outputs": {"logits": "(batch, classes), before softmax", "embed": "(batch, D), the head's vector"},
        "preprocess": {"bottom_crop_px": getattr(READERS.get(cfg.data.format), "bottom_crop", 0),
                       "resize_shorter_side": cfg.data.resize, "resize_filter": "bilinear (Pillow's, antialiased)",
                       "center_crop": cfg.data.crop},
        "normalisation": {"inside_the_graph": True, "scale": "1/255", "mean": list(mean), "std": list(std)},
        "classes": trained.classes,
        "model": {"backbone": cfg.model.backbone, "backbone_b": cfg.model.backbone_b or None,
                  "pooling": cfg.model.pooling, "adapt": cfg.model.adapt, "lora_layers_merged": merged},
        "checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint), "epoch": trained.epoch,
        "test_accuracy": accuracy, "parity": parity if parity is not None else "not checked (--no-check)",
    }


if __name__ == "__main__":
    exit_on_user_error(main)(sys.argv[1:])
