"""Nothing is lost: a killed run resumes to the very weights of a run that never stopped; re-running a finished
run changes nothing; a resume under another recipe, a checkpoint that does not fit, or a diverging loss is one
clear error that leaves the checkpoints as they were."""

import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bcnn import engine
from bcnn import train as train_cli
from bcnn.config import Config, config_to_dict
from bcnn.data import write_synthetic_cub
from bcnn.engine import TrainingDiverged
from bcnn.errors import UserError
from helpers.runs import REPO, launch, load, rows_without_timing, run_in_process, small_run_args, stop_after_last_pt

KILL_HELPER = str(REPO / "tests" / "helpers" / "kill_after_save.py")


@pytest.mark.parametrize("kill_after, where", [
    ("last.pt", "mid-epoch, right after its first checkpoint (step 2 of 3)"),
    ("best.pt", "at the end of epoch 1, after its metrics and curves were written but before its last.pt"),
])
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(cub_3x13, reference_run, tmp_path,
                                                                     kill_after, where):
    run_dir = tmp_path / "run"
    killed = launch(sys.executable, KILL_HELPER, *small_run_args(cub_3x13, run_dir),
                    env={"KILL_AFTER_FILE": kill_after})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    stopped_at = load(run_dir / "last.pt")
    assert (stopped_at["epoch"], stopped_at["step_in_epoch"]) == (0, 2), where

    again = run_in_process(train_cli.main, *small_run_args(cub_3x13, run_dir))  # the very same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "epoch 1, step 2" in again.stdout

    expected, resumed = load(reference_run / "last.pt"), load(run_dir / "last.pt")
    assert all(torch.equal(expected["model"][key], resumed["model"][key]) for key in expected["model"])
    assert torch.equal(expected["optimizer"]["state"][0]["momentum_buffer"],
                       resumed["optimizer"]["state"][0]["momentum_buffer"])
    # The partial epoch's sums were carried over: the metrics are those of the reference_run run.
    assert rows_without_timing(run_dir) == rows_without_timing(reference_run)
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [event.step for event in events.Scalars("val/top1")] == [3, 6], "the killed attempt's points are purged"


class Crashed(Exception):
    """A crash inside bcnn.train: nothing of bcnn catches it, as nothing catches a SIGKILL."""


def test_resume_names_a_checkpoint_explicitly(cub_3x13, reference_run, tmp_path, monkeypatch):
    # a run that crashes right after its 3rd last.pt, in this process (the SIGKILLed process is the test above's)
    stop_after_last_pt(monkeypatch, 3, Crashed)
    killed_dir = tmp_path / "killed"
    with pytest.raises(Crashed):
        train_cli.main(small_run_args(cub_3x13, killed_dir))
    assert load(killed_dir / "last.pt")["global_step"] == 4
    train_cli.main(small_run_args(cub_3x13, tmp_path / "elsewhere", f"--resume={killed_dir / 'last.pt'}"))
    expected, resumed = load(reference_run / "last.pt")["model"], load(tmp_path / "elsewhere" / "last.pt")["model"]
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)


def copy_run(run_dir, tmp_path):
    return Path(shutil.copytree(run_dir, tmp_path / "copy"))


def test_rerunning_a_finished_run_changes_nothing_and_more_epochs_extend_it(cub_3x13, reference_run, tmp_path):
    run_dir = copy_run(reference_run, tmp_path)
    before = {name: (run_dir / name).read_bytes() for name in ("best.pt", "last.pt", "metrics.jsonl")}
    result = run_in_process(train_cli.main, *small_run_args(cub_3x13, run_dir))
    assert result.returncode == 0 and "already finished 2 epochs" in result.stdout
    assert all((run_dir / name).read_bytes() == content for name, content in before.items())

    train_cli.main(small_run_args(cub_3x13, run_dir, "--train.epochs=3"))
    assert [row["epoch"] for row in rows_without_timing(run_dir)] == [1, 2, 3]
    assert load(run_dir / "last.pt")["global_step"] == 9


