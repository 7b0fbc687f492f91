"""One epoch of training and one pass of evaluation, on one process or many; the stage lives in the config.

`train_one_epoch` steps whatever parameters the optimizer holds (the classifier in stage 1, everything in
stage 2), accumulating gradients over `accum_steps` micro-batches per optimizer step, and can start part way
through an epoch (a resumed run). `evaluate` reports top-1, top-5 and mean per-class accuracy over every image
of a split exactly once, whether the split is read by one process or sharded over several.

A model returns (B, classes) logits, or a tuple of G such tensors: G classifiers on the same batch (the linear-probe
sweep, bcnn/probe_grid.py). Training then backpropagates the sum of their losses, whose gradient is each member's own
(d sum / d loss_g = 1), and evaluate returns a tuple of G results.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bcnn.data.loader import worker_errors
from bcnn.distributed import all_reduce_
from bcnn.precision import autocast
from bcnn.tta import average_view_logits, is_multi_view
from bcnn.errors import UserError

NO_BAD_STEP = 2**62


class TrainingDiverged(UserError):
    """The loss stopped being a finite number; the run stops and its last good checkpoint stays."""


@dataclass
class EpochMeter:
    """Running sums of one epoch, kept on the device (a .item() per step would stall a GPU every batch)."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: torch.Tensor
    first_bad_step: torch.Tensor  # global step of the first non-finite loss, NO_BAD_STEP while there is none
    members: int = 1  # classifiers whose losses and hits loss_sum and correct add up (a probe grid's G)

    @classmethod
    def zeros(cls, device, members: int = 1) -> EpochMeter:
        return cls(torch.zeros((), dtype=torch.float64, device=device),
                   torch.zeros((), dtype=torch.long, device=device),
                   torch.zeros((), dtype=torch.long, device=device),
                   torch.full((), NO_BAD_STEP, dtype=torch.long, device=device), members)

    @classmethod
    def resumed(cls, totals: dict | None, device, is_main: bool, members: int = 1) -> EpochMeter:
        """Continue an epoch's sums from a mid-epoch checkpoint; they are global, so rank 0 alone holds them."""
        meter = cls.zeros(device, members)
        if totals and is_main:
            meter.loss_sum += totals["loss_sum"]
            meter.correct += totals["correct"]
            meter.seen += totals["seen"]
        return meter

    def totals(self) -> dict:
        """The sums over all ranks as plain numbers (a collective: every rank must call it at the same point)."""
        packed = torch.stack([self.loss_sum, self.correct.double(), self.seen.double()])
        loss_sum, correct, seen = all_reduce_(packed).tolist()
        return {"loss_sum": loss_sum, "correct": int(correct), "seen": int(seen)}

    def raise_if_diverged(self, epoch: int, hint: str) -> None:
        """A collective as well: all ranks stop together when any of them saw a non-finite loss."""
        bad = all_reduce_(self.first_bad_step.clone(), op="min").item()
        if bad != NO_BAD_STEP:
            raise TrainingDiverged(
                f"the training loss became NaN or infinite at step {bad} (epoch {epoch}); {hint}"
            )


def to_device(images: torch.Tensor, device, channels_last: bool) -> torch.Tensor:
    """Only 4-d image batches take the channels_last layout (cached feature vectors are 2-d)."""
    if channels_last and images.dim() == 4:
        return images.to(device, non_blocking=True, memory_format=torch.channels_last)
    return images.to(device, non_blocking=True)


def as_members(output) -> tuple[torch.Tensor, ...]:
    """A model's logits as a tuple: a grid's G (B, classes) tensors, or a model's one."""
    return output if isinstance(output, tuple) else (output,)


def micro_batch_sizes(num_samples: int, batch_size: int) -> list[int]:
    """The sizes a loader over num_samples yields (the last batch partial), the same on every rank."""
    return [min(batch_size, num_samples - start) for start in range(0, num_samples, batch_size)]


