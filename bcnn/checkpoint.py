"""Checkpoints: plain dicts of tensors and Python values, written atomically, read with weights_only=True.

A checkpoint holds `model` (state dict without `module.` / `_orig_mod.` prefixes), `config` (a plain dict),
`classes` (names, so prediction needs no dataset), `epoch`, `metrics`, and for `last.pt` the optimizer and
scheduler states. Writing goes to a temporary file in the same folder and is then renamed over the target,
so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch

from bcnn.errors import UserError


def save_checkpoint(state: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict:
    """Load on the CPU; refuse anything that is not plain tensors and values (no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; train first (make stage1 / make stage2) or pass --checkpoint.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"checkpoint {path} holds objects other than tensors and plain values, refused for safety ({e}).") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"checkpoint {path} cannot be read (truncated or not a checkpoint: {e}); use another file.") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"checkpoint {path} has no 'model' entry; it was not written by bcnn.train.")
    return state
