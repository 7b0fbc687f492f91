"""One epoch of training and one pass of evaluation; everything stage-specific lives in the config.

`train_one_epoch` steps whatever parameters the optimizer holds (the classifier in stage 1, everything in
stage 2); `evaluate` reports top-1, top-5 and mean per-class accuracy over every image of a loader exactly once.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

log = logging.getLogger("bcnn")


def train_one_epoch(model, loader, optimizer, device, epoch: int, log_every: int = 20) -> dict:
    model.train()
    # Running sums stay on the device: a .item() per step would stall the GPU pipeline every batch.
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    start = time.perf_counter()
    for step, (images, targets) in enumerate(loader, start=1):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        logits = model(images)
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        batch = targets.numel()
        total_loss += loss.detach() * batch
        correct += (logits.detach().argmax(1) == targets).sum()
        seen += batch
        if log_every and (step % log_every == 0 or step == len(loader)):
            log.info(
                "epoch %d [%d/%d] loss %.4f top1 %.2f%% %.1f img/s",
                epoch, step, len(loader), total_loss.item() / seen, 100 * correct.item() / seen,
                seen / (time.perf_counter() - start),
            )
    return {"loss": total_loss.item() / seen, "top1": 100 * correct.item() / seen, "images": seen,
            "seconds": time.perf_counter() - start}


@torch.no_grad()
def evaluate(model, loader, device, num_classes: int, tta: str = "none") -> dict:
    """Accuracy in percent. tta="flip" averages the logits of each image and its mirror."""
    model.eval()
    total_loss, top1, top5, count = 0.0, 0, 0, 0
    k = min(5, num_classes)
    correct_per_class = torch.zeros(num_classes, dtype=torch.long)
    images_per_class = torch.zeros(num_classes, dtype=torch.long)
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        logits = model(images)
        if tta == "flip":
            logits = (logits + model(torch.flip(images, dims=[3]))) / 2
        total_loss += F.cross_entropy(logits, targets, reduction="sum").item()
        hits_k = logits.topk(k, dim=1).indices == targets[:, None]  # (B, k)
        hit1 = hits_k[:, 0]
        top1 += hit1.sum().item()
        top5 += hits_k.any(dim=1).sum().item()
        count += targets.numel()
        targets, hit1 = targets.cpu(), hit1.cpu()
        images_per_class += torch.bincount(targets, minlength=num_classes)
        correct_per_class += torch.bincount(targets[hit1], minlength=num_classes)
    if count == 0:
        raise ValueError("evaluate() was given an empty loader")
    present = images_per_class > 0  # classes absent from the split do not count in the mean
    per_class = correct_per_class[present].double() / images_per_class[present].double()
    return {
        "top1": 100 * top1 / count,
        "top5": 100 * top5 / count,  # top-k with k = min(5, classes)
        "mean_class_acc": 100 * per_class.mean().item(),
        "loss": total_loss / count,
        "count": count,
    }
