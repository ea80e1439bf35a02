"""Classify base modules into the kinds adapter layers exist for (no method-specific code)."""

from __future__ import annotations

import sys

from torch import nn

from ..errors import UnsupportedModuleError
from ..quantization.backends import is_quantized
from .base import AdapterLayer

LINEAR, HF_CONV1D, EMBEDDING, CONV = "linear", "hf_conv1d", "embedding", "conv"
#: a linear layer whose weight is stored quantized (bitsandbytes 8-bit / 4-bit, torchao): methods that list this kind
#: read and write its weight through ``peftkit.quantization`` (``dense_weight`` / ``write_dense_weight``)
QUANT_LINEAR = "quant_linear"
#: ``nn.MultiheadAttention`` (LoRA adapts its ``in_proj_weight`` and ``out_proj``; methods that do not list it refuse it)
MHA = "multihead_attention"


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style ``Conv1D`` (a linear layer whose weight is stored ``(in, out)``).

    transformers is not imported for this: a module cannot be a ``Conv1D`` unless transformers is loaded.
    """
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def module_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"quant_linear"``, ``"hf_conv1d"``, ``"embedding"``, ``"conv"``, ``"multihead_attention"`` or None, looking through
    adapter wrappers."""
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    if isinstance(module, nn.Linear):
        return QUANT_LINEAR if is_quantized(module) else LINEAR
    if is_hf_conv1d(module):
        return HF_CONV1D
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return CONV
    if isinstance(module, nn.MultiheadAttention):
        return MHA
    return None


#: how :func:`require_kind` names each kind in its message
KIND_LABELS: dict[str, str] = {LINEAR: "torch.nn.Linear", QUANT_LINEAR: "quantized linears (bitsandbytes, torchao)",
                               HF_CONV1D: "transformers' Conv1D", EMBEDDING: "nn.Embedding",
                               CONV: "nn.Conv1d/2d/3d", MHA: "nn.MultiheadAttention"}


def require_kind(name: str, module: nn.Module, kinds: tuple[str, ...], method: str) -> str:
    """The kind of target module ``name`` (:func:`module_kind`), or :class:`UnsupportedModuleError` (a
    ``TypeError``, what the reference raises) naming the module, its type and the kinds ``method`` supports."""
    kind = module_kind(module)
    if kind not in kinds:
        base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        supported = ", ".join(KIND_LABELS[k] for k in kinds)
        raise UnsupportedModuleError(f"target module {name!r} is a {type(base).__name__}; {method} supports "
                                     f"{supported}. Adjust target_modules.")
    return kind


def is_linear_like(module: nn.Module) -> bool:
    """Linear layers for ``target_modules="all-linear"``: ``nn.Linear`` (quantized too) and transformers' ``Conv1D``."""
    return module_kind(module) in (LINEAR, QUANT_LINEAR, HF_CONV1D)


#: base-layer types whose forward output no autograd node saves, so adapters may add into it in place
def inplace_safe(module: nn.Module) -> bool:
    """True when ``module`` is exactly a torch linear/conv/embedding (or transformers ``Conv1D``) without hooks."""
    safe = type(module) in (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d) or (
        is_hf_conv1d(module) and type(module).__name__ == "Conv1D"
    )
    return safe and not module._forward_hooks and not module._forward_pre_hooks
