"""Preparing a quantized model for training: ``prepare_model_for_kbit_training`` and the CPU repacking guard."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..layers.base import AdapterLayer
from ..module_utils import walk_modules
from .backends import backend_of

#: ``quantization_method`` values whose non-quantized parameters must keep their dtype (as the reference)
_KEEP_DTYPE_METHODS = ("gptq", "aqlm", "eetq", "hqq", "torchao")


def make_quantized_layers_trainable(model: nn.Module) -> int:
    """Let every quantized linear of ``model`` pass gradients: each backend undoes and disables its
    inference-only state (bitsandbytes 4-bit CPU repacking). Returns how many quantized layers were seen."""
    count = 0
    for _, module in walk_modules(model, leaves=(AdapterLayer,)):  # an adapter layer: only its base layer
        if isinstance(module, AdapterLayer):
            module = module.get_base_layer()
        backend = backend_of(module)
        if backend is not None:
            backend.prepare(module)
            count += 1
    return count


def _method(model: nn.Module) -> str | None:
    method = getattr(model, "quantization_method", None)
    return None if method is None else str(getattr(method, "value", method))


def is_kbit_model(model: nn.Module) -> bool:
    """True for a transformers model loaded quantized (or any model holding a quantized linear)."""
    flags = ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")
    if any(getattr(model, f, False) for f in flags) or _method(model) is not None:
        return True
    return any(backend_of(m) is not None for m in model.modules())


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Prepare a quantized transformers model for adapter training, as the reference does:

    1. freeze every parameter;
    2. cast float16/bfloat16 parameters that are not quantized to float32 (skipped for GPTQ, AQLM, EETQ, HQQ and
       torchao models, whose kernels expect their dtype);
    3. for a quantized model with gradient checkpointing: make the input embeddings' output require grad when
       checkpointing is reentrant (the default, ``use_reentrant`` missing or True) and enable gradient
       checkpointing with ``gradient_checkpointing_kwargs``.

    peftkit also makes every quantized layer safe to train through (bitsandbytes 4-bit CPU repacking is undone
    and turned off). Returns ``model`` (modified in place).
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for param in model.parameters():
        param.requires_grad_(False)
    if _method(model) not in _KEEP_DTYPE_METHODS:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    make_quantized_layers_trainable(model)
    if is_kbit_model(model) and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            _inputs_require_grad(model)
        _enable_checkpointing(model, kwargs)
    return model


def _inputs_require_grad(model: nn.Module) -> None:
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        output.requires_grad_(True)

    model.get_input_embeddings().register_forward_hook(hook)


def _enable_checkpointing(model: nn.Module, kwargs: dict[str, Any]) -> None:
    """transformers 5 renamed ``gradient_checkpointing_enable(gradient_checkpointing_kwargs=)`` to
    ``activation_checkpointing_enable(activation_checkpointing_kwargs=)`` (the old name warns); use what exists."""
    new = getattr(model, "activation_checkpointing_enable", None)
    if new is not None and "activation_checkpointing_kwargs" in inspect.signature(new).parameters:
        new(activation_checkpointing_kwargs=kwargs)
        return
    old = model.gradient_checkpointing_enable
    if "gradient_checkpointing_kwargs" in inspect.signature(old).parameters:
        old(gradient_checkpointing_kwargs=kwargs)
    else:
        old()
