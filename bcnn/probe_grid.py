"""The linear-probe sweep, train.probe_grid: a grid of linear classifiers trained side by side on the feature cache's
batches, one per (learning rate, weight decay) of the grid, each with its own optimizer state and schedule, and the
one best on val kept (dinov2/eval/linear.py trains its grid of learning rates so). bcnn.train runs it:

    python -m bcnn.train --config experiments/cub_vgg16_stage1.yaml --train.cache_features=true \\
        --train.probe_grid="{lr: [0.1, 0.3, 1, 3], weight_decay: [0, 1e-8, 1e-4]}"

    grid = ProbeGrid(cfg, model)                  # G copies of model.classifier, and their optimizers
    logits = grid.classifiers(features)           # a tuple of G (B, classes) logits (bcnn.engine sums their losses)
    scheduler = build_schedules(cfg, grid.optimizer, steps_per_epoch)   # each member's, or a plain run's
    grid.select(g)                                # member g's weights into model.classifier: best.pt is plain

Each member is, to the bit, the classifier a plain stage-1 run (train.cache_features=true, the same seed) trains
with optim.lr and optim.weight_decay set to that member's: every member starts from a copy of the freshly built
classifier (the plain run's initial weights), computes its logits with its own nn.Linear on the same batch, and the
loss backpropagated is the sum of the members' losses, whose gradient with respect to each member's loss is exactly
1, so each member gets the gradient its plain run computes. Each member's optimizer and schedule are built by
bcnn.optim from the config of its plain run (member_config), so its lr under warmup, cosine (whose floor is
schedule.min_lr, as in its plain run) or plateau (on its own val top-1) is that run's. tests/test_probe_grid.py
compares a sweep with the plain runs of its members.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools

import torch
from torch import nn

from bcnn.config import Config
from bcnn.errors import UserError
from bcnn.optim import after_optimizer_step, build_optimizer, build_scheduler, step_schedule

PREFIX = "probe"  # of the members' parameter groups, metrics.jsonl keys and TensorBoard tags: probe/<member>/...


def member_settings(cfg: Config) -> list[tuple[float, float]]:
    """The grid's (lr, weight decay) pairs, learning rate major; a list left out is optim.lr's or
    optim.weight_decay's one value."""
    grid = cfg.train.probe_grid
    return list(itertools.product(grid.get("lr", [cfg.optim.lr]), grid.get("weight_decay", [cfg.optim.weight_decay])))


def member_name(lr: float, weight_decay: float) -> str:
    return f"lr={lr!r},wd={weight_decay!r}"


def member_config(cfg: Config, lr: float, weight_decay: float) -> Config:
    """The config of the member's plain run."""
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=lr, weight_decay=weight_decay))


def check_world_size(cfg: Config, world_size: int) -> None:
    if cfg.train.probe_grid and world_size > 1:
        raise UserError("train.probe_grid runs in one process: under torchrun DDP would all-reduce the members' "
                        "gradients in buckets laid out unlike a plain run's, so no member would equal its plain run "
                        "to the bit; run the sweep without torchrun (the feature cache can still be computed with it).")


class Classifiers(nn.Module):
    """G linear classifiers over the same vectors: (B, D) -> a tuple of G (B, classes) logits, each member's computed
    by its own nn.Linear as the plain run's classifier computes its own."""

    def __init__(self, classifier: nn.Linear, count: int):
        super().__init__()
        self.members = nn.ModuleList(copy.deepcopy(classifier) for _ in range(count))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(member(features) for member in self.members)


class ClassifierGroups:
    """What build_optimizer asks of a model, for a classifier alone (a member): the parameter groups
    BilinearCNN.param_groups gives a frozen backbone's run (the classifier's weight and bias, at classifier_lr)."""

    def __init__(self, classifier: nn.Linear, name: str):
        self.classifier, self.name = classifier, name

    def param_groups(self, classifier_lr: float, **_) -> list[dict]:
        return [{"params": [p for p in self.classifier.parameters() if p.requires_grad], "lr": classifier_lr,
                 "name": self.name}]


