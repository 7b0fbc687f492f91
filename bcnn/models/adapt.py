"""Parameter-efficient adaptation of a frozen backbone (model.adapt): which of its tensors train beside the pooling
head and the classifier, which always do.

    none     model.freeze_backbone decides: nothing of the backbone trains (stage 1, a linear probe), or all of it
    bitfit   the backbone's biases and nothing else (Ben Zaken, Ravfogel, Goldberg, "BitFit", ACL 2022): 0.1% of
             ViT-B/16's weights; the VPT benchmark's 88.0 mean top-1 over its five FGVC datasets at 224 px
    lora     low-rank updates W + (alpha / r) B A of the linear layers model.lora_targets names (Hu et al., ICLR
             2022), through Hugging Face peft (pip install peft): A (r x in) and B (out x r) train, B starts at 0, so
             at initialisation the model is the frozen one exactly
    vpt_deep model.vpt_prompts learned tokens in every block of a ViT or Swin (Jia et al., "Visual Prompt Tuning",
             ECCV 2022), taken out before the token grid becomes the head's map (bcnn/models/prompts.py)

The backbone stays in eval mode (no dropout, no batch statistics), as a frozen one does: only the named tensors
move (and LoRA's own dropout, model.lora_dropout, which is on while training). Applied by build_model after the
backbone is frozen and before the optimizer is built, so the optimizer's "backbone" group (optim.backbone_lr) holds
exactly the adapted tensors.
"""

from __future__ import annotations

from torch import nn

from bcnn.errors import UserError
from bcnn.models.prompts import add_prompts

ADAPTATIONS = ("none", "bitfit", "lora", "vpt_deep")
# A module that trains inside a frozen backbone (LoRA's dropout) carries this attribute: BilinearCNN.train() puts it in
# training mode while the rest of the backbone stays in eval mode.
TRAINS_IN_FROZEN_BACKBONE = "bcnn_trains_in_frozen_backbone"


def adapt_backbone(backbone: nn.Module, cfg) -> None:
    """Let the adapted tensors of a frozen backbone train (requires_grad true). cfg: bcnn.config.ModelConfig."""
    method, name = cfg.adapt, cfg.backbone
    if method == "none":
        return
    if method == "lora":
        add_lora(backbone, cfg)
        return
    if method == "vpt_deep":
        add_prompts(backbone, cfg.vpt_prompts, name)  # new parameters: they train
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


def add_lora(backbone: nn.Module, cfg) -> None:
    """peft's LoRA layers in place of the linear layers whose names end in one of model.lora_targets; only their A
    and B train (peft's inject_adapter_in_model marks them so)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UserError("model.adapt=lora uses Hugging Face peft, which is not installed; pip install peft (or pip "
                        "install -e '.[peft]').") from None
    targets = [target.strip() for target in cfg.lora_targets.split(",") if target.strip()]
    linear = [key for key, module in backbone.named_modules() if isinstance(module, nn.Linear)]
    chosen = {target: [key for key in linear if key == target or key.endswith("." + target)] for target in targets}
    missing = [target for target, keys in chosen.items() if not keys]
    if not targets or missing:
        names = sorted({key.rsplit(".", 1)[-1] for key in linear})
        has = f"its linear layers are named {', '.join(names)}" if names else "it has no linear layers"
        raise UserError(f"model.lora_targets={cfg.lora_targets!r} names {', '.join(missing) or 'nothing'}, which "
                        f"matches no linear layer of model.backbone={cfg.backbone} ({has}); name some of those (timm's "
                        "ViTs and Swins: qkv, proj, fc1, fc2; EVA-02: q_proj, k_proj, v_proj, proj, fc1_g, fc1_x, fc2).")
    # The linear layers by their full names: peft's own matching by suffix would also take a convolution named like
    # one (a ViT's patch_embed.proj for "proj").
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=sorted({key for keys in chosen.values() for key in keys}), bias="none")
    inject_adapter_in_model(config, backbone)
    for module in backbone.modules():
        # timm's Swin-V2 (and EVA) attention with separate q and v biases multiplies by its qkv layer's weight
        # itself (F.linear(x, self.qkv.weight, bias)), which would bypass LoRA's layer: it calls the layer and adds
        # the biases after it instead when told they are separate; the same sum.
        if getattr(module, "q_bias", None) is not None and hasattr(module, "qkv_bias_separate") and \
                hasattr(getattr(module, "qkv", None), "lora_A"):
            module.qkv_bias_separate = True
    for module in backbone.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for dropout in dropouts.values():
                setattr(dropout, TRAINS_IN_FROZEN_BACKBONE, True)


def merge_adapters(model: nn.Module) -> int:
    """Fold each LoRA layer's update into its frozen weight (peft's merge: W + (alpha / r) B A), so inference costs
    what the plain model costs; the function is the same up to float rounding. For inference only (bcnn.predict):
    training on after a merge would add the update twice. Returns how many layers were merged (0 without LoRA)."""
    merged = 0
    for module in model.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A") and not getattr(module, "merged", False):
            module.merge()
            merged += 1
    return merged
