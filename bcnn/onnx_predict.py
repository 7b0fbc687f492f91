"""Predict with an exported model and nothing of the training package: ONNX Runtime, NumPy and Pillow only (no torch).

    python -m bcnn.onnx_predict --model runs/x/best.onnx bird.jpg gull.png --topk 3
    python -m bcnn.onnx_predict --model best.onnx photos/*.jpg --json > predictions.json

The model's sidecar (best.onnx.json, written by bcnn.export) says how each image becomes its input, which this module
repeats as torchvision's eval transform does it on a Pillow image: the reader's bottom rows cut (FGVC-Aircraft's
banner), the shorter side resized (Pillow's antialiased bilinear, the longer side int(size * long / short)), the
centre crop (offsets rounded as torchvision rounds them), uint8 RGB, channels first. The class names are the
checkpoint's. The same top-k as `python -m bcnn.predict --checkpoint` on the same files (tested); 16-bit images are
read by Pillow's own conversion here, by bcnn.data.load_rgb's range scaling there.

Copy this file beside the model to use it without bcnn installed: it imports nothing of bcnn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def load_sidecar(model: Path) -> dict:
    sidecar = model.with_name(model.name + ".json")
    try:
        content = json.loads(sidecar.read_text())
    except OSError:
        raise SystemExit(f"error: {model}'s sidecar {sidecar} cannot be read; export the model with "
                         "python -m bcnn.export, which writes both.")
    except ValueError:
        raise SystemExit(f"error: {sidecar} is not JSON; export the model again with python -m bcnn.export.")
    if content.get("written_by") != "bcnn.export" or content.get("format") != "onnx":
        raise SystemExit(f"error: {sidecar} was not written by bcnn.export for an ONNX file; export the model again.")
    return content


def preprocess(image: Image.Image, steps: dict) -> np.ndarray:
    """A Pillow image -> uint8 (3, crop, crop), as the sidecar's preprocess says (torchvision's Resize(int) and
    CenterCrop on a Pillow image, step for step)."""
    image = image.convert("RGB")
    banner = steps.get("bottom_crop_px", 0)
    if banner:
        image = image.crop((0, 0, image.width, image.height - banner))
    size, crop = steps["resize_shorter_side"], steps["center_crop"]
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short != size:
        new_short, new_long = size, int(size * long / short)
        image = image.resize((new_short, new_long) if width <= height else (new_long, new_short), Image.BILINEAR)
    width, height = image.size
    top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def predict(model: Path, images: list[str], topk: int = 5) -> list[dict]:
    """One dict per image, in order: {"image", "predictions": [{"class", "index", "probability"}, ...]} (or
    {"image", "error"} for a file Pillow cannot read)."""
    import onnxruntime

    sidecar = load_sidecar(model)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    classes = sidecar["classes"]
    results = []
    for path in images:
        try:
            with Image.open(path) as image:
                pixels = preprocess(image, sidecar["preprocess"])
        except (OSError, ValueError) as error:
            results.append({"image": path, "error": str(error)})
            continue
        (logits,) = session.run(["logits"], {"images": pixels[None]})
        probabilities = softmax(logits.astype(np.float64))[0]
        order = np.argsort(-probabilities, kind="stable")[:topk]
        results.append({"image": path, "predictions": [
            {"class": classes[index], "index": int(index), "probability": float(probabilities[index])}
            for index in order]})
    return results


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bcnn.onnx_predict", allow_abbrev=False,
                                     description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--model", required=True, help="an .onnx file bcnn.export wrote (its .json beside it)")
    parser.add_argument("--topk", type=int, default=5, help="classes per image (default: 5)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of lines")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if not Path(args.model).is_file():
        raise SystemExit(f"error: --model {args.model} is not a file; give the .onnx file bcnn.export wrote.")
    results = predict(Path(args.model), args.images, args.topk)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            if "error" in result:
                print(f"error: {result['image']}: {result['error']}", file=sys.stderr)
                continue
            print(result["image"])
            for prediction in result["predictions"]:
                print(f"{100 * prediction['probability']:7.2f}%  {prediction['class']}")
    if any("error" in result for result in results):
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