class MemberOptimizers:
    """The members' optimizers, each built as its plain run builds it, with the face train_one_epoch, GradScaler and a
    checkpoint ask of one optimizer: param_groups (every member's group), zero_grad, step, state_dict."""

    _step_supports_amp_scaling = True  # build_optimizer's are fused: GradScaler hands them its scale, as for one

    def __init__(self, optimizers: list[torch.optim.Optimizer], configs: list[Config]):
        self.optimizers, self.configs = optimizers, configs

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        scaling = {name: getattr(self, name) for name in ("grad_scale", "found_inf") if hasattr(self, name)}
        for optimizer in self.optimizers:
            for name, value in scaling.items():  # what GradScaler.step sets on the optimizer it steps
                setattr(optimizer, name, value)
            optimizer.step()
            for name in scaling:
                delattr(optimizer, name)

    def state_dict(self) -> dict:
        return {"members": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        _check_count(state, self.optimizers)
        for optimizer, member_state in zip(self.optimizers, state["members"]):
            optimizer.load_state_dict(member_state)


class MemberSchedules:
    """The members' schedules, each built by bcnn.optim.build_scheduler over the member's optimizer and config."""

    def __init__(self, schedulers: list):
        self.schedulers = schedulers

    def state_dict(self) -> dict:
        return {"members": [scheduler.state_dict() for scheduler in self.schedulers]}

    def load_state_dict(self, state: dict) -> None:
        _check_count(state, self.schedulers)
        for scheduler, member_state in zip(self.schedulers, state["members"]):
            scheduler.load_state_dict(member_state)


def _check_count(state: dict, members: list) -> None:
    if len(state["members"]) != len(members):  # a KeyError above for a plain run's state: the resume says so
        raise ValueError(f"{len(state['members'])} members saved, {len(members)} in this grid")


def build_schedules(cfg: Config, optimizer, steps_per_epoch: int | None = None):
    """bcnn.optim.build_scheduler, for a plain optimizer or for each of a grid's members from its own config."""
    if not isinstance(optimizer, MemberOptimizers):
        return build_scheduler(cfg, optimizer, steps_per_epoch)
    schedulers = [build_scheduler(member_cfg, member, steps_per_epoch)
                  for member_cfg, member in zip(optimizer.configs, optimizer.optimizers)]
    return None if schedulers[0] is None else MemberSchedules(schedulers)


def after_optimizer_steps(scheduler) -> None:
    """bcnn.optim.after_optimizer_step, for a plain schedule or each member's."""
    for each in scheduler.schedulers if isinstance(scheduler, MemberSchedules) else [scheduler]:
        after_optimizer_step(each)


def step_schedules(scheduler, val_stats) -> None:
    """bcnn.optim.step_schedule at an epoch's end, for a plain schedule, or each member's on its own val numbers."""
    if isinstance(scheduler, MemberSchedules):
        for each, stats in zip(scheduler.schedulers, val_stats):
            step_schedule(each, stats)
    else:
        step_schedule(scheduler, val_stats)


class ProbeGrid:
    """The sweep's members on a model whose backbone is frozen: their classifiers (the step model), their optimizers,
    and how the winner goes into the model for best.pt."""

    def __init__(self, cfg: Config, model):
        self.model, self.settings = model, member_settings(cfg)
        self.names = [member_name(lr, weight_decay) for lr, weight_decay in self.settings]
        self.classifiers = Classifiers(model.classifier, len(self.settings))
        configs = [member_config(cfg, lr, weight_decay) for lr, weight_decay in self.settings]
        self.optimizer = MemberOptimizers(
            [build_optimizer(member_cfg, ClassifierGroups(member, f"{PREFIX}/{name}"))
             for member_cfg, member, name in zip(configs, self.classifiers.members, self.names)], configs)

    def __len__(self) -> int:
        return len(self.settings)

    def describe(self) -> str:
        lrs = sorted({lr for lr, _ in self.settings})
        decays = sorted({weight_decay for _, weight_decay in self.settings})
        return (f"probe grid: {len(self)} linear classifiers side by side on the same batches (learning rates "
                f"{', '.join(map(repr, lrs))} x weight decays {', '.join(map(repr, decays))}), each with its own "
                "optimizer and schedule; best.pt keeps the best on val")

    def diverged_hint(self, run_path) -> str:
        return (f"one of train.probe_grid's members diverged: drop its largest learning rates (up to "
                f"{max(lr for lr, _ in self.settings)!r}) and start again with --overwrite; the last good checkpoint, "
                f"if any, is untouched in {run_path}")

    def epoch_entries(self, member_stats: tuple[dict, ...], best: int) -> dict:
        """metrics.jsonl's entries: each member's val numbers (probe/<member>/val_top1 and val_loss), and which member
        was the epoch's best (probe_member; the row's val_* are its)."""
        return {f"{PREFIX}_member": self.names[best],
                **{f"{PREFIX}/{name}/val_{key}": stats[key] for name, stats in zip(self.names, member_stats)
                   for key in ("top1", "loss")}}

    @torch.no_grad()
    def select(self, member: int) -> None:
        """Member's weights into model.classifier, where best.pt (and last.pt's model) keep the best so far."""
        for kept, trained in zip(self.model.classifier.parameters(), self.classifiers.members[member].parameters()):
            kept.copy_(trained)

    def best_entries(self, config: dict, member: int) -> dict:
        """What best.pt says of its member: the config of its plain run (the winner's optim.lr and
        optim.weight_decay; train.probe_grid still says it came from a sweep), and the member's settings."""
        lr, weight_decay = self.settings[member]
        config = copy.deepcopy(config)
        config["optim"].update(lr=lr, weight_decay=weight_decay)
        return {"config": config, "probe_grid": {"member": self.names[member], "lr": lr,
                                                 "weight_decay": weight_decay, "members": len(self)}}

    def state_dict(self) -> dict:
        """last.pt's entry: every member's weights, by name."""
        return {"names": list(self.names), "classifiers": self.classifiers.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise ValueError(f"the checkpoint's members are {state['names']}, this grid's {self.names}")
        self.classifiers.load_state_dict(state["classifiers"])

    def summary(self, rows: list[dict]) -> list[str]:
        """train.log's table of the members from the run's metrics.jsonl rows: each one's best val top-1 and its
        epoch (the first at that value), and the winner (best top-1, then the earliest epoch, then the first in the
        grid: the member best.pt holds)."""
        best = []
        for name in self.names:
            scores = [(row[f"{PREFIX}/{name}/val_top1"], -row["epoch"]) for row in rows]
            best.append(max(scores) if scores else (float("nan"), 0))
        winner = max(range(len(self)), key=lambda member: best[member])
        lines = [f"probe grid: {len(self)} members, picked by val top-1 (best.pt holds the winner's classifier)",
                 f"  {'lr':>10} {'weight_decay':>12} {'best val top1':>14} {'epoch':>6}"]
        for member, ((lr, weight_decay), (top1, epoch)) in enumerate(zip(self.settings, best)):
            lines.append(f"  {lr!r:>10} {weight_decay!r:>12} {top1:>13.2f}% {-epoch:>6}"
                         f"{'  <- winner' if member == winner else ''}")
        (lr, weight_decay), (top1, epoch) = self.settings[winner], best[winner]
        lines.append(f"probe grid winner: optim.lr={lr!r}, optim.weight_decay={weight_decay!r} (val top-1 "
                     f"{top1:.2f}% at epoch {-epoch})")
        return lines
