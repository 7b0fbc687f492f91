"""Shared fixtures: generated mini-CUBs in the exact CUB_200_2011 layout (bcnn.data.write_synthetic_cub)."""

import shutil
from pathlib import Path

import pytest

from bcnn.data import write_synthetic_cub


@pytest.fixture(scope="session")
def mini_cub(tmp_path_factory) -> Path:
    """5 classes x 12 images, written once per session: read it, never change it (use writable_cub for that)."""
    return write_synthetic_cub(tmp_path_factory.mktemp("mini") / "CUB_200_2011", classes=5, per_class=12, seed=0)


@pytest.fixture
def writable_cub(mini_cub, tmp_path) -> Path:
    """A private copy of mini_cub that a test may corrupt."""
    return Path(shutil.copytree(mini_cub, tmp_path / "CUB_200_2011"))
