"""Checkpoints: plain dicts of tensors and Python values, written atomically, read with weights_only=True.

A checkpoint holds `model` (state dict without `module.` / `_orig_mod.` prefixes), `config` (a plain dict),
`classes` (names, so prediction needs no dataset), `epoch` (epochs completed), `metrics`, and for `last.pt`
everything a resumed run needs to continue exactly as if it had never stopped: optimizer, scheduler and grad
scaler states, `step_in_epoch` and `global_step`, the best val score so far, the partial epoch's sums and
the random generators' states. Writing goes to a temporary file in the same folder and is then renamed over the target,
so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from bcnn.errors import UserError, signals_held
from bcnn.paths import not_a_file


# torch.save's size beyond the tensors' bytes (pickled structure, zip headers); the free-space check's margin
HEADROOM_BYTES = 1 << 20


def save_checkpoint(state: dict, path: str | Path, then: str = "run the same command again") -> None:
    """Write to a temporary file beside `path`, then rename it over `path`: whatever stops the write (a full
    disk, a crash), the previous checkpoint stays whole and no temporary file is left. Ctrl-C and SIGTERM wait
    for the write to finish. A full or read-only disk is a UserError that ends with `then`, what to do once the
    disk is fixed."""
    path = Path(path)
    needed = _tensor_bytes(state) + HEADROOM_BYTES
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
        if free < needed:
            raise UserError(_no_space(path, needed, free, then))
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise UserError(f"cannot write {path} ({(error.strerror or str(error)).lower()}); {_previous(path)}; make "
                        f"the folder writable, then {then}.") from None
    try:
        with signals_held(), os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        # torch.save reports ENOSPC as "RuntimeError: [enforce fail at inline_container.cc] unexpected pos"
        if isinstance(error, (OSError, RuntimeError)) and _disk_full(error, path, needed):
            raise UserError(_no_space(path, needed, shutil.disk_usage(path.parent).free, then)) from None
        raise


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def _disk_full(error: BaseException, path: Path, needed: int) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(path.parent).free < needed
    except OSError:
        return False


def _previous(path: Path) -> str:
    return f"the previous {path.name} is intact" if path.exists() else f"no {path.name} has been written yet"


def _no_space(path: Path, needed: int, free: int, then: str) -> str:
    return (f"the disk holding {path.parent} is full: {path.name} needs about {needed / 2**20:,.1f} MB and "
            f"{free / 2**20:,.1f} MB are free; {_previous(path)}; free some space, then {then}.")


def _read(path: Path, option: str):
    """option: the setting that named the file (--checkpoint, --resume, train.init_from), for the error to name."""
    kind = not_a_file(path)  # one stat, nothing opened: reading a named pipe would wait for a writer forever
    if kind == "missing":
        raise UserError(f"checkpoint {path} does not exist; train first (make stage1 / make stage2), or give "
                        f"{option} a checkpoint that exists.")
    if kind == "a folder":
        raise UserError(f"{option} {path} is a folder; give the checkpoint file in it (best.pt or last.pt).")
    if kind is not None and kind.startswith("not readable"):
        raise UserError(f"cannot read checkpoint {path}: it is {kind}; give {option} a checkpoint this user can read.")
    if kind is not None:
        raise UserError(f"{option} {path} is {kind}, not a checkpoint file; give the best.pt or last.pt a run wrote.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))  # weights_only names the class it would have had to import
        if not found:
            raise UserError(f"checkpoint {path} cannot be read (not a PyTorch checkpoint); use another file.") from None
        raise UserError(f"checkpoint {path} holds objects other than tensors and plain values ({found.group(1)}), "
                        "refused for safety: unpickling them could run code; use a checkpoint written by "
                        "bcnn.train.") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"checkpoint {path} cannot be read (truncated or not a checkpoint: {_first_line(e)}); "
                        "use another file.") from None


def _first_line(error: Exception) -> str:
    """torch's load errors run to many lines of advice about weights_only; the first says what happened."""
    lines = str(error).strip().splitlines()
    return lines[0].rstrip(". ") if lines else type(error).__name__


