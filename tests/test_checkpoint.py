"""Checkpoints are written atomically and read back safely."""

import pytest
import torch

from bcnn import checkpoint
from bcnn.checkpoint import load_checkpoint, save_checkpoint
from bcnn.errors import UserError


def test_round_trip(tmp_path):
    state = {"model": {"w": torch.arange(6.0)}, "epoch": 3, "classes": ["a", "b"], "config": {"train": {"seed": 0}}}
    save_checkpoint(state, tmp_path / "run" / "last.pt")
    loaded = load_checkpoint(tmp_path / "run" / "last.pt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["classes"] == ["a", "b"]


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 1}, path)
    before = path.read_bytes()

    def dies_midway(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "no temporary file may be left behind"


def test_truncated_and_unsafe_checkpoints_are_refused(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint({"model": {"w": torch.zeros(1000)}}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UserError, match="cannot be read"):
        load_checkpoint(truncated)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": {}, "payload": UserError("a pickled object")}, unsafe)
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(unsafe)
