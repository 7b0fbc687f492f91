"""How far the improved B-CNN's truncated matrix square root is from the exact one, and how much the form of the
element-wise signed square root moves the head's vector: measured on a backbone's real feature maps.

    python -m bcnn.bench.sqrt_sweep --sizes 224,448 --images 4            # random VGG16 (downloads nothing)
    python -m bcnn.bench.sqrt_sweep --weights imagenet --json             # torchvision's ImageNet VGG16

For each input size: the relu5_3 maps of photo-like images (bcnn.bench.recipe.photo_like: 1/f colour noise, JPEG
statistics of real photographs, no dataset needed), their Gram matrices X Xᵀ / (H W), and
- root_error[K]: ||NS_K - sqrtm|| / ||sqrtm|| (Frobenius), NS_K the float32 coupled Newton-Schulz root after K steps
  as the head computes it, sqrtm the float64 eigendecomposition's root (negative rounding eigenvalues set to 0);
- vector_error[K]: the same for the head's output (signed sqrt, L2), the exact root's vector as the reference;
- form_change[K]: the relative L2 distance between the head's vector with the ports' sign(z) sqrt(|z| + eps) and
  with the authors' sqrt(relu(z) + eps) - sqrt(relu(-z) + eps) (bcnn.models.pooling).
Each figure is the mean over the images (the spread between images is about 2% of the figure). docs/pooling.md
holds the figures the default was chosen from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF

from bcnn.config import ModelConfig
from bcnn.errors import UserError, exit_on_user_error
from bcnn.models import build_model
from bcnn.models.pooling import gram_matrix, newton_schulz_sqrt, ported_sqrt, signed_sqrt

STEPS = (5, 10, 15, 20)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the batch of ||a - b|| / ||b||, in float64."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float((torch.linalg.vector_norm(a - b, dim=1) / torch.linalg.vector_norm(b, dim=1)).mean())


def photo_batch(size: int, images: int, mean, std) -> torch.Tensor:
    from bcnn.bench.recipe import photo_like  # a generator of test images; imported only where used

    return torch.stack([TF.normalize(TF.to_tensor(TF.center_crop(TF.resize(photo_like(seed), size), size)), mean, std)
                        for seed in range(images)])


def measure(model, size: int, images: int, eps: float, steps=STEPS) -> dict:
    with torch.no_grad():
        maps = model.backbone(photo_batch(size, images, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    gram = gram_matrix(maps, maps)  # (B, C, C), float32 as the head computes it
    eigenvalues, eigenvectors = torch.linalg.eigh(gram.double())
    exact = eigenvectors @ torch.diag_embed(eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.transpose(1, 2)
    exact_vector = F.normalize(signed_sqrt(exact.flatten(1), eps), dim=1)
    row = {"size": size, "map": list(maps.shape[-2:]), "images": images, "root_error": {}, "vector_error": {},
           "form_change": {}}
    for k in steps:
        root = newton_schulz_sqrt(gram, torch.linalg.matrix_norm(gram), k).flatten(1)
        authors = F.normalize(signed_sqrt(root, eps), dim=1)
        row["root_error"][k] = relative(root, exact.flatten(1))
        row["vector_error"][k] = relative(authors, exact_vector)
        row["form_change"][k] = relative(F.normalize(ported_sqrt(root, eps), dim=1), authors)
    return row


def format_rows(rows: list[dict]) -> str:
    header = "size  map      " + "  ".join(f"root@{k:<2}  vec@{k:<2}  form@{k:<2}" for k in rows[0]["root_error"])
    lines = [header]
    for row in rows:
        cells = "  ".join(f"{row['root_error'][k]:7.2%}  {row['vector_error'][k]:6.2%}  {row['form_change'][k]:6.2%}"
                          for k in row["root_error"])
        lines.append(f"{row['size']:<5} {'x'.join(map(str, row['map'])):<8} {cells}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bcnn.bench.sqrt_sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="112,224,448", help="input sides in pixels, comma-separated")
    parser.add_argument("--images", type=int, default=4, help="photo-like images per size")
    parser.add_argument("--weights", default="none", help="VGG16 weights: none (random, bcnn's init), imagenet, or "
                        "a file, as model.backbone_weights")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    try:
        sizes = [int(size) for size in args.sizes.split(",")]
    except ValueError:
        raise UserError(f"--sizes takes whole numbers separated by commas, e.g. 224,448; got {args.sizes!r}.") from None
    if args.images < 1 or any(size < 32 for size in sizes):
        raise UserError("--images must be at least 1 and every --sizes value at least 32 (VGG16's relu5_3 is then "
                        "2 x 2).")
    if args.weights not in ("none", "imagenet") and not Path(args.weights).is_file():
        raise UserError(f"--weights {args.weights} is not a file; give a VGG16 state-dict file, or none or imagenet.")
    torch.manual_seed(0)
    cfg = ModelConfig(backbone_weights=args.weights)
    model = build_model(cfg, num_classes=2, input_size=max(sizes)).eval()  # VGG16 takes every size: one model
    rows = [measure(model, size, args.images, cfg.sqrt_eps) for size in sizes]
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return rows


if __name__ == "__main__":
    exit_on_user_error(main)()
