"""Config: YAML then overrides, typed; unknown keys, wrong types, out-of-range values and files YAML cannot read
are one sentence each (exit status 2 from the CLI); the shipped experiments load."""

import dataclasses
from pathlib import Path

import pytest
import torch

from bcnn.config import Config, config_from_dict, config_to_dict, load_config, ranges
from bcnn import train as train_cli
from bcnn.errors import UserError
from bcnn.models.backbones import vgg16_features
from helpers.runs import STAGE1, run_in_process

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def write_yaml(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_experiment_loads(path):
    load_config(path)


def test_stage1_follows_the_recipe_and_stage2_starts_from_stage1():
    stage1 = load_config(EXPERIMENTS / "cub_vgg16_stage1.yaml")
    stage2 = load_config(EXPERIMENTS / "cub_vgg16_stage2.yaml")
    optim = stage1.optim
    assert (optim.name, optim.lr, optim.momentum, optim.weight_decay) == ("sgd", 1.0, 0.9, 1e-8)
    assert (stage1.train.batch_size, stage1.train.epochs, stage1.data.crop) == (64, 55, 448)
    assert stage1.model.freeze_backbone and stage1.model.backbone_weights == "imagenet"
    assert stage1.model.cut == "relu5_3" and stage1.schedule.name == "plateau"
    assert not stage2.model.freeze_backbone
    assert (stage2.optim.lr, stage2.optim.weight_decay, stage2.train.epochs) == (1e-2, 1e-5, 25)
    assert Path(stage2.train.init_from) == Path(stage1.train.run_dir) / "best.pt"
    assert stage1.data == stage2.data, "both stages must see the same data and the same val split"


def test_yaml_then_overrides(tmp_path):
    path = write_yaml(tmp_path, "optim:\n  lr: 0.5\ntrain:\n  epochs: 3\n")
    cfg = load_config(path, ["--train.epochs=7", "--data.hflip", "false", "--optim.weight_decay=1e-4"])
    assert cfg.optim.lr == 0.5 and cfg.train.epochs == 7
    assert cfg.data.hflip is False and cfg.optim.weight_decay == pytest.approx(1e-4)
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "yaml_text, overrides, message",
    [
        ("optim:\n  lrr: 0.5\n", [], "unknown config key 'optim.lrr'"),
        ("optimizer:\n  lr: 0.5\n", [], "unknown config key 'optimizer.lr'"),
        ("train:\n  epochs: three\n", [], "train.epochs .* must be of type int"),
        ("train:\n  epochs: 2.5\n", [], "train.epochs .* must be of type int"),
        ("data:\n  hflip: 1\n", [], "data.hflip .* must be of type bool"),
        ("", ["--train.batch_size=many"], "train.batch_size .* must be of type int"),
        ("", ["--model.cut=pool4"], "model.cut for vgg16 must be auto or one of relu5_3, pool5, got 'pool4'"),
        ("", ["--optim.lr=-1"], "optim.lr must be finite and at least 0, got -1.0"),
        ("", ["--train.accum_steps=0"], "train.accum_steps must be at least 1"),
        ("", ["--train.checkpoint_every=-5"], "train.checkpoint_every must be at least 0"),
        ("", ["--data.val_fraction=0", "--schedule.name=plateau"], "plateau watches val accuracy"),
        ("", ["--train.epochs"], "has no value"),
        ("", ["epochs=3"], "overrides look like --section.key=value"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path, yaml_text, overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(write_yaml(tmp_path, yaml_text), overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"optim:\n  lr: [0.5\ntrain:\n  epochs: 3\n", r"line 3, column 6: this is not valid YAML \(expected ','"),
        (b"optim:\n\tlr: 0.5\n", "line 2, column 1: a tab, which YAML does not allow there"),
        (b"optim: !!python/object:os.system {}\n", "the tag !!python/object:os.system is not allowed, config files "
                                                   "hold plain values only"),
        (b"data:\n  root: caf\xe9\n", r"is not UTF-8 text \(byte 0xe9 on line 2\)"),
        (b"optim:\n  lr: 1\noptim:\n  lr: 2\n", "line 3, column 1: 'optim' is given twice"),
        (b"optim:\n  lr: 1\n  lr: 2\n", "line 3, column 3: 'lr' is given twice"),
        (b"data:\n  root: 2024-13-45\n", "YAML reads '2024-13-45' as a timestamp but cannot make one"),
        (b"data:\n  root: a\x00b\n", "holds the control character U\\+0000 on line 2"),
    ],
    ids=["syntax", "tab", "python-tag", "latin-1", "section-twice", "key-twice", "bad-date", "control-character"],
)
def test_config_file_yaml_cannot_read_is_one_sentence_naming_it(tmp_path, content, message):
    path = tmp_path / "exp.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        load_config(path)
    assert str(error.value).startswith(f"config file {path}") and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("schedule.factor=1", "schedule.factor must be in (0, 1), got 1.0."),
        ("schedule.factor=0", "schedule.factor must be in (0, 1), got 0.0."),
        ("schedule.patience=-1", "schedule.patience must be at least 0, got -1."),
        ("schedule.step_size=0", "schedule.step_size must be at least 1, got 0."),
        ("schedule.min_lr=-inf", "schedule.min_lr must be finite and at least 0, got -inf."),
        ("optim.momentum=-1", "optim.momentum must be in [0, 1), got -1.0."),
        ("optim.momentum=1", "optim.momentum must be in [0, 1), got 1.0."),
        ("optim.lr=nan", "optim.lr must be finite and at least 0, got nan."),
        ("optim.lr=inf", "optim.lr must be finite and at least 0, got inf."),
        ("optim.backbone_lr=-0.1", "optim.backbone_lr must be finite and at least 0, got -0.1."),
        ("optim.weight_decay=nan", "optim.weight_decay must be finite and at least 0, got nan."),
        ("data.rrc_min_scale=2", "data.rrc_min_scale must be in (0, 1], got 2.0."),
        ("data.rrc_min_scale=0", "data.rrc_min_scale must be in (0, 1], got 0.0."),
        ("data.rotation=-10", "data.rotation must be finite and at least 0, got -10.0."),
        ("data.color_jitter=nan", "data.color_jitter must be finite and at least 0, got nan."),
        ("data.val_fraction=nan", "data.val_fraction must be in [0, 1), got nan."),
        ("data.val_fraction=inf", "data.val_fraction must be in [0, 1), got inf."),
        ("model.sqrt_eps=0", "model.sqrt_eps must be finite and greater than 0, got 0.0."),
        ("train.seed=4294967296", "train.seed must be in [0, 4294967295], got 4294967296."),
        ("model.matrix_sqrt_iterations=30", "model.matrix_sqrt_iterations must be in [1, 20], got 30."),
        ("model.isqrt_iterations=0", "model.isqrt_iterations must be in [1, 20], got 0."),
    ],
)
def test_out_of_range_value_names_key_value_and_range(override, message):
    with pytest.raises(UserError) as error:
        load_config(EXPERIMENTS / "demo_stage1.yaml", [f"--{override}"])
    assert str(error.value) == message


