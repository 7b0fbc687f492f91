"""The benchmark's resolved options (bcnn.bench.__main__.resolve_settings), which the step bench and the recipe
bench both take."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Settings:
    device: torch.device
    image_size: int
    batch_size: int
    precision: str  # resolved: bf16 | fp16 | fp32
    steps: int
    warmup: int
    classes: int
    num_workers: int
    cache_image_size: int  # the cached-vs-live stage 1 epochs run at the recipe's size and batch by default
    cache_batch_size: int
    heads_image_size: int = 448  # the heads side by side, at the recipe's size by default
    heads_batch_size: int = 4

    def command(self, step_bench: bool = True) -> str:
        """The command that runs the same benchmark again; step_bench=False: without the step bench's own options,
        which --recipe refuses."""
        command = (f"python -m bcnn.bench --device {self.device.type} --image-size {self.image_size} "
                   f"--batch-size {self.batch_size} --precision {self.precision} --steps {self.steps} "
                   f"--warmup {self.warmup} --classes {self.classes} --num-workers {self.num_workers}")
        if not step_bench:
            return command
        return (f"{command} --cache-image-size {self.cache_image_size} --cache-batch-size {self.cache_batch_size} "
                f"--heads-image-size {self.heads_image_size} --heads-batch-size {self.heads_batch_size}")
