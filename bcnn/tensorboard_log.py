"""What a run shows in TensorBoard (`tensorboard --logdir runs`), under stable tags, x-axis the optimizer step.

    train/loss_step, train/top1_step       every train.log_every steps, over the steps since the last point
    train/loss, train/top1                 per epoch
    val/top1, val/top5, val/mean_class_acc, val/loss
    lr/<group>                             backbone, classifier (a probe grid's: probe/<member>)
    probe/<member>/val_top1, .../val_loss  each member of a linear-probe sweep (train.probe_grid), e.g.
                                           probe/lr=0.1,wd=0.0001/val_top1
    perf/images_per_sec, perf/epoch_seconds, perf/gpu_memory_gb (CUDA only)
    eval_<checkpoint>_<split>/top1, .../knn_top1@20, .../recall@1, ...   bcnn.eval's numbers, at the checkpoint's step
    train/augmented_images                 a grid of training images as the model sees them, at the start
    val/confusion_matrix, val/per_class_accuracy   figures, each time best.pt is written
    HPARAMS tab                            the run's config beside its final metrics (hparam/*)

Only rank 0 writes; every run directory is a run of its own, so stage 1 and stage 2 of an experiment sit
side by side under `runs/`.
"""

from __future__ import annotations

import itertools

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from torchvision.utils import make_grid

from bcnn.figures import confusion_figure, denormalize, figure_to_array, per_class_accuracy_figure
from bcnn.sampling import TrainSampler

EPOCH_SCALARS = ("train_loss", "train_top1", "val_top1", "val_top5", "val_mean_class_acc", "val_loss",
                 "val_ema_top1", "val_ema_top5", "val_ema_mean_class_acc", "val_ema_loss")  # ema: train.ema_decay > 0


class TensorBoardLog:
    def __init__(self, run_dir, purge_step: int | None = None):
        # purge_step hides what a killed attempt logged after the checkpoint a run resumed from.
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

    def augmented_images(self, dataset, seed: int, count: int = 16) -> None:
        """The first images of epoch 1 with their augmentation: a wrong transform shows at a glance."""
        sampler = TrainSampler(dataset, rank=0, world_size=1, seed=seed)
        sampler.set_epoch(1)
        images = torch.stack([dataset[item][0] for item in itertools.islice(sampler, count)])
        grid = make_grid(denormalize(images, dataset.normalisation), nrow=8)
        self.writer.add_image("train/augmented_images", grid, 0)

    def step(self, global_step: int, stats: dict) -> None:
        self.writer.add_scalar("train/loss_step", stats["loss"], global_step)
        self.writer.add_scalar("train/top1_step", stats["top1"], global_step)

    def epoch(self, global_step: int, row: dict, lrs: dict, device: torch.device) -> None:
        for key in EPOCH_SCALARS:
            if key in row:
                self.writer.add_scalar(key.replace("_", "/", 1), row[key], global_step)
        for key, value in row.items():
            if key.startswith("probe/"):  # a linear-probe sweep's members (bcnn.probe_grid), tagged as in the row
                self.writer.add_scalar(key, value, global_step)
        for name, lr in lrs.items():
            self.writer.add_scalar(f"lr/{name}", lr, global_step)
        self.writer.add_scalar("perf/images_per_sec", row["train_images_per_sec"], global_step)
        self.writer.add_scalar("perf/epoch_seconds", row["train_seconds"], global_step)
        if device.type == "cuda":
            self.writer.add_scalar("perf/gpu_memory_gb", torch.cuda.max_memory_allocated(device) / 2**30,
                                   global_step)
        self.writer.flush()

    def evaluation_figures(self, prefix: str, confusion, classes: list[str], global_step: int) -> None:
        correct, total = confusion.diagonal(), confusion.sum(1)
        for tag, figure in (
            (f"{prefix}/confusion_matrix", confusion_figure(confusion, classes, f"{prefix}: confusion")),
            (f"{prefix}/per_class_accuracy",
             per_class_accuracy_figure(correct, total, classes, f"{prefix}: per-class accuracy")),
        ):
            self.writer.add_image(tag, figure_to_array(figure), global_step, dataformats="HWC")
        self.writer.flush()

    def hyperparameters(self, config: dict, world_size: int, metrics: dict, global_step: int) -> None:
        """The HPARAMS tab: this run's config beside its final metrics, so runs compare in one table."""
        flat = {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()
                if isinstance(value, (int, float, str, bool))}
        flat["processes"] = world_size
        metric_tags = {f"hparam/{name}": value for name, value in metrics.items()}
        experiment, start, end = hparams(flat, metric_tags)
        for summary in (experiment, start, end):
            self.writer._get_file_writer().add_summary(summary)  # as add_hparams does, minus its extra run folder
        for tag, value in metric_tags.items():
            self.writer.add_scalar(tag, value, global_step)
        self.writer.flush()

    def heatmaps(self, figure_array, global_step: int) -> None:
        """The fixed val images with their evidence (bcnn.explain), each time best.pt is written."""
        self.writer.add_image("val/heatmaps", figure_array, global_step, dataformats="HWC")
        self.writer.flush()

    def projector(self, vectors, labels: list[str], thumbnails, global_step: int, tag: str = "val") -> None:
        """Vectors (bcnn.projector) in the PROJECTOR tab with their class names and thumbnails."""
        self.writer.add_embedding(vectors, metadata=labels, label_img=thumbnails, global_step=global_step, tag=tag)
        self.writer.flush()

    def scalars(self, prefix: str, values: dict, global_step: int) -> None:
        """One evaluation's numbers (bcnn.eval: top-1, k-NN, retrieval) as prefix/<name>, at the checkpoint's step:
        beside the run's own val curves."""
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, global_step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
