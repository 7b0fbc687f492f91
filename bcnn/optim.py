"""The optimizer and the learning-rate schedule a config describes.

    optimizer = build_optimizer(cfg, model)                       # SGD/Adam/AdamW over model.param_groups(...)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)  # plateau, step, cosine, warmup, or None
    after_optimizer_step(scheduler)                               # every optimizer step: warmup, cosine per step
    step_schedule(scheduler, val_stats)                           # once per epoch; plateau watches val top-1

Without warmup and with schedule.unit=epoch the schedules are torch's, stepped once per epoch (as every recipe
before the transformer backbones, whose checkpoints stay valid; cosine is torch's CosineAnnealingLR with each
group's own floor, CosineByEpoch). With schedule.warmup_epochs > 0 or schedule.unit=step, StepSchedule sets every
group's lr at every optimizer step t from a formula (below).

A cosine's floor is per group: schedule.min_lr is the classifier's final lr (the group whose peak is optim.lr), and
every group ends at the same fraction min_lr / optim.lr of its own peak, as MAE's lr_sched.adjust_learning_rate
scales its floor with each group's lr_scale; with layer decay an absolute floor would leave the groups whose peak is
below it flat, or rising. plateau's min_lr stays torch's absolute floor.
"""

from __future__ import annotations

import math

import torch

from bcnn.config import Config


def build_optimizer(cfg: Config, model) -> torch.optim.Optimizer:
    """Fused kernels: one pass over each parameter per step. The 262,144 x 200 classifier makes the update
    memory-bound (about 5x faster fused than the default on a CPU, measured with python -m bcnn.bench).
    optim.layer_decay < 1: the backbone's groups by depth (timm's layer-decay groups; bcnn.models.backbones)."""
    opt = cfg.optim
    groups = model.param_groups(backbone_lr=opt.backbone_lr, classifier_lr=opt.lr, layer_decay=opt.layer_decay,
                                weight_decay=opt.weight_decay)
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay, fused=True)
    optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[opt.name]
    return optimizer_class(groups, lr=opt.lr, weight_decay=opt.weight_decay, fused=True)


def floor_fraction(cfg: Config) -> float:
    """The fraction of its peak each group's cosine ends at: schedule.min_lr over the classifier's peak, optim.lr
    (at most 1: a floor above the peak holds the peak; 0 when optim.lr is 0)."""
    return min(cfg.schedule.min_lr / cfg.optim.lr, 1.0) if cfg.optim.lr > 0 else 0.0


def cosine(peak: float, floor: float, progress: float) -> float:
    """From peak at progress 0 to floor at 1 (clamped to [0, 1]): MAE's and timm's floor + (peak - floor) (1 +
    cos(pi u)) / 2, written as a drop from the peak so that u = 0 gives the peak exactly."""
    progress = min(max(progress, 0.0), 1.0)
    return peak - (peak - floor) * 0.5 * (1 - math.cos(math.pi * progress))


