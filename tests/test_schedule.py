"""The learning-rate schedule as MAE, DeiT and timm run it (issue 29): a linear warmup to each group's peak, then a
cosine over the steps that remain, each group ending at the same fraction of its own peak; against the closed form
at every step of a small run, for several groups (layer decay's among them). And the progress line's lrs."""

import math

import pytest
import torch
from torch import nn

from bcnn.config import ModelConfig, load_config
from bcnn.models import build_model
from bcnn.optim import CosineByEpoch, StepSchedule, build_scheduler
from bcnn.progress import format_stats, logged_lrs

# 3 epochs of 4 steps, the first epoch a warmup; the classifier's peak is optim.lr, its floor schedule.min_lr.
STEPS, EPOCHS, WARMUP = 4, 3, 4
LR, MIN_LR = 0.1, 0.002
# The classifier, a plain backbone, and three of a layer-decayed backbone's groups (decay 0.5 by depth).
PEAKS = {"classifier": LR, "backbone": 0.01, "backbone_layer2": 0.004, "backbone_layer1": 0.002,
         "backbone_layer0_no_wd": 0.001}
# Closed form and schedule round differently (the same terms in another order): a few ulps of a double.
REL = 1e-12


def optimizer_of(peaks=PEAKS):
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr, "name": name} for name, lr in peaks.items()]
    return torch.optim.SGD(groups, lr=LR)


def config(*options):
    return load_config(None, [f"--train.epochs={EPOCHS}", f"--optim.lr={LR}", "--schedule.name=cosine",
                              f"--schedule.min_lr={MIN_LR}", f"--schedule.warmup_epochs={WARMUP / STEPS}", *options])


def expected_lr(t, peak, unit):
    """MAE's lr_sched.adjust_learning_rate, with the floor scaled to the group as MAE's lr_scale does:
    (t + 1) / W of the peak in the warmup, then floor + (peak - floor) (1 + cos(pi u)) / 2."""
    if t < WARMUP:
        return peak * (t + 1) / WARMUP
    start = t if unit == "step" else t // STEPS * STEPS  # unit=epoch: the value at the start of t's epoch
    u = min(1.0, (start - WARMUP) / (EPOCHS * STEPS - WARMUP))
    floor = peak * MIN_LR / LR
    return floor + (peak - floor) * (1 + math.cos(math.pi * u)) / 2


