"""Every command that reads weights refuses what no answer can come from, in one sentence: NaN or inf weights (a
diverged run, a damaged file), a checkpoint without the entries the command needs, a bare state dict, a folder or
a named pipe where the checkpoint goes; and class scores that are NaN or inf are an error, never a class."""

import os

import pytest
import torch

from bcnn import eval as eval_cli
from bcnn import predict as predict_cli
from bcnn import train as train_cli
from bcnn.checkpoint import save_checkpoint
from bcnn.config import config_to_dict, load_config
from bcnn.errors import UserError
from bcnn.models import build_model
from bcnn.models.trained import from_checkpoint
from helpers.runs import STAGE1, run_in_process

TINY = ["--data.crop=32", "--data.resize=40", "--data.num_workers=0"]


@pytest.fixture(scope="module")
def sound(mini_cub, tmp_path_factory):
    """An untrained model saved as bcnn.train saves a best.pt (the refusals need no training), its config and a
    test image."""
    root = tmp_path_factory.mktemp("refusals")
    cfg = load_config(STAGE1, [*TINY, f"--data.root={mini_cub}", "--model.backbone_weights=none"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 5, input_size=cfg.data.crop)
    state = {"model": model.state_dict(), "config": config_to_dict(cfg),
             "classes": [f"Synthetic Class {k}" for k in range(1, 6)], "epoch": 1, "metrics": {}}
    save_checkpoint(state, root / "best.pt")
    image = next((mini_cub / "images").rglob("*.jpg"))
    return {"state": state, "root": root, "image": str(image), "data": mini_cub}


def variant(sound, name, change) -> str:
    state = {key: (dict(value) if key == "model" else value) for key, value in sound["state"].items()}
    change(state)
    path = sound["root"] / f"{name}.pt"
    save_checkpoint(state, path)
    return str(path)


def poison(tensor_name, value):
    def change(state):
        weights = state["model"][tensor_name].clone()
        weights.view(-1)[:3] = value
        state["model"][tensor_name] = weights
    return change


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_refused_by_eval_predict_explain_and_init_from(sound, tmp_path, value):
    path = variant(sound, f"diverged_{value}", poison("classifier.weight", value))
    commands = {
        "eval": lambda: eval_cli.main(["--checkpoint", path, "--device", "cpu", "--no-figures",
                                       "--output", str(tmp_path / "e.json")]),
        "predict": lambda: predict_cli.main([sound["image"], "--checkpoint", path, "--device", "cpu"]),
        "explain": lambda: predict_cli.main([sound["image"], "--checkpoint", path, "--device", "cpu", "--explain",
                                             "--explain-dir", str(tmp_path / "maps")]),
        "init_from": lambda: train_cli.main(["--config", STAGE1, f"--data-root={sound['data']}", *TINY,
                                             "--device=cpu", "--model.backbone_weights=none", f"--train.init_from={path}",
                                             f"--run-dir={tmp_path / 'run'}"]),
    }
    for command, run in commands.items():
        with pytest.raises(UserError) as error:
            run()
        message = str(error.value)
        assert "NaN or inf weights" in message and "3 of the" in message and "classifier.weight" in message, command
        assert path in message and "\n" not in message
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "maps").exists()
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # the run wrote nothing


def test_the_cli_says_it_in_one_line_and_exits_2(sound, tmp_path):
    path = variant(sound, "diverged_cli", poison("backbone.0.weight", float("nan")))
    result = run_in_process(eval_cli.main, "--checkpoint", path, "--device", "cpu", "--output", tmp_path / "e.json")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: checkpoint ") and result.stderr.count("\n") == 1, result.stderr
    assert "backbone.0.weight" in result.stderr and not (tmp_path / "e.json").exists()


def test_class_scores_that_overflow_are_an_error_not_class_0(sound, tmp_path):
    """Finite weights whose scores overflow to inf (and inf - inf to NaN in the softmax): evaluate refuses to read
    a class from them, and predict reports each image as an error (exit status 1) rather than a class."""
    def overflow(state):
        state["model"]["classifier.weight"] = torch.full_like(state["model"]["classifier.weight"], 3e38)
    path = variant(sound, "overflowing", overflow)
    with pytest.raises(UserError, match=r"class scores are NaN or inf on 30 of the 30 images"):
        eval_cli.main(["--checkpoint", path, "--device", "cpu", "--no-figures", "--output", str(tmp_path / "e.json")])
    assert not (tmp_path / "e.json").exists()
    with pytest.raises(UserError, match="no input could be predicted"):
        predict_cli.main([sound["image"], "--checkpoint", path, "--device", "cpu"])
    trained = from_checkpoint(path)
    results = list(predict_cli.predict([(sound["image"], None)], trained.model, trained.transform, trained.classes,
                                       torch.device("cpu"), topk=3, batch_size=4))
    assert "predictions" not in results[0] and "NaN or inf" in results[0]["error"]


