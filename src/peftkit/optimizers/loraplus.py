"""LoRA+ (https://huggingface.co/papers/2402.12354): the B factors learn ``loraplus_lr_ratio`` times faster than A."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

from ..errors import ConfigTypeError

#: optimizers of bitsandbytes whose embedding weights must stay in 32-bit state (as the reference registers)
_EIGHT_BIT = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameter names (every path, shared modules included) inside an ``nn.LayerNorm`` (transformers'
    ``ALL_LAYERNORM_LAYERS``): no weight decay, like every name containing ``bias``."""
    return {f"{path}.{name}" for path, module in model.named_modules(remove_duplicate=False)
            if isinstance(module, nn.LayerNorm) for name, _ in module.named_parameters(remove_duplicate=False)}


def _is_lora_embedding_param(model: nn.Module, name: str) -> bool:
    """Is ``name`` held (through a per-adapter dict) by a LoRA ``Embedding`` layer
    (``<layer>.lora_embedding_A.<adapter>``)?"""
    from ..methods.lora.layers import Embedding

    owner = name.rsplit(".", 2)[0] if name.count(".") >= 2 else ""
    if not owner:
        return False
    try:
        return isinstance(model.get_submodule(owner), Embedding)
    except AttributeError:
        return False


def loraplus_groups(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """``{"groupA", "embedding", "groupB", "groupB_no_decay"}: {name: parameter}`` of the trainable parameters.

    LoRA embedding factors -> ``embedding``; ``lora_B`` and every 1-D parameter (biases, norms) -> ``groupB`` (or
    ``groupB_no_decay`` for biases and LayerNorm weights); everything else (``lora_A``, ``modules_to_save``
    matrices) -> ``groupA``.
    """
    no_decay = _no_decay_names(model)
    groups: dict[str, dict[str, nn.Parameter]] = {"groupA": {}, "embedding": {}, "groupB": {}, "groupB_no_decay": {}}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _is_lora_embedding_param(model, name):
            groups["embedding"][name] = param
        elif "lora_B" in name or param.ndim == 1:
            decays = name not in no_decay and "bias" not in name
            groups["groupB" if decays else "groupB_no_decay"][name] = param
        else:
            groups["groupA"][name] = param
    return groups


def create_loraplus_optimizer(
    model: nn.Module, optimizer_cls: type[Optimizer], *, lr: float, loraplus_lr_ratio: float, **kwargs: Any
) -> Optimizer:
    """An ``optimizer_cls`` over the trainable parameters of ``model`` in four LoRA+ groups (reference order):

    1. A factors and other matrices: ``lr``, ``weight_decay=loraplus_weight_decay``;
    2. LoRA embedding factors: ``lr=loraplus_lr_embedding`` (default 1e-6), ``loraplus_weight_decay``;
    3. B factors and 1-D parameters: ``lr * loraplus_lr_ratio``, ``loraplus_weight_decay``;
    4. the biases / LayerNorm weights among them: ``lr * loraplus_lr_ratio``, no weight decay.

    ``loraplus_lr_ratio`` (ηB/ηA) should be >= 1. ``kwargs``: ``loraplus_weight_decay`` (default 0.0),
    ``loraplus_lr_embedding``, and the rest is passed to ``optimizer_cls``.

    Raises:
        ConfigTypeError: ``optimizer_cls`` is not a class (a ``TypeError``).
    """
    if not isinstance(optimizer_cls, type):
        raise ConfigTypeError("optimizer_cls", optimizer_cls, "allowed: an optimizer class such as torch.optim.AdamW")
    groups = loraplus_groups(model)
    kwargs["lr"] = lr
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    param_groups = [
        {"params": list(groups["groupA"].values()), "weight_decay": weight_decay, "lr": lr},
        {"params": list(groups["embedding"].values()), "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": list(groups["groupB"].values()), "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": list(groups["groupB_no_decay"].values()), "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]
    optimizer = optimizer_cls(param_groups, **kwargs)
    if optimizer_cls.__name__ in _EIGHT_BIT:
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