def test_every_number_in_the_config_has_a_range():
    numbers = {f"{section.name}.{key.name}" for section in dataclasses.fields(Config)
               for key in dataclasses.fields(section.default_factory()) if key.type in ("int", "float")}
    assert numbers - set(ranges()) == {"data.crop"}, "data.crop's range is its own check: it depends on model.cut"


# VGG16's max-pools before each cut: each halves the image, rounding down, and needs at least 2 pixels.
VGG16_POOLS_BEFORE = {"relu5_3": 4, "pool5": 5}


@pytest.mark.parametrize("cut", sorted(VGG16_POOLS_BEFORE))
def test_smallest_crop_is_the_smallest_input_vgg16_accepts(cut):
    smallest = 2 ** VGG16_POOLS_BEFORE[cut]
    features = vgg16_features(cut, "none").eval()
    with torch.no_grad():
        assert features(torch.zeros(1, 3, smallest, smallest)).shape == (1, 512, 1, 1)
        with pytest.raises(RuntimeError, match="Output size is too small"):
            features(torch.zeros(1, 3, smallest - 1, smallest - 1))
    assert load_config(None, [f"--model.cut={cut}", f"--data.crop={smallest}"]).data.crop == smallest
    with pytest.raises(UserError, match=f"data.crop must be at least {smallest} for vgg16 cut at {cut} "
                                        rf"\(it halves the image {VGG16_POOLS_BEFORE[cut]} times\)"):
        load_config(None, [f"--model.cut={cut}", f"--data.crop={smallest - 1}"])