@worker_errors()
def train_one_epoch(model, loader, optimizer, device, epoch: int, *, accum_steps: int = 1, scaler=None,
                    meter: EpochMeter | None = None, first_step: int = 0, after_step=None, on_report=None,
                    log_every: int = 20, diverged_hint: str = "", precision: str = "fp32",
                    channels_last: bool = False, label_smoothing: float = 0.0, clip_grad_norm: float = 0.0,
                    mix=None) -> dict:
    """Train over the loader; one optimizer step per `accum_steps` micro-batches (the last step of an epoch
    may have fewer). The loss of each micro-batch is weighted by its share of the step's images, so the
    update equals that of one big batch; DDP's gradient all-reduce runs only on a step's last micro-batch.

    model: returns logits, or a tuple of G (a grid of classifiers): the loss backpropagated is the sum of their
    losses, and the reported loss and top-1 are their mean over the members (meter.members must be G).
    precision: the backbone's autocast (bcnn.precision); the head and the loss stay float32.
    label_smoothing: of the training loss (torch's cross_entropy); clip_grad_norm > 0: the gradients' global L2
    norm clipped to it before each optimizer step (after unscaling, under fp16).
    mix(images, targets, epoch, step, position) -> (images, soft targets): mixup / CutMix of each micro-batch
    (bcnn.mixing.BatchMixer; None: off); the soft targets then hold the label smoothing, and top-1 counts the
    images' own labels.
    first_step: optimizer steps of this epoch already done before a resume (the loader then starts after them).
    after_step(step, meter): called after each optimizer step (step counts from the epoch start), e.g. to
    write a mid-epoch checkpoint.
    on_report(step, stats): every `log_every` steps and at the end, with the loss, top-1 and images/s over
    all ranks since the previous report, and the lr of each parameter group.
    Returns the epoch's loss, top-1, images and seconds (over all ranks).
    """
    model.train()
    meter = meter or EpochMeter.zeros(device)
    sizes = micro_batch_sizes(len(loader.sampler), loader.batch_size)
    steps = math.ceil(len(sizes) / accum_steps)
    start, at_start = time.perf_counter(), meter.totals()  # a resumed epoch starts with its earlier sums
    window = {"time": start, **at_start}  # what the previous report had seen
    step, micro_batches = first_step, iter(loader)
    for step_in_call in range(steps):
        group = sizes[step_in_call * accum_steps:(step_in_call + 1) * accum_steps]
        step_images = sum(group)
        optimizer.zero_grad(set_to_none=True)
        for position, size in enumerate(group):
            images, targets = next(micro_batches)
            images = to_device(images, device, channels_last)
            targets = targets.to(device, non_blocking=True)
            soft = None
            if mix is not None:
                images, soft = mix(images, targets, epoch, step, position)
            last = position == len(group) - 1
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast(precision, device):
                    members = as_members(model(images))
                if len(members) != meter.members:
                    raise ValueError(f"the model gave {len(members)} classifiers' logits, the meter sums "
                                     f"{meter.members}")
                if soft is None:
                    losses = [F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
                              for logits in members]
                else:  # timm's SoftTargetCrossEntropy: -sum(q log p)
                    losses = [torch.sum(-soft * F.log_softmax(logits.float(), dim=1), dim=1).mean()
                              for logits in members]
                loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
                weighted = loss * (size / step_images)
                (scaler.scale(weighted) if scaler is not None else weighted).backward()
            meter.loss_sum += loss.detach().double() * size
            for logits in members:
                meter.correct += (logits.detach().argmax(1) == targets).sum()
            meter.seen += size
            # Recorded on the device (no sync); steps only grow, so a clamp keeps the first bad one.
            bad = ~torch.isfinite(loss.detach())
            meter.first_bad_step.copy_(torch.where(bad, meter.first_bad_step.clamp(max=step + 1),
                                                   meter.first_bad_step))
        if clip_grad_norm:
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not fp16's scaled ones
            torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                           clip_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        step += 1
        if log_every and (step % log_every == 0 or step_in_call == steps - 1):
            meter.raise_if_diverged(epoch, diverged_hint)
            now, totals = time.perf_counter(), meter.totals()
            seen = max(totals["seen"] - window["seen"], 1)
            stats = {"loss": (totals["loss_sum"] - window["loss_sum"]) / (seen * meter.members),
                     "top1": 100 * (totals["correct"] - window["correct"]) / (seen * meter.members),
                     "images_per_sec": seen / max(now - window["time"], 1e-9),
                     "lr": {group.get("name", str(i)): group["lr"] for i, group in enumerate(optimizer.param_groups)}}
            window = {"time": now, **totals}
            if on_report is not None:
                on_report(step, stats)
        if after_step is not None:
            after_step(step, meter)
    meter.raise_if_diverged(epoch, diverged_hint)
    totals = meter.totals()
    seen = max(totals["seen"], 1) * meter.members
    seconds = time.perf_counter() - start
    return {"loss": totals["loss_sum"] / seen, "top1": 100 * totals["correct"] / seen, "images": totals["seen"],
            "seconds": seconds, "images_per_sec": (totals["seen"] - at_start["seen"]) / seconds}


