"""Config: YAML then overrides, typed; unknown keys and wrong types are errors; the shipped experiments load."""

from pathlib import Path

import pytest

from bcnn.config import config_from_dict, config_to_dict, load_config
from bcnn.errors import UserError

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
    assert (stage1.optim.name, stage1.optim.lr, stage1.optim.momentum, stage1.optim.weight_decay) == ("sgd", 1.0, 0.9, 1e-8)
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
        ("", ["--model.cut=pool4"], "model.cut .* must be one of"),
        ("", ["--optim.lr=-1"], "must not be negative"),
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
