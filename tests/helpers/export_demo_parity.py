"""Issue 32's parity target, measured: every head exported to ONNX and checked on the whole test split of the demo's
mini-CUB (5 classes x 24 images at 64 px, as `make demo` writes it), the top-1 agreement and the largest logit
difference printed per head. The checkpoints are each head's model before training (random VGG16, a random
classifier: logits close together, the hardest case for top-1 agreement).

    .venv/bin/python tests/helpers/export_demo_parity.py [--folder /tmp/export_demo]
"""

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bcnn import export as export_cli  # noqa: E402
from bcnn.checkpoint import save_checkpoint  # noqa: E402
from bcnn.config import config_to_dict, load_config  # noqa: E402
from bcnn.data import build_dataset, write_synthetic_cub  # noqa: E402
from bcnn.models import build_model  # noqa: E402

HEADS = {"bilinear": [], "matrix_sqrt": ["--model.pooling=matrix_sqrt"], "isqrt_cov": ["--model.pooling=isqrt_cov"],
         "compact": ["--model.pooling=compact"], "avg": ["--model.pooling=avg"],
         "two networks (VGG16 x VGG19)": ["--model.backbone_b=vgg19", "--model.backbone_b_weights=none"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", default=None)
    folder = Path(parser.parse_args().folder or tempfile.mkdtemp(prefix="export_demo_"))
    data = write_synthetic_cub(folder / "mini_cub", classes=5, per_class=24, seed=0)
    for head, overrides in HEADS.items():
        cfg = load_config(Path(__file__).resolve().parents[2] / "experiments" / "demo_stage1.yaml",
                          [f"--data.root={data}", "--model.backbone_weights=none", *overrides])
        test = build_dataset(cfg.data, "test", train_transform=False)
        torch.manual_seed(0)
        model = build_model(cfg.model, len(test.classes), input_size=cfg.data.crop)
        checkpoint = folder / head.split()[0] / "best.pt"
        save_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg), "classes": test.classes,
                         "epoch": 0}, checkpoint)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            sidecar = export_cli.main([str(checkpoint), "--check-images", str(len(test))])
        parity = sidecar["parity"]
        print(f"{head:30} {parity['images']} test images: top-1 agreement {parity['top1_agreement']:.0%}, largest "
              f"logit difference {parity['max_logit_difference']:.2g} (allowed {parity['allowed']:.2g})")


if __name__ == "__main__":
    main()