def test_a_metrics_row_whose_write_was_cut_short_is_dropped_and_the_run_resumes(cub_3x13, reference_run, tmp_path):
    # A kill or a full disk in the middle of epoch 3's row: metrics.jsonl ends in half a line, and no last.pt holds
    # epoch 3 (rows are written before the epoch's checkpoints). The same command resumes; the half row is gone.
    run_dir = copy_run(reference_run, tmp_path)
    whole = (run_dir / "metrics.jsonl").read_text()
    with open(run_dir / "metrics.jsonl", "a") as metrics:
        metrics.write(whole.splitlines()[-1].replace('"epoch": 2', '"epoch": 3')[:40])
    train_cli.main(small_run_args(cub_3x13, run_dir, "--train.epochs=3"))
    assert [row["epoch"] for row in rows_without_timing(run_dir)] == [1, 2, 3]
    assert (run_dir / "metrics.jsonl").read_text().startswith(whole)


def test_a_run_killed_while_writing_its_first_row_is_started_again(cub_3x13, reference_run, tmp_path):
    # No checkpoint yet, so the same command starts afresh: the half-written metrics.jsonl is bcnn's, not the user's.
    run_dir = copy_run(reference_run, tmp_path)
    for name in ("last.pt", "best.pt"):
        (run_dir / name).unlink()
    (run_dir / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text()[:30])
    train_cli.main(small_run_args(cub_3x13, run_dir, "--train.epochs=1"))
    assert [row["epoch"] for row in rows_without_timing(run_dir)] == [1]


def test_a_damaged_metrics_row_before_the_last_is_one_sentence_at_resume(cub_3x13, reference_run, tmp_path):
    run_dir = copy_run(reference_run, tmp_path)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text(f"{lines[0][:20]}\n{lines[1]}\n")
    before = (run_dir / "last.pt").read_bytes()
    with pytest.raises(UserError, match=r"line 1 of .*metrics\.jsonl is not an epoch row as bcnn\.train writes them"):
        train_cli.main(small_run_args(cub_3x13, run_dir, "--train.epochs=3"))
    assert (run_dir / "last.pt").read_bytes() == before


def test_overwrite_starts_again_from_scratch(cub_3x13, reference_run, tmp_path):
    run_dir = copy_run(reference_run, tmp_path)
    train_cli.main(small_run_args(cub_3x13, run_dir, "--train.epochs=1", "--overwrite"))
    assert [row["epoch"] for row in rows_without_timing(run_dir)] == [1]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1, "the old run's curves are gone"


def test_resuming_under_another_recipe_is_refused_and_changes_nothing(cub_3x13, reference_run, tmp_path):
    run_dir = copy_run(reference_run, tmp_path)
    before = (run_dir / "last.pt").read_bytes()
    with pytest.raises(UserError, match=r"optim.lr=0.01, this command asks for 0.2.*--overwrite"):
        train_cli.main(small_run_args(cub_3x13, run_dir, "--optim.lr=0.2", "--train.epochs=3"))
    assert (run_dir / "last.pt").read_bytes() == before


@pytest.mark.parametrize("problem, message", [
    ("best", "holds weights only"),
    ("other classes", "other classes"),
    ("missing", "does not exist"),
    ("truncated", "cannot be read"),
    ("pickled code", "refused for safety"),
])
def test_a_checkpoint_that_cannot_be_resumed_is_one_clear_error(cub_3x13, reference_run, tmp_path, problem,
                                                                message):
    path = tmp_path / "checkpoint.pt"
    if problem == "best":
        path = reference_run / "best.pt"
    elif problem == "other classes":
        state = load(reference_run / "last.pt")
        state["classes"] = ["a", "b", "c"]
        torch.save(state, path)
    elif problem == "truncated":
        path.write_bytes((reference_run / "last.pt").read_bytes()[:5000])
    elif problem == "pickled code":
        torch.save({"model": {}, "payload": UserError("runs code when unpickled")}, path)
    result = run_in_process(train_cli.main, *small_run_args(cub_3x13, tmp_path / "run"), f"--resume={path}")
    assert result.returncode == 2 and message in result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "last.pt").exists()