class StepSchedule:
    """Each group's lr at optimizer step t (0 = the first step of the run), from its configured (peak) lr b, with
    W warmup steps, S = steps_per_epoch, T = epochs * S, e = t // S the epoch and f = floor_fraction(cfg):

        cosine:  t < W: b (t + 1) / W        (linear, reaching b at the last warmup step, t = W - 1)
                 t >= W: f b + (1 - f) b (1 + cos(pi u)) / 2,   u = (t - W) / (T - W)   (schedule.unit=step)
                                                                u = max(0, e S - W) / (T - W)   (unit=epoch)
        step:    b min(1, (t + 1) / W) factor^(e // step_size);   none: b min(1, (t + 1) / W)

    The cosine runs over the steps that remain after the warmup, as MAE (lr_sched.adjust_learning_rate) and DeiT
    (timm's CosineLRScheduler with warmup_t) run it; unit=epoch holds each epoch at its start's value (u clamped to
    [0, 1]; W >= T never leaves the warmup). A function of t alone: its state is t, which a resumed run restores."""

    def __init__(self, cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
        self.optimizer, self.steps_per_epoch = optimizer, steps_per_epoch
        self.total_steps, self.sched = cfg.train.epochs * steps_per_epoch, cfg.schedule
        self.warmup_steps = round(cfg.schedule.warmup_epochs * steps_per_epoch)
        self.floor_fraction = floor_fraction(cfg)
        for group in optimizer.param_groups:  # kept in the optimizer's state: a resumed run finds the configured lr
            group.setdefault("base_lr", group["lr"])
        self.step_count = 0
        self.apply()

    def lr(self, step: int, peak: float) -> float:
        warmup_steps, sched = self.warmup_steps, self.sched
        warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0  # (t + 1) / W is exactly 1 at t = W - 1
        if sched.name == "cosine":
            if step < warmup_steps:
                return peak * warmup
            start = step if sched.unit == "step" else step // self.steps_per_epoch * self.steps_per_epoch
            remaining = self.total_steps - warmup_steps  # none when the warmup fills the run: hold the peak
            progress = (start - warmup_steps) / remaining if remaining > 0 else 0.0
            return cosine(peak, peak * self.floor_fraction, progress)
        decay = sched.factor ** (step // self.steps_per_epoch // sched.step_size) if sched.name == "step" else 1.0
        return peak * warmup * decay

    def apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(self.step_count, group["base_lr"])

    def step(self) -> None:
        self.step_count += 1
        self.apply()

    def state_dict(self) -> dict:
        return {"step_schedule": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step_schedule"]  # a KeyError for an epoch scheduler's state: the resume says so
        self.apply()


class CosineByEpoch(torch.optim.lr_scheduler.CosineAnnealingLR):
    """torch's CosineAnnealingLR stepped once per epoch, its state unchanged (a checkpoint of it resumes), each
    group's floor its own: peak * floor_fraction, in closed form."""

    def __init__(self, optimizer: torch.optim.Optimizer, epochs: int, floor_fraction: float):
        self.floor_fraction = floor_fraction  # before torch's __init__, which sets the first lr
        super().__init__(optimizer, T_max=epochs)

    def get_lr(self) -> list[float]:
        return [cosine(peak, peak * self.floor_fraction, self.last_epoch / self.T_max) for peak in self.base_lrs]


def per_step(cfg: Config) -> bool:
    """Whether the lr is a StepSchedule's formula of the optimizer step (warmup, or schedule.unit=step)."""
    return cfg.schedule.warmup_epochs > 0 or cfg.schedule.unit == "step"


def build_scheduler(cfg: Config, optimizer, steps_per_epoch: int | None = None):
    """torch's scheduler stepped once per epoch (step_schedule), built before the optimizer's state is restored
    (torch's schedulers set the lr as they are built); or, when per_step(cfg), a StepSchedule, which needs the
    epoch's length and may be built at any time (its configured lrs live in the optimizer's groups). None for
    schedule.name=none, and for a per-step schedule while steps_per_epoch is not known."""
    sched = cfg.schedule
    if per_step(cfg):
        return StepSchedule(cfg, optimizer, steps_per_epoch) if steps_per_epoch else None
    if sched.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=sched.factor, patience=sched.patience, min_lr=sched.min_lr
        )
    if sched.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=sched.step_size, gamma=sched.factor)
    if sched.name == "cosine":
        return CosineByEpoch(optimizer, cfg.train.epochs, floor_fraction(cfg))
    return None


def after_optimizer_step(scheduler) -> None:
    """Every optimizer step: a StepSchedule sets the next step's lr; torch's epoch schedulers wait for the epoch."""
    if isinstance(scheduler, StepSchedule):
        scheduler.step()


def step_schedule(scheduler, val_stats: dict | None) -> None:
    """The end of an epoch: plateau steps on the val top-1 (config validation guarantees a val split for it)."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_stats["top1"])
    elif scheduler is not None and not isinstance(scheduler, StepSchedule):
        scheduler.step()


def _ema_update(decay: float):
    """torch's AveragedModel update for an exponential moving average: floating-point tensors move toward the
    model's by (1 - decay); integer buffers (the compact head's hashes, batch-norm counters) are copied, never
    averaged (an average of integers would round them)."""
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], _count) -> None:
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1 - decay)
        else:
            torch._foreach_copy_(averaged, current)
    return update


def build_ema(cfg: Config, model):
    """train.ema_decay > 0: an exponential moving average of every weight and buffer (torch.optim.swa_utils.
    AveragedModel), updated after each optimizer step (update_ema): after the first step it is the weights w_1,
    then e_t = decay * e_(t-1) + (1 - decay) * w_t. None when off."""
    if not cfg.train.ema_decay:
        return None
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=_ema_update(cfg.train.ema_decay),
                                               use_buffers=True)


def update_ema(ema, model) -> None:
    if ema is not None:
        ema.update_parameters(model)
