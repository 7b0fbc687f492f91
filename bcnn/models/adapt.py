"""Parameter-efficient adaptation of a frozen backbone (model.adapt): which of its tensors train beside the pooling
head and the classifier, which always do.

    none     model.freeze_backbone decides: nothing of the backbone trains (stage 1, a linear probe), or all of it
    bitfit   the backbone's biases and nothing else (Ben Zaken, Ravfogel, Goldberg, "BitFit", ACL 2022): 0.1% of
             ViT-B/16's weights; the VPT benchmark's 88.0 mean top-1 over its five FGVC datasets at 224 px

The backbone stays in eval mode (no dropout, no batch statistics), as a frozen one does: only the named tensors
move. Applied by build_model after the backbone is frozen and before the optimizer is built, so the optimizer's
"backbone" group (optim.backbone_lr) holds exactly the adapted tensors. LoRA (through peft) and deep visual prompts
come next (issue 31); until then their names are not accepted.
"""

from __future__ import annotations

from torch import nn

from bcnn.errors import UserError

ADAPTATIONS = ("none", "bitfit")


def adapt_backbone(backbone: nn.Module, method: str, name: str) -> None:
    """Let the adapted tensors of a frozen backbone train (requires_grad true); name: model.backbone, for messages."""
    if method == "none":
        return
    if method == "bitfit":
        biases = [parameter for key, parameter in backbone.named_parameters() if key.endswith("bias")]
        if not biases:
            raise UserError(f"model.adapt=bitfit trains the backbone's biases, and model.backbone={name} has none; "
                            "pick another model.adapt, or model.freeze_backbone=false.")
        for bias in biases:
            bias.requires_grad_(True)
        return
    raise UserError(f"model.adapt must be one of {', '.join(ADAPTATIONS)}, got {method!r}.")


def trained_share(model: nn.Module) -> tuple[int, int]:
    """(parameters that train, all parameters) of a model: what train.log states."""
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)