@dataclass
class Tally:
    """One classifier's counts over a split, kept on the device: [true, predicted] counts, top-5 hits, the loss's
    sum and the images whose logits hold NaN or inf."""

    counts: torch.Tensor
    top5_hits: torch.Tensor
    loss_sum: torch.Tensor
    nonfinite: torch.Tensor

    @classmethod
    def zeros(cls, num_classes: int, device) -> Tally:
        return cls(torch.zeros(num_classes, num_classes, dtype=torch.long, device=device),
                   torch.zeros((), dtype=torch.long, device=device),
                   torch.zeros((), dtype=torch.float64, device=device),
                   torch.zeros((), dtype=torch.long, device=device))

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        num_classes = self.counts.shape[0]
        self.nonfinite += (~torch.isfinite(logits).all(dim=1)).sum()
        self.loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
        top_k = logits.topk(min(5, num_classes), dim=1).indices  # (B, k)
        self.top5_hits += (top_k == targets[:, None]).any(dim=1).sum()
        self.counts += torch.bincount(targets * num_classes + top_k[:, 0],
                                      minlength=num_classes * num_classes).view(num_classes, num_classes)

    def result(self, precision: str, confusion: bool) -> dict:
        """The numbers over all ranks (a collective: every rank calls it at the same point)."""
        all_reduce_(self.counts)
        all_reduce_(self.top5_hits)
        all_reduce_(self.loss_sum)
        all_reduce_(self.nonfinite)
        counts = self.counts.cpu()
        images_per_class = counts.sum(1)
        count = int(images_per_class.sum())
        if count == 0:
            raise ValueError("evaluate() was given an empty loader")
        if self.nonfinite:  # argmax reads NaN as class 0: an accuracy from them would be made up
            raise UserError(f"the model's class scores are NaN or inf on {int(self.nonfinite)} of the {count} images, "
                            f"so no class can be read from them (precision {precision}); evaluate in fp32, or use a "
                            "checkpoint from before the run diverged.")
        correct_per_class = counts.diagonal()
        present = images_per_class > 0  # classes absent from the split do not count in the mean
        per_class = correct_per_class[present].double() / images_per_class[present].double()
        result = {
            "top1": 100 * int(correct_per_class.sum()) / count,
            "top5": 100 * int(self.top5_hits) / count,  # top-k with k = min(5, classes)
            "mean_class_acc": 100 * per_class.mean().item(),
            "loss": self.loss_sum.item() / count,
            "count": count,
        }
        if confusion:
            result["confusion"] = counts
        return result


@worker_errors()
@torch.no_grad()
def evaluate(model, loader, device, num_classes: int, tta: str = "none", confusion: bool = False,
             precision: str = "fp32", channels_last: bool = False) -> dict | tuple[dict, ...]:
    """Accuracy in percent. tta="flip" averages the logits of each image and its mirror; a multi-view tta
    (bcnn.tta: five_crop, ten_crop, multiscale) takes a loader of (B, V, 3, H, W) views, forwards them as one
    (B*V, 3, H, W) batch and averages each image's V logits. With confusion=True the result also holds
    "confusion", a (classes, classes) LongTensor of counts [true class, predicted class]. A model that returns a
    tuple of logits (a probe grid's classifiers) gets a tuple of results, one per classifier.

    Under DDP each rank reads its own shard (no padding: every image once) and the counts are summed over
    ranks, so every rank returns the numbers one process would (a grid runs in one process: a rank whose shard is
    empty could not tell how many classifiers to count for).
    """
    model.eval()
    tallies, grid = None, False
    for images, targets in loader:
        if is_multi_view(tta) != (images.dim() == 5):
            raise ValueError(f"tta={tta!r} and a loader of {images.dim()}-d batches: a multi-view tta needs the "
                             "(B, V, 3, H, W) views of bcnn.tta.view_transform, and only it")
        views = images.shape[1] if images.dim() == 5 else 1
        images = to_device(images.flatten(0, 1) if views > 1 else images, device, channels_last)
        targets = targets.to(device, non_blocking=True)
        with autocast(precision, device):
            output = model(images)
            grid = isinstance(output, tuple)
            members = [logits.float() for logits in as_members(output)]
            if tta == "flip":
                mirrored = as_members(model(torch.flip(images, dims=[3])))
                members = [(logits + mirror.float()) / 2 for logits, mirror in zip(members, mirrored)]
        if views > 1:
            members = [average_view_logits(logits, views) for logits in members]  # (B, classes) each
        tallies = tallies or [Tally.zeros(num_classes, device) for _ in members]
        for tally, logits in zip(tallies, members):
            tally.add(logits, targets)
    results = tuple(tally.result(precision, confusion) for tally in tallies or [Tally.zeros(num_classes, device)])
    return results if grid else results[0]