def other_codebase_state_dict(state):
    """What a DataParallel-trained port (HaoMood/bilinear-cnn style) saves: module.features.N.*, module.fc.*."""
    renamed = {}
    for key, value in state.items():
        key = key.replace("backbone.", "features.", 1).replace("classifier.", "fc.", 1)
        renamed["module." + key] = value
    return renamed


def test_init_from_a_dataparallel_state_dict_of_another_codebase(cub_3x13, reference_run, tmp_path):
    trained = load(reference_run / "last.pt")["model"]
    foreign = tmp_path / "bcnn_dataparallel.pth"
    torch.save(other_codebase_state_dict(trained), foreign)
    run_dir = tmp_path / "run"
    # lr 0 and a frozen backbone: the run's weights are exactly what it was initialised with.
    train_cli.main(small_run_args(cub_3x13, run_dir, f"--train.init_from={foreign}", "--train.epochs=1",
                            "--model.freeze_backbone=true", "--optim.lr=0", "--optim.backbone_lr=0"))
    assert "initialised model weights from" in (run_dir / "train.log").read_text()
    loaded = load(run_dir / "last.pt")["model"]
    assert set(loaded) == set(trained) and all(torch.equal(loaded[key], trained[key]) for key in trained)

    other = write_synthetic_cub(tmp_path / "four", classes=4, per_class=13, seed=0)
    with pytest.raises(UserError, match="do not fit this model .*classifier.weight"):
        train_cli.main(small_run_args(other, tmp_path / "run4", f"--train.init_from={foreign}"))


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(cub_3x13, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_loss, calls = engine.F.cross_entropy, []

    def loss_that_turns_nan(logits, targets, **kwargs):
        loss = real_loss(logits, targets, **kwargs)
        if kwargs.get("reduction", "mean") == "mean":  # training batches, not evaluation
            calls.append(1)
            if len(calls) == 5:  # epoch 2, step 2 (3 steps per epoch)
                return loss * float("nan")
        return loss

    monkeypatch.setattr(engine.F, "cross_entropy", loss_that_turns_nan)
    with pytest.raises(TrainingDiverged, match=r"NaN or infinite at step 2 \(epoch 2\).*lower the learning rate"):
        train_cli.main(small_run_args(cub_3x13, run_dir, "--train.checkpoint_every=0", "--train.epochs=3"))
    last = load(run_dir / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(value).all() for value in last["model"].values())
    assert [row["epoch"] for row in rows_without_timing(run_dir)] == [1]


def test_a_learning_rate_that_blows_up_is_one_clear_error(cub_3x13, tmp_path):
    result = run_in_process(train_cli.main, *small_run_args(cub_3x13, tmp_path / "run", "--optim.lr=1e30",
                                                           "--model.freeze_backbone=true", "--train.epochs=1",
                                                           "--train.checkpoint_every=0"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert re.match(r"error: the training loss became NaN or infinite at step \d+ \(epoch 1\)", result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_last_pt_from_before_a_config_key_existed_still_resumes():
    # bcnn 0.1's checkpoints predate model.pooling (and its options) and named the cut relu5_3, today's auto.
    saved = config_to_dict(Config())
    for key in ("pooling", "matrix_sqrt_iterations", "isqrt_iterations", "isqrt_reduce_dim", "compact_dim",
                "backbone_b", "backbone_b_weights"):
        del saved["model"][key]
    saved["model"]["cut"] = "relu5_3"
    state = {"config": saved, **{name: {} for name in train_cli.RESUME_ENTRIES}}  # what else a last.pt carries
    train_cli.check_resumable(Config(), state, Path("last.pt"))  # the defaults are what those runs did
    changed = Config()
    changed.model.pooling = "compact"
    with pytest.raises(UserError, match="trained with model.pooling='bilinear', this command asks for 'compact'"):
        train_cli.check_resumable(changed, state, Path("last.pt"))
    changed = Config()
    changed.model.cut = "pool5"
    with pytest.raises(UserError, match="model.cut='relu5_3'"):
        train_cli.check_resumable(changed, state, Path("last.pt"))