@pytest.mark.parametrize("entry", ["classes", "config", "model"])
def test_a_checkpoint_without_what_eval_and_predict_need_is_named(sound, entry):
    path = variant(sound, f"no_{entry}", lambda state: state.pop(entry))
    for run in (lambda: eval_cli.main(["--checkpoint", path, "--device", "cpu"]),
                lambda: predict_cli.main([sound["image"], "--checkpoint", path, "--device", "cpu"])):
        with pytest.raises(UserError) as error:
            run()
        assert f"no '{entry}' entry" in str(error.value) and path in str(error.value)


def test_a_checkpoint_without_epoch_is_evaluated_with_the_epoch_unknown(sound, tmp_path):
    path = variant(sound, "no_epoch", lambda state: state.pop("epoch"))
    result = eval_cli.main(["--checkpoint", path, "--device", "cpu", "--no-figures", "--output",
                            str(tmp_path / "e.json")])
    assert result["epoch"] is None and result["count"] == 30


def test_a_bare_state_dict_is_told_apart_from_a_checkpoint(sound):
    path = str(sound["root"] / "state_dict.pt")
    torch.save(sound["state"]["model"], path)
    with pytest.raises(UserError) as error:
        eval_cli.main(["--checkpoint", path, "--device", "cpu"])
    count = len(sound["state"]["model"])
    assert f"is a bare state dict ({count} tensors of model weights)" in str(error.value)
    assert "--train.init_from" in str(error.value)


@pytest.fixture(scope="module")
def one_epoch(sound, tmp_path_factory):
    """A run of one epoch, trained once: its last.pt is what the resume tests damage."""
    run_dir = tmp_path_factory.mktemp("one_epoch") / "run"
    args = ["--config", STAGE1, f"--data-root={sound['data']}", *TINY, "--device=cpu", "--model.backbone_weights=none",
            "--train.epochs=1", "--train.log_every=0", f"--run-dir={run_dir}"]
    train_cli.main(args)
    return {"args": args, "last": torch.load(run_dir / "last.pt", weights_only=True)}


@pytest.mark.parametrize("missing", ["rng", "epoch", "config"])
def test_resuming_a_last_pt_without_what_resuming_needs_is_refused(one_epoch, tmp_path, missing):
    """A last.pt without its config would be resumed with config values that are only defaults; without its
    generators' states or epoch it cannot continue where it stopped."""
    damaged = {key: value for key, value in one_epoch["last"].items() if key != missing}
    save_checkpoint(damaged, tmp_path / "damaged_last.pt")
    run_dir = tmp_path / "resumed"
    with pytest.raises(UserError) as error:
        train_cli.main([*one_epoch["args"], f"--run-dir={run_dir}", "--train.epochs=2", "--resume",
                        str(tmp_path / "damaged_last.pt")])
    assert f"'{missing}'" in str(error.value) and "damaged_last.pt" in str(error.value)
    assert not run_dir.exists() or not any(run_dir.iterdir())  # refused before the run wrote anything


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_folder_or_a_named_pipe_as_the_checkpoint_is_named_as_what_it_is(sound, tmp_path):
    pipe = tmp_path / "best.pt"
    os.mkfifo(pipe)  # reading it would wait for a writer forever: it must not be opened
    for path, kind in ((pipe, "is a named pipe, not a checkpoint file"), (tmp_path, "is a folder")):
        with pytest.raises(UserError, match=kind):
            eval_cli.main(["--checkpoint", str(path), "--device", "cpu"])
        with pytest.raises(UserError, match=kind):
            predict_cli.main([sound["image"], "--checkpoint", str(path), "--device", "cpu"])


def test_backbone_weights_holding_nan_are_refused_before_training(sound, tmp_path):
    """model.backbone_weights=FILE is read weights too: a VGG16 state dict with a NaN is refused by name."""
    backbone = {key.removeprefix("backbone."): value for key, value in sound["state"]["model"].items()
                if key.startswith("backbone.")}
    backbone["0.weight"] = backbone["0.weight"].clone()
    backbone["0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(backbone, tmp_path / "vgg16_features.pth")
    with pytest.raises(UserError) as error:
        train_cli.main(["--config", STAGE1, f"--data-root={sound['data']}", *TINY, "--device=cpu",
                        f"--model.backbone_weights={tmp_path / 'vgg16_features.pth'}", f"--run-dir={tmp_path / 'run'}"])
    assert str(error.value).startswith(f"model.backbone_weights {tmp_path / 'vgg16_features.pth'} holds NaN or inf "
                                       "weights: 1 of the 1,728 values of 0.weight")
    assert not (tmp_path / "run").exists()
