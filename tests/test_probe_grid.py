"""train.probe_grid, the one-pass linear-probe sweep over the feature cache: each member of the grid equals, to the
bit, the plain stage-1 run with its learning rate and weight decay (under the default plateau schedule and under a
per-step warmup + cosine with a floor); best.pt is the best (member, epoch) on val as a plain model that bcnn.eval
reads; a sweep stopped mid-epoch resumes to the uninterrupted one; what it refuses, in one sentence each; and the
bench's fields."""

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bcnn import distributed
from bcnn import eval as eval_cli
from bcnn import train as train_cli
from bcnn.bench import __main__ as bench_cli
from bcnn.bench.probe import format_probe_grid
from bcnn.errors import Interrupted, UserError
from helpers.runs import STAGE1, interrupt_after_first_last_pt, load, rows_without_timing

LRS, DECAYS = (0.5, 2.0), (0.0, 0.01)
GRID = "--train.probe_grid={lr: [0.5, 2.0], weight_decay: [0.0, 0.01]}"
MEMBERS = [(lr, decay) for lr in LRS for decay in DECAYS]  # the grid's order: learning rate major
SCHEDULES = {
    # the recipe's plateau on val top-1, each member's on its own; patience 0 so that it drops within 3 epochs
    "plateau": ("--schedule.patience=0",),
    # per step: a warmup epoch, then a cosine whose floor is min_lr for every member (not a fraction of one lr)
    "warmup_cosine": ("--schedule.name=cosine", "--schedule.unit=step", "--schedule.warmup_epochs=1",
                      "--schedule.min_lr=0.1", "--optim.name=adamw", "--train.epochs=2"),
}
PLAIN_RUNS = {"plateau": (0, 3), "warmup_cosine": (1, 2)}  # each member compared under one schedule


def name(lr, decay):
    return f"lr={lr!r},wd={decay!r}"


def run_args(data, run_dir, cache_dir, *extra):
    """Stage 1 over the feature cache on cub_3x6: 6 train images and their mirrors in steps of 4 (3 steps an epoch),
    3 val images, 3 epochs (2 under the per-step cosine), loader workers on (they compute the cache)."""
    return ["--config", STAGE1, f"--data-root={data}", "--device=cpu", f"--run-dir={run_dir}", "--data.crop=32",
            "--data.resize=40", "--data.val_fraction=0.34", "--data.num_workers=2", "--train.epochs=3",
            "--train.batch_size=4", "--train.log_every=0", "--train.cache_features=true",
            f"--train.cache_dir={cache_dir}", "--train.precision=fp32", *extra]


@pytest.fixture(scope="module")
def runs(cub_3x6, tmp_path_factory):
    """runs(schedule) is the sweep's run directory, runs(schedule, g) member g's plain run's; each run once."""
    root = tmp_path_factory.mktemp("probe_grid")
    done = {}

    def run(schedule, member=None):
        if (schedule, member) not in done:
            run_dir = root / f"{schedule}_{'grid' if member is None else member}"
            settings = [GRID] if member is None else [f"--optim.lr={MEMBERS[member][0]}",
                                                      f"--optim.weight_decay={MEMBERS[member][1]}"]
            train_cli.main(run_args(cub_3x6, run_dir, root / "cache", *SCHEDULES[schedule], *settings))
            done[schedule, member] = run_dir
        return done[schedule, member]

    return run


def rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_each_member_equals_its_plain_run_to_the_bit(runs, schedule):
    sweep = load(runs(schedule) / "last.pt")
    sweep_rows = rows(runs(schedule))
    for member in PLAIN_RUNS[schedule]:
        plain_dir = runs(schedule, member)
        plain, member_name = load(plain_dir / "last.pt"), name(*MEMBERS[member])
        for key in ("weight", "bias"):
            assert torch.equal(sweep["probe_grid"]["classifiers"][f"members.{member}.{key}"],
                               plain["model"][f"classifier.{key}"]), (member_name, key)
        # the optimizer's state too (SGD's momentum, AdamW's moments and step): a resume continues exactly
        member_state, plain_state = sweep["optimizer"]["members"][member]["state"], plain["optimizer"]["state"]
        assert member_state.keys() == plain_state.keys()
        for index, values in plain_state.items():
            assert all(torch.equal(member_state[index][key], value) for key, value in values.items()), member_name
        # every epoch's lr (its own schedule), and its val top-1 and loss (evaluated in the same pass)
        plain_rows = rows(plain_dir)
        for key, plain_key in (("val_top1", "val_top1"), ("val_loss", "val_loss"), ("lr", "lr_classifier")):
            sweep_key = f"probe/{member_name}/{key}" if key != "lr" else f"lr_probe/{member_name}"
            assert [row[sweep_key] for row in sweep_rows] == [row[plain_key] for row in plain_rows], key
    if schedule == "plateau":  # the members' plateaus dropped their lrs at different epochs: the schedules are theirs
        shapes = {tuple(row[f"lr_probe/{name(lr, decay)}"] / lr for row in sweep_rows) for lr, decay in MEMBERS}
        assert len(shapes) > 1


def test_best_pt_is_the_winner_as_its_plain_run_would_have_written_it(runs, tmp_path):
    sweep_dir = runs("plateau")
    best = load(sweep_dir / "best.pt")
    # the best val top-1, then the earliest epoch, then the first member in the grid
    top1, epoch, member = min((-row[f"probe/{name(*settings)}/val_top1"], row["epoch"], member)
                              for row in rows(sweep_dir) for member, settings in enumerate(MEMBERS))
    top1, (lr, decay) = -top1, MEMBERS[member]
    assert best["probe_grid"] == {"member": name(lr, decay), "lr": lr, "weight_decay": decay, "members": 4}
    assert (best["epoch"], best["metrics"]["val_top1"]) == (epoch, top1)
    assert (best["config"]["optim"]["lr"], best["config"]["optim"]["weight_decay"]) == (lr, decay)
    assert best["config"]["train"]["probe_grid"] == {"lr": list(LRS), "weight_decay": list(DECAYS)}
    plain = load(runs("plateau", member) / "best.pt")
    assert plain["epoch"] == best["epoch"] and plain["model"].keys() == best["model"].keys()
    assert all(torch.equal(plain["model"][key], best["model"][key]) for key in plain["model"])

    # a plain checkpoint: evaluated live (images through the backbone), it scores what the sweep measured
    live = eval_cli.main(["--checkpoint", str(sweep_dir / "best.pt"), "--split", "val", "--device", "cpu",
                          "--no-figures", f"--output={tmp_path / 'val.json'}"])
    assert live["count"] == 3 and live["top1"] == top1

    log = (sweep_dir / "train.log").read_text().splitlines()
    assert "probe grid: 4 members, picked by val top-1" in log[-8]
    assert log[-2].endswith(f"probe grid winner: optim.lr={lr!r}, optim.weight_decay={decay!r} (val top-1 "
                            f"{top1:.2f}% at epoch {epoch})")
    events = EventAccumulator(str(sweep_dir))
    events.Reload()
    for lr, decay in MEMBERS:
        curve = [point.value for point in events.Scalars(f"probe/{name(lr, decay)}/val_top1")]
        assert curve == pytest.approx([row[f"probe/{name(lr, decay)}/val_top1"] for row in rows(sweep_dir)])


def test_a_sweep_stopped_mid_epoch_resumes_to_the_uninterrupted_one(runs, cub_3x6, tmp_path, monkeypatch):
    whole = runs("plateau")
    command = run_args(cub_3x6, tmp_path / "run", whole.parent / "cache", *SCHEDULES["plateau"], GRID,
                       "--train.checkpoint_every=2")
    interrupt_after_first_last_pt(monkeypatch)
    with pytest.raises(Interrupted, match="stopped training"):
        train_cli.main(command)
    at_stop = load(tmp_path / "run" / "last.pt")
    assert (at_stop["epoch"], at_stop["step_in_epoch"]) == (0, 2)
    train_cli.main(command)  # the same command again
    expected, resumed = load(whole / "last.pt"), load(tmp_path / "run" / "last.pt")
    for entry in ("probe_grid", "model"):
        weights = expected[entry]["classifiers"] if entry == "probe_grid" else expected[entry]
        again = resumed[entry]["classifiers"] if entry == "probe_grid" else resumed[entry]
        assert all(torch.equal(weights[key], again[key]) for key in weights)
    assert rows_without_timing(tmp_path / "run") == rows_without_timing(whole)