def lrs_over_run(scheduler, optimizer, steps):
    """Each step's lr of every group (name -> lr), as the training loop sees them: read, step, schedule."""
    seen = []
    for _ in range(steps):
        seen.append({group["name"]: group["lr"] for group in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("unit", ["step", "epoch"])
def test_warmup_then_cosine_over_the_remaining_steps_at_every_step_of_every_group(unit):
    optimizer = optimizer_of()
    scheduler = build_scheduler(config(f"--schedule.unit={unit}"), optimizer, STEPS)
    assert isinstance(scheduler, StepSchedule)
    seen = lrs_over_run(scheduler, optimizer, EPOCHS * STEPS)
    for t, lrs in enumerate(seen):
        for name, peak in PEAKS.items():
            assert lrs[name] == pytest.approx(expected_lr(t, peak, unit), rel=REL), (t, name)
    # By hand: the cosine's half-way point is the mean of peak and floor, at step 8 of 12 (u = 4/8) for unit=step
    # and at epoch 2's first step for both; unit=epoch holds epoch 1 at the peak.
    assert seen[8]["classifier"] == pytest.approx((LR + MIN_LR) / 2, rel=REL)
    assert seen[7]["classifier"] == (LR if unit == "epoch" else pytest.approx(expected_lr(7, LR, unit), rel=REL))


def test_the_peak_is_reached_exactly_at_the_end_of_the_warmup():
    optimizer = optimizer_of()
    seen = lrs_over_run(build_scheduler(config("--schedule.unit=step"), optimizer, STEPS), optimizer, WARMUP + 1)
    for name, peak in PEAKS.items():
        assert seen[0][name] == pytest.approx(peak / WARMUP, rel=REL)
        assert seen[WARMUP - 1][name] == peak and seen[WARMUP][name] == peak, name  # the last warmup step, u = 0


def test_every_group_ends_at_the_classifiers_fraction_of_its_own_peak():
    # A group whose peak (1e-4) is below min_lr decays too: an absolute floor would hold it flat.
    peaks = {**PEAKS, "backbone_layer0": 1e-4}
    optimizer = optimizer_of(peaks)
    scheduler = build_scheduler(config("--schedule.unit=step"), optimizer, STEPS)
    lrs_over_run(scheduler, optimizer, EPOCHS * STEPS)
    assert scheduler.step_count == EPOCHS * STEPS  # the lr after the last step: u = 1, the floor
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(peaks[group["name"]] * MIN_LR / LR, rel=REL), group["name"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(MIN_LR, rel=REL)  # the classifier's: min_lr itself


def test_optim_lr_zero_gives_a_floor_of_zero():
    optimizer = optimizer_of({"classifier": 0.0, "backbone": 0.01})
    scheduler = build_scheduler(config("--schedule.unit=step", "--optim.lr=0", "--optim.backbone_lr=0.01"),
                                optimizer, STEPS)
    lrs_over_run(scheduler, optimizer, EPOCHS * STEPS)
    assert [group["lr"] for group in optimizer.param_groups] == [0.0, pytest.approx(0.0, abs=1e-18)]


def test_a_warmup_that_fills_the_run_ends_at_the_peak():
    optimizer = optimizer_of()
    scheduler = build_scheduler(config(f"--schedule.warmup_epochs={EPOCHS}"), optimizer, STEPS)
    seen = lrs_over_run(scheduler, optimizer, EPOCHS * STEPS)
    assert [lrs["classifier"] for lrs in seen] == pytest.approx([LR * (t + 1) / 12 for t in range(12)], rel=REL)
    assert optimizer.param_groups[0]["lr"] == LR  # after the run: held at the peak, no cosine to run


@pytest.mark.parametrize("unit", ["step", "epoch"])
def test_a_schedule_resumed_inside_the_warmup_continues_as_the_uninterrupted_one(unit):
    cfg = config(f"--schedule.unit={unit}")
    optimizer = optimizer_of()
    uninterrupted = lrs_over_run(build_scheduler(cfg, optimizer, STEPS), optimizer, EPOCHS * STEPS)
    stopped_optimizer = optimizer_of()
    stopped = build_scheduler(cfg, stopped_optimizer, STEPS)
    lrs_over_run(stopped, stopped_optimizer, 2)  # 2 of the 4 warmup steps
    resumed_optimizer = optimizer_of()
    resumed = build_scheduler(cfg, resumed_optimizer, STEPS)
    resumed.load_state_dict(stopped.state_dict())
    assert stopped.state_dict() == {"step_schedule": 2}
    assert lrs_over_run(resumed, resumed_optimizer, EPOCHS * STEPS - 2) == uninterrupted[2:]


def test_step_decay_keeps_its_warmup_times_factor_per_epoch():
    optimizer = optimizer_of()
    cfg = config("--schedule.name=step", "--schedule.step_size=1", "--schedule.factor=0.5")
    seen = lrs_over_run(build_scheduler(cfg, optimizer, STEPS), optimizer, EPOCHS * STEPS)
    assert [lrs["backbone"] for lrs in seen] == pytest.approx(
        [0.01 * min(1, (t + 1) / WARMUP) * 0.5 ** (t // STEPS) for t in range(12)], rel=REL)


def test_a_cosine_by_epoch_without_warmup_floors_each_group_and_resumes_torchs_state():
    cfg = config("--schedule.warmup_epochs=0")
    optimizer = optimizer_of()
    scheduler = build_scheduler(cfg, optimizer)
    assert isinstance(scheduler, CosineByEpoch)
    for epoch in range(EPOCHS + 1):  # the last: after the run, the floor
        for group in optimizer.param_groups:
            peak = PEAKS[group["name"]]
            floor = peak * MIN_LR / LR
            assert group["lr"] == pytest.approx(floor + (peak - floor) * (1 + math.cos(math.pi * epoch / EPOCHS)) / 2,
                                                rel=REL), (epoch, group["name"])
        optimizer.step()
        scheduler.step()
    # A checkpoint of torch's CosineAnnealingLR (every run's before this schedule) resumes at its epoch.
    torch_optimizer = optimizer_of()
    torch_cosine = torch.optim.lr_scheduler.CosineAnnealingLR(torch_optimizer, T_max=EPOCHS, eta_min=MIN_LR)
    torch_optimizer.step()
    torch_cosine.step()
    resumed_optimizer = optimizer_of()
    resumed = build_scheduler(cfg, resumed_optimizer)
    resumed.load_state_dict(torch_cosine.state_dict())
    resumed_optimizer.step()
    resumed.step()  # into epoch 2
    assert resumed_optimizer.param_groups[1]["lr"] == pytest.approx(
        0.01 * MIN_LR / LR + 0.01 * (1 - MIN_LR / LR) * (1 + math.cos(math.pi * 2 / 3)) / 2, rel=REL)


STATS = {"loss": 1.25, "top1": 50.0, "images_per_sec": 12.5}


def test_a_progress_line_shows_the_classifier_and_the_backbones_top_and_bottom_depths():
    lrs = {f"backbone_layer{depth}{suffix}": 1e-3 * 0.75 ** (13 - depth) for depth in range(14)
           for suffix in ("", "_no_wd")} | {"classifier": 0.01}
    del lrs["backbone_layer13"]  # the top depth has only a group without weight decay: that one shows
    line = format_stats({**STATS, "lr": lrs})
    assert [word for word in line.split() if word.startswith("lr_")] == \
        ["lr_backbone_layer0", "lr_backbone_layer13_no_wd", "lr_classifier"]
    plain = {"backbone": 0.001, "classifier": 0.1}  # without layer decay: every group, as before
    assert "lr_backbone 0.001 lr_classifier 0.1" in format_stats({**STATS, "lr": plain})


def test_the_progress_line_picks_from_a_real_layer_decayed_vit():
    model = build_model(ModelConfig(backbone="timm:vit_tiny_patch16_224", backbone_weights="none", pooling="avg",
                                    freeze_backbone=False), 3, input_size=32)
    groups = model.param_groups(backbone_lr=1e-3, classifier_lr=1e-2, layer_decay=0.75, weight_decay=0.05)
    names = [group["name"] for group in groups]
    depths = [int(name.removeprefix("backbone_layer").removesuffix("_no_wd")) for name in names if name != "classifier"]
    shown = logged_lrs({group["name"]: group["lr"] for group in groups})
    assert len(names) > 20 and len(shown) == 3 and "classifier" in shown
    assert {int(name.removeprefix("backbone_layer").removesuffix("_no_wd")) for name in shown
            if name != "classifier"} == {min(depths), max(depths)}
    assert f"backbone_layer{min(depths)}" in shown  # the patch embedding's weight-decayed group