def test_override_without_value_does_not_take_the_next_option():
    with pytest.raises(UserError) as error:
        load_config(None, ["--train.init_from", "--data.root=/x"])
    assert str(error.value) == "override --train.init_from has no value; write it as --train.init_from=VALUE."


# argparse takes the shorthands (--data-root) out of the line itself, wherever they stand, and hands the rest to
# the config as overrides, with the shorthand appended as --data.root=...: a value-less override before or after
# it must not take that as its value.
@pytest.mark.parametrize(
    "args, message",
    [
        (["--optim.lr", "--data-root", "/some/path"], "override --optim.lr has no value"),
        (["--train.init_from", "--data-root", "/some/path"], "override --train.init_from has no value"),
        (["--data-root", "/some/path", "--optim.lr"], "override --optim.lr has no value"),
        (["--data-root", "/some/path", "--train.init_from"], "override --train.init_from has no value"),
        (["--data-root", "/some/path", "--data.crop=8"], "data.crop must be at least 16 for vgg16 cut at relu5_3"),
    ],
    ids=["lr-then-shorthand", "init_from-then-shorthand", "shorthand-then-lr", "shorthand-then-init_from", "crop"],
)
def test_train_cli_refuses_config_mistake_before_any_data_or_run_dir(tmp_path, args, message):
    """The config is read before the data (/some/path does not exist) and before the run directory is made.
    (In this process, through bcnn.train's own argument parsing; how the CLI prints a UserError in one line is
    the next test's.)"""
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as error:
        train_cli.main(["--config", STAGE1, f"--run-dir={run_dir}", *args])
    assert str(error.value).startswith(message)
    assert not run_dir.exists()


def test_train_cli_names_the_config_file_yaml_cannot_read(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("optim:\n\tlr: 0.5\n")
    result = run_in_process(train_cli.main, "--config", config, f"--run-dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: config file {config}, line 2, column 1: a tab, which YAML does "
                                          "not allow there (it indents with spaces only); use spaces."]
    assert not (tmp_path / "run").exists()


def test_a_folder_where_a_file_belongs_and_a_file_where_a_folder_belongs_are_one_sentence(tmp_path, mini_cub):
    from bcnn import eval as eval_cli
    from bcnn.config import ModelConfig
    from bcnn.models import build_model

    folder, file = tmp_path / "folder", tmp_path / "file"
    folder.mkdir()
    file.write_text("x")
    with pytest.raises(UserError, match=r"^--config .*folder is a folder; pass a YAML file"):
        load_config(folder)
    with pytest.raises(UserError, match=r"^model.backbone_weights .*folder is a folder; give the file in it"):
        build_model(ModelConfig(backbone_weights=str(folder)), 3, input_size=32)
    with pytest.raises(UserError, match=r"^--checkpoint .*folder is a folder; give the checkpoint file in it"):
        eval_cli.main(["--checkpoint", str(folder), "--device", "cpu"])
    for cache_dir, where in ((file, "is a file"), (file / "features", "lies under")):
        with pytest.raises(UserError, match=rf"^train.cache_dir .* {where}.*; give a folder for the feature cache"):
            train_cli.main(["--config", STAGE1, f"--data-root={mini_cub}", f"--run-dir={tmp_path / 'run'}",
                            "--device=cpu", "--data.resize=40", "--data.crop=32", "--model.backbone_weights=none",
                            "--train.cache_features=true", f"--train.cache_dir={cache_dir}", "--data.num_workers=0"])
