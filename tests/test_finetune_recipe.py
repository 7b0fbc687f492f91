"""The transformer fine-tuning recipe (issue 19), each part against an independent formula or hand computation:
warmup and cosine per optimizer step, layer-wise learning-rate decay, label smoothing, gradient-norm clipping, the
weights' moving average; then all of them on at once through bcnn.train: a Ctrl-C'd run resumes to the
uninterrupted run's weights, average and schedule bit for bit, and two processes train what one does."""

import math
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bcnn import train as train_cli
from bcnn.config import ModelConfig, load_config
from bcnn.engine import train_one_epoch
from bcnn.errors import Interrupted, UserError
from bcnn.models import build_model
from bcnn.optim import build_ema, build_scheduler, update_ema
from helpers.numerics import assert_same_training
from helpers.runs import interrupt_after_first_last_pt, launch, small_run_args


def two_group_optimizer(lrs=(0.1, 0.02)):
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def lrs_over_run(options, steps_per_epoch, epochs):
    cfg = load_config(None, ["--train.epochs", str(epochs), *options])
    optimizer = two_group_optimizer()
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    seen = []
    for _ in range(steps_per_epoch * epochs):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seen


def test_warmup_into_cosine_per_step_is_its_formula():
    # 5 steps an epoch, 4 epochs, 1.5 epochs of warmup (8 steps rounded from 7.5) to the peak, then a cosine over
    # the 12 steps that remain, each group to min_lr / optim.lr = 1/100 of its peak (tests/test_schedule.py: more).
    seen = lrs_over_run(["--optim.lr=0.1", "--schedule.name=cosine", "--schedule.unit=step",
                         "--schedule.warmup_epochs=1.5", "--schedule.min_lr=0.001"], steps_per_epoch=5, epochs=4)
    for t, lrs in enumerate(seen):
        for base, lr in zip((0.1, 0.02), lrs):
            floor = base / 100
            expected = (base * (t + 1) / 8 if t < 8
                        else floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * (t - 8) / 12)))
            assert lr == pytest.approx(expected, rel=1e-12)
    assert seen[0][0] == pytest.approx(0.1 / 8) and seen[7][0] == seen[8][0] == 0.1 and seen[-1][0] > 0.001