@pytest.mark.parametrize("overrides, message", [
    (["--train.cache_features=false", GRID], "train.probe_grid trains linear classifiers side by side on the feature "
                                             "cache's vectors; set train.cache_features=true"),
    ([GRID, "--data.val_fraction=0", "--schedule.name=step"],
     "train.probe_grid picks its member on val, and data.val_fraction is 0"),
    ([GRID, "--train.ema_decay=0.99"],
     "train.ema_decay averages a fine-tuned model's weights, and train.cache_features trains the classifier alone"),
    ([GRID, "--data.mixup=0.8"],
     "train.cache_features computes one view of each image (and its mirror) once, and data.mixup draws"),
    ([GRID, "--optim.clip_grad_norm=1"],
     "optim.clip_grad_norm would clip the norm of all of train.probe_grid's members' gradients together"),
    (["--train.probe_grid={lr: [1, 2, 3, 4, 5, 6, 7, 8, 9], weight_decay: [0, 1, 2, 3, 4, 5, 6, 7]}"],
     "train.probe_grid has 72 members (9 learning rates x 8 weight decays), more than the 64"),
    (["--train.probe_grid={lr: [0.5, 0]}"], "train.probe_grid's lr must be finite and greater than 0, got 0.0."),
    (["--train.probe_grid={weight_decay: [-1]}"],
     "train.probe_grid's weight_decay must be finite and at least 0, got -1.0."),
    (["--train.probe_grid={lr: [0.5, 0.5]}"], "train.probe_grid's lr list holds 0.5 twice"),
    (["--train.probe_grid={momentum: [0.9]}"], "train.probe_grid takes the lists lr and weight_decay, got 'momentum'"),
    (["--train.probe_grid=[0.5, 1]"], "train.probe_grid (command line) must be a mapping of names to lists of numbers"),
])
def test_what_a_sweep_cannot_do_is_refused_in_one_sentence(cub_3x6, tmp_path, overrides, message):
    with pytest.raises(UserError) as error:
        train_cli.main(run_args(cub_3x6, tmp_path / "run", tmp_path / "cache", *overrides))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_a_sweep_under_torchrun_is_refused_before_the_run_directory_changes(cub_3x6, tmp_path, monkeypatch):
    two_ranks = distributed.Context(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"))
    monkeypatch.setattr(train_cli.distributed, "setup", lambda device: two_ranks)
    with pytest.raises(UserError, match="^train.probe_grid runs in one process: under torchrun DDP would all-reduce"):
        train_cli.main(run_args(cub_3x6, tmp_path / "run", tmp_path / "cache", GRID))
    assert not (tmp_path / "run").exists()


def test_the_bench_times_one_classifier_against_the_grid_at_both_vector_sizes(capsys):
    argv = ["--probe-grid", "--device", "cpu", "--classes", "3", "--cache-batch-size", "4", "--probe-images", "4"]
    result = bench_cli.main([*argv, "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    assert result["members"] == 12 and result["command"] == "python -m bcnn.bench " + " ".join(argv)
    assert [case["dim"] for case in result["cases"].values()] == [768, 262_144]
    for case in result["cases"].values():
        assert (case["train_rows"], case["val_rows"]) == (8, 1)
        assert case["ratio"] == case["grid"]["epoch_seconds"] / case["one"]["epoch_seconds"] > 0
    text = format_probe_grid(result)
    assert "12 members s" in text and "target: the sweep of 12 at most 1.5x" in text and "reproduce: " in text
    with pytest.raises(UserError, match="^--probe-images goes with --probe-grid"):
        bench_cli.main(["--device", "cpu", "--probe-images", "4"])
    with pytest.raises(UserError, match="^--steps does not apply with --probe-grid"):
        bench_cli.main(["--device", "cpu", "--probe-grid", "--steps", "2"])
