"""The small training run that the DDP and resume tests compare against: one command line, one launcher."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
STAGE1 = str(REPO / "experiments" / "demo_stage1.yaml")


def small_run_args(data, run_dir, *extra):
    """Stage 2 style (everything trains), 12 train images (a multiple of 2 ranks and of the batch) in steps of
    4: 3 steps per epoch, 2 epochs, a last.pt every 2 steps. float32, so runs differ only by summation order."""
    return ["--config", STAGE1, f"--data-root={data}", "--device=cpu", f"--run-dir={run_dir}", "--data.crop=32",
            "--data.resize=40", "--data.val_fraction=0.34", "--train.epochs=2", "--train.batch_size=4",
            "--train.log_every=0", "--train.checkpoint_every=2", "--model.freeze_backbone=false",
            "--optim.lr=0.1", "--optim.backbone_lr=0.01", "--train.precision=fp32", "--data.num_workers=1", *extra]


def launch(*command, env=None):
    """A subprocess from the repository root that can import bcnn and tests/helpers."""
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