def load_checkpoint(path: str | Path, option: str = "--checkpoint", needs: tuple[str, ...] = ("classes", "config"),
                    then: str = "use a best.pt or last.pt that bcnn.train wrote") -> dict:
    """Load on the CPU; refuse anything that is not plain tensors and values (no pickled code runs), a checkpoint
    without the entries `needs` names, and weights holding NaN or inf. option: the command's setting that named
    the file, which an error names; then: what to do instead, which a refusal ends with."""
    path = Path(path)
    state = _read(path, option)
    if _is_state_dict(state):
        raise UserError(f"{option} {path} is a bare state dict ({len(state)} tensors of model weights), without the "
                        f"config and class names a checkpoint carries; {then}, or start a new run from these weights "
                        "with --train.init_from.")
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"checkpoint {path} has no 'model' entry of weights; it was not written by bcnn.train: {then}.")
    missing = [entry for entry in needs if entry not in state]
    if missing:
        raise UserError(f"checkpoint {path} has no {' or '.join(repr(entry) for entry in missing)} entry, which "
                        f"{option} needs (written by another program, or damaged); {then}.")
    if "classes" in needs and not (isinstance(state["classes"], list) and state["classes"]
                                   and all(isinstance(name, str) for name in state["classes"])):
        raise UserError(f"checkpoint {path}'s 'classes' entry is not a list of class names; {then}.")
    if "config" in needs and not isinstance(state["config"], dict):
        raise UserError(f"checkpoint {path}'s 'config' entry is not a config (a dict of sections); {then}.")
    check_finite(state["model"], f"checkpoint {path}")
    return state


def _is_state_dict(state) -> bool:
    return isinstance(state, dict) and bool(state) and all(isinstance(value, torch.Tensor) for value in state.values())


def check_finite(weights: dict, source: str) -> None:
    """Weights holding NaN or inf (a run that diverged, a damaged file) give NaN logits, which argmax reads as class
    0: refused by name rather than evaluated, predicted from or trained on. source: the file, as the error names it
    ("checkpoint runs/x/best.pt")."""
    bad = [name for name, value in weights.items()
           if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        first = weights[bad[0]]
        count = int((~torch.isfinite(first)).sum())
        more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
        raise UserError(f"{source} holds NaN or inf weights: {count} of the {first.numel():,} values of {bad[0]}"
                        f"{more}; the run diverged or the file is damaged: use an earlier checkpoint, or train again "
                        "with a lower learning rate.")


def load_weights(path: str | Path) -> dict:
    """Model weights for `train.init_from`: a bcnn checkpoint, or a bare state dict, as other codebases save
    with torch.save(model.state_dict()); returned as a checkpoint dict, with only `model` for a bare one."""
    path = Path(path)
    state = _read(path, "train.init_from")
    if _is_state_dict(state):
        state = {"model": state}
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"{path} is neither a bcnn checkpoint nor a state dict of tensors; use another file.")
    check_finite(state["model"], f"checkpoint {path}")
    return state


def rng_states() -> dict:
    """Every random generator a run draws from, as plain values a weights_only load accepts."""
    return {
        "python": _python_state_to_list(random.getstate()),
        "numpy": _numpy_state_to_dict(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: dict) -> None:
    random.setstate(_python_state_from_list(states["python"]))
    np.random.set_state(_numpy_state_from_dict(states["numpy"]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


# random's and numpy's states are tuples holding a tuple / an array: store them as lists and tensors, which
# torch.load(weights_only=True) reads back, rather than as pickled objects it would refuse.
def _python_state_to_list(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_list(values) -> tuple:
    version, internal, gauss = values
    return version, tuple(internal), gauss


def _numpy_state_to_dict(state) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_state_from_dict(values) -> tuple:
    return (values["name"], values["keys"].numpy().astype(np.uint32), values["pos"], values["has_gauss"],
            values["cached"])
