"""A parameter-efficient run's checkpoints (model.adapt): the tensors that trained and the head's, not the frozen
backbone's hundreds of megabytes, which its weights (timm's pretrained tag or a file, model.backbone_weights)
rebuild; a fingerprint of those frozen tensors makes loading refuse any other weights in one sentence.

    kept = FrozenBackbone.of(cfg, model)      # at the start of a run (None: the run's checkpoints hold every weight)
    save({"model": kept.without(model.state_dict()), **kept.entry(), ...})
    load_model_weights(model, complete_weights(model, checkpoint, "checkpoint runs/x/best.pt"))

The fingerprint is a SHA-256 over every frozen tensor's name, dtype, shape and bytes, in name order: any weight that
differs (another timm version's weights, another file, another crop's resampled position embedding) changes it. A
run on random backbone weights (model.backbone_weights=none) keeps every weight: nothing could rebuild them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from bcnn.errors import UserError

ENTRY = "frozen_backbone"  # the checkpoint entry: {"weights", "tensors", "sha256"}


def frozen_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of the backbone's tensors that do not train (parameters and buffers), in name order."""
    trained = {id(parameter) for parameter in model.backbone.parameters() if parameter.requires_grad}
    return sorted(f"backbone.{name}" for name, tensor in model.backbone.state_dict(keep_vars=True).items()
                  if id(tensor) not in trained)


def fingerprint(state: dict, keys: list[str]) -> str:
    digest = hashlib.sha256()
    for key in keys:
        tensor = state[key].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key} {tensor.dtype} {tuple(state[key].shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())  # bytes of any dtype (bf16 has no NumPy type)
    return digest.hexdigest()


@dataclass(frozen=True)
class FrozenBackbone:
    keys: frozenset[str]
    weights: str  # model.backbone_weights: "imagenet" (the pretrained tag in model.backbone) or a file
    sha256: str

    @classmethod
    def of(cls, cfg, model: nn.Module) -> FrozenBackbone | None:
        """What a run's checkpoints leave out (cfg: bcnn.config.Config); None when they keep every weight."""
        if cfg.model.adapt == "none" or cfg.model.backbone_weights == "none":
            return None
        keys = frozen_keys(model)
        return cls(frozenset(keys), cfg.model.backbone_weights, fingerprint(model.state_dict(), keys))

    def without(self, state: dict) -> dict:
        return {key: value for key, value in state.items() if key not in self.keys}

    def entry(self) -> dict:
        return {ENTRY: {"weights": self.weights, "tensors": len(self.keys), "sha256": self.sha256}}


def complete_weights(model: nn.Module, checkpoint: dict, source: str) -> dict:
    """checkpoint["model"] with the frozen backbone tensors of `model` (built from model.backbone_weights) added back,
    once their fingerprint is the run's; a checkpoint that keeps every weight is returned as it is. source: the file,
    as an error names it ("checkpoint runs/x/best.pt")."""
    entry = checkpoint.get(ENTRY)
    if entry is None:
        return checkpoint["model"]
    keys, state = frozen_keys(model), model.state_dict()
    if len(keys) != entry.get("tensors") or fingerprint(state, keys) != entry.get("sha256"):
        raise UserError(f"{source} holds the tensors a model.adapt run trained beside frozen backbone weights that "
                        f"differ from the ones model.backbone_weights={entry.get('weights')} gives here (their "
                        "fingerprint does not match); load it where those weights are the run's (the same file, or "
                        "the same timm version's pretrained weights), or train again.")
    return {**{key: state[key] for key in keys}, **checkpoint["model"]}


def needs_backbone_weights(checkpoint: dict) -> bool:
    """Whether loading this checkpoint rebuilds the frozen backbone from model.backbone_weights (else every weight
    is in it)."""
    return ENTRY in checkpoint
