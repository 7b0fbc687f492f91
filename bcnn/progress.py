"""Progress of a training epoch: a tqdm bar on a terminal, periodic log lines everywhere else.

A bar redrawn with carriage returns is what a person at a terminal wants; in a CI log or a cluster job's
output file it would be thousands of half-lines, so there the same numbers come as one line every
`train.log_every` steps. The lines always reach train.log.
"""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

log = logging.getLogger("bcnn")
LAYER_GROUP, NO_WEIGHT_DECAY = "backbone_layer", "_no_wd"  # the layer-decay groups' names (bcnn.models.timm_maps)


class ConsoleFilter(logging.Filter):
    """Keeps records logged with extra={"to_console": False} (progress lines a bar already shows) off the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "to_console", True)


def logged_lrs(lrs: dict) -> dict:
    """The groups' lrs a progress line shows: all of them, except that of the backbone's groups by depth (layer
    decay, about 26 for a ViT-B) only the top and bottom depths, each the weight-decayed group where there is one
    ("_no_wd": the same depth without weight decay). metrics.jsonl and TensorBoard keep every group."""
    by_depth = {}  # depth -> its group names, the weight-decayed one first
    for name in lrs:
        if name.startswith(LAYER_GROUP):
            depth = int(name[len(LAYER_GROUP):].removesuffix(NO_WEIGHT_DECAY))
            by_depth.setdefault(depth, []).append(name)
    ends = {sorted(by_depth[depth], key=lambda name: name.endswith(NO_WEIGHT_DECAY))[0]
            for depth in (max(by_depth), min(by_depth))} if by_depth else set()
    return {name: lr for name, lr in lrs.items() if not name.startswith(LAYER_GROUP) or name in ends}


def format_stats(stats: dict) -> str:
    lrs = " ".join(f"lr_{name} {lr:.3g}" for name, lr in logged_lrs(stats["lr"]).items())
    return f"loss {stats['loss']:.4f} top1 {stats['top1']:.2f}% {lrs} {stats['images_per_sec']:.1f} img/s"


class EpochProgress:
    """One epoch's progress. `enabled` is False on ranks other than 0; `interactive` defaults to whether
    stderr (where tqdm draws) is a terminal."""

    def __init__(self, epoch: int, total_steps: int, first_step: int = 0, enabled: bool = True,
                 interactive: bool | None = None, stream=None):
        stream = stream if stream is not None else sys.stderr
        self.epoch, self.total_steps, self.enabled = epoch, total_steps, enabled
        self.interactive = enabled and (stream.isatty() if interactive is None else interactive)
        self.bar = (tqdm(total=total_steps, initial=first_step, desc=f"epoch {epoch}", unit="step", file=stream,
                         dynamic_ncols=True, leave=False) if self.interactive else None)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def report(self, step: int, stats: dict) -> None:
        """stats: loss and top1 over the steps since the last report, lr per group, images_per_sec."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(format_stats(stats), refresh=True)
        log.info("epoch %d [%d/%d] %s", self.epoch, step, self.total_steps, format_stats(stats),
                 extra={"to_console": self.bar is None})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