def test_warmup_into_an_epoch_step_schedule_and_a_cosine_by_epoch():
    seen = lrs_over_run(["--schedule.name=step", "--schedule.step_size=2", "--schedule.factor=0.5",
                         "--schedule.warmup_epochs=1"], steps_per_epoch=3, epochs=5)
    assert [round(lrs[0], 12) for lrs in seen] == [round(0.1 * min(1, (t + 1) / 3) * 0.5 ** ((t // 3) // 2), 12)
                                                   for t in range(15)]
    # Without warmup, unit=step's cosine by epoch equals torch's CosineAnnealingLR stepped per epoch.
    by_epoch = lrs_over_run(["--schedule.name=cosine", "--schedule.unit=step"], steps_per_epoch=1, epochs=6)
    torch_optimizer = two_group_optimizer()
    torch_cosine = torch.optim.lr_scheduler.CosineAnnealingLR(torch_optimizer, T_max=6)
    for lrs in by_epoch:
        assert lrs == pytest.approx([group["lr"] for group in torch_optimizer.param_groups], rel=1e-12)
        torch_optimizer.step()
        torch_cosine.step()


def test_plateau_with_warmup_is_refused():
    with pytest.raises(UserError, match="schedule.warmup_epochs and schedule.unit=step need a schedule"):
        load_config(None, ["--schedule.warmup_epochs=1"])


def test_layer_decay_gives_smaller_rates_toward_the_input():
    cfg = ModelConfig(backbone="timm:vit_tiny_patch16_224", backbone_weights="none", pooling="avg",
                      freeze_backbone=False)
    model = build_model(cfg, 3, input_size=32)
    groups = model.param_groups(backbone_lr=1e-3, classifier_lr=1e-2, layer_decay=0.5, weight_decay=0.05)
    network = model.backbone.network.model
    depth_of = {}  # each parameter's group lr
    for group in groups:
        for param in group["params"]:
            depth_of[id(param)] = group
    lr = {name: depth_of[id(param)]["lr"] for name, param in network.named_parameters()}
    # The 12 blocks, each 0.5x the one after it; the last block at backbone_lr; the patch embedding below block 0.
    block_lrs = [lr[f"blocks.{i}.attn.qkv.weight"] for i in range(12)]
    assert block_lrs[-1] == pytest.approx(1e-3)
    assert all(below == pytest.approx(above * 0.5) for below, above in zip(block_lrs, block_lrs[1:]))
    assert lr["patch_embed.proj.weight"] == pytest.approx(block_lrs[0] * 0.5)
    assert lr["norm.weight"] == pytest.approx(1e-3)
    # Weight decay off for biases, norms and the position embedding; the head at the classifier's lr.
    decay = {name: depth_of[id(param)]["weight_decay"] for name, param in network.named_parameters()}
    assert decay["blocks.3.attn.qkv.weight"] == 0.05 and decay["blocks.3.attn.qkv.bias"] == 0
    assert decay["pos_embed"] == 0 and decay["norm.weight"] == 0
    assert [group["lr"] for group in groups if group["name"] == "classifier"] == [1e-2]
    with pytest.raises(UserError, match="optim.layer_decay=0.5 needs a backbone whose blocks timm can group"):
        build_model(ModelConfig(backbone_weights="none", freeze_backbone=False), 3, input_size=32).param_groups(
            backbone_lr=1e-3, classifier_lr=1e-2, layer_decay=0.5)


def one_step(model, images, targets, **options):
    loader = DataLoader(TensorDataset(images, targets), batch_size=len(images))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return train_one_epoch(model, loader, optimizer, torch.device("cpu"), epoch=1, log_every=0, **options)


def test_label_smoothing_is_the_hand_computed_loss():
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = np.array([0, 2])
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    # (1 - eps) * -log p[target] + eps * mean over classes of -log p, averaged over the batch
    expected = np.mean(0.8 * -log_p[np.arange(2), targets] + 0.2 * -log_p.mean(1))
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    stats = one_step(model, torch.tensor(logits, dtype=torch.float32), torch.tensor(targets), label_smoothing=0.2)
    assert stats["loss"] == pytest.approx(expected, rel=1e-6)  # float32 logits


def test_gradient_clipping_bounds_the_update_to_the_clip_norm():
    torch.manual_seed(0)
    images, targets = torch.randn(8, 5) * 10, torch.randint(0, 3, (8,))
    model = nn.Linear(5, 3)
    before = [param.detach().clone() for param in model.parameters()]
    one_step(model, images, targets, clip_grad_norm=0.25)
    update = torch.cat([(param.detach() - old).flatten() for param, old in zip(model.parameters(), before)])
    assert update.norm().item() == pytest.approx(0.25, rel=1e-5)  # SGD at lr 1: the update is the gradient


def test_the_moving_average_is_the_hand_computation_over_three_steps():
    cfg = load_config(None, ["--train.ema_decay=0.75", "--model.freeze_backbone=false", "--optim.backbone_lr=0.1",
                             "--schedule.name=none"])
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))  # a float buffer (running mean) and an integer one
    ema = build_ema(cfg, model)
    weights = []
    for step in range(3):
        with torch.no_grad():
            model[0].weight.add_(step + 1.0)
        model.train()(torch.randn(4, 2))  # moves the batch-norm statistics and counter
        weights.append({key: value.clone() for key, value in model.state_dict().items()})
        update_ema(ema, model)
    averaged = ema.module.state_dict()
    for key in ("0.weight", "0.bias", "1.running_mean", "1.running_var"):
        w1, w2, w3 = (w[key].double() for w in weights)
        expected = 0.75 * (0.75 * w1 + 0.25 * w2) + 0.25 * w3  # e1 = w1, e_t = d e_(t-1) + (1 - d) w_t
        assert torch.allclose(averaged[key].double(), expected, rtol=1e-6), key
    assert averaged["1.num_batches_tracked"] == 3  # copied, never averaged


# All of it at once on a ViT-Tiny at 32 px (2 x 2 tokens): warmup into a per-step cosine, layer decay, label
# smoothing, stochastic depth, clipping, an average with best.pt taken from it; 2 epochs of 3 steps.
RECIPE = ["--model.backbone=timm:vit_tiny_patch16_224", "--model.pooling=bilinear", "--schedule.name=cosine",
          "--schedule.unit=step", "--schedule.warmup_epochs=1", "--optim.layer_decay=0.75",
          "--train.label_smoothing=0.1", "--model.drop_path_rate=0.1", "--optim.clip_grad_norm=1.0",
          "--train.ema_decay=0.5", "--train.best_of=ema"]


@pytest.fixture(scope="module")
def recipe_run(cub_3x13, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("recipe") / "run"
    train_cli.main(small_run_args(cub_3x13, run_dir, *RECIPE))
    return run_dir


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_a_ctrl_c_run_with_the_whole_recipe_resumes_bit_for_bit(recipe_run, cub_3x13, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    interrupt_after_first_last_pt(monkeypatch)
    with pytest.raises(Interrupted, match="stopped training"):
        train_cli.main(small_run_args(cub_3x13, run_dir, *RECIPE))
    stopped = load(run_dir / "last.pt")
    assert (stopped["epoch"], stopped["step_in_epoch"]) == (0, 2)  # mid-epoch, inside the warmup
    train_cli.main(small_run_args(cub_3x13, run_dir, *RECIPE))
    expected, resumed = load(recipe_run / "last.pt"), load(run_dir / "last.pt")
    for part in ("model", "ema"):
        assert expected[part].keys() == resumed[part].keys()
        assert all(torch.equal(expected[part][key], resumed[part][key]) for key in expected[part]), part
    assert expected["scheduler"] == resumed["scheduler"] == {"step_schedule": 6}
    assert [group["lr"] for group in expected["optimizer"]["param_groups"]] == \
        [group["lr"] for group in resumed["optimizer"]["param_groups"]]
    best = load(recipe_run / "best.pt")
    assert "val_ema_top1" in best["metrics"] and "val_top1" in best["metrics"]
    assert "val_ema_top1" in next(line for line in (recipe_run / "train.log").read_text().splitlines()
                                  if "epoch 1 done" in line), "the epoch line shows what best_of=ema picks by"
    # best.pt holds the average's weights (train.best_of=ema), not the trained ones
    ema_at_best = load(recipe_run / "last.pt")["ema"] if best["epoch"] == 2 else None
    if ema_at_best is not None:
        assert all(torch.equal(best["model"][key], ema_at_best[f"module.{key}"]) for key in best["model"])


def test_two_processes_train_the_whole_recipe_as_one_does(cub_3x13, tmp_path):
    # Stochastic depth draws which paths drop from each process's generator, so two ranks drop other paths than
    # one process would: the comparison runs without it (everything else of the recipe on).
    recipe = [option for option in RECIPE if not option.startswith("--model.drop_path_rate")]
    runs = {name: tmp_path / name for name in ("one", "two")}
    train_cli.main(small_run_args(cub_3x13, runs["one"], *recipe))  # one process: this one
    result = launch(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                    "bcnn.train", *small_run_args(cub_3x13, runs["two"], *recipe), processes=2)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    torch.manual_seed(0)  # what bcnn.train starts from: train.seed, then the model
    initial = build_model(ModelConfig(backbone="timm:vit_tiny_patch16_224", backbone_weights="none",
                                      freeze_backbone=False), 3, input_size=32).state_dict()
    one, two = load(runs["one"] / "last.pt"), load(runs["two"] / "last.pt")
    # Layer decay gives block 0 of 12 a learning rate of 1e-3 * 0.75^12 = 3e-5: its LayerNorm weights (1.0) move by
    # 2-3 float32 steps of 1.2e-7 in 6 steps, so one rounding step is a third of their movement (measured: 1 step
    # apart). Two steps of each value are forgiven; every other tensor is held to TRAINING_RTOL of its movement.
    assert_same_training(one["model"], two["model"], initial, ulps=2)
    ema_one = {key[len("module."):]: value for key, value in one["ema"].items() if key.startswith("module.")}
    ema_two = {key[len("module."):]: value for key, value in two["ema"].items() if key.startswith("module.")}
    assert_same_training(ema_one, ema_two, initial, ulps=2)
    assert one["scheduler"] == two["scheduler"]
