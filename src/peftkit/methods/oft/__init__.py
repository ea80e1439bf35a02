"""OFT (orthogonal fine-tuning, https://huggingface.co/papers/2306.07280): registration with the registry."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...errors import PeftWarning, UnsupportedModuleError
from ...layers.base import AdapterLayer
from ...layers.dispatch import CONV, EMBEDDING, LINEAR, QUANT_LINEAR, require_kind
from ...registry import MethodSpec, register_method
from ...target_tables import default_lora_targets
from ...types import PeftType
from .config import OFTConfig
from .layers import OFTLayer, OFTSettings, conv_filter_size, fit_block_size, warn_fitted

#: module kinds OFT wraps: nn.Linear (also quantized), nn.Embedding and nn.Conv1d/2d/3d (the reference: Linear and
#: Conv2d, also quantized, and Embedding)
OFT_KINDS: tuple[str, ...] = (LINEAR, QUANT_LINEAR, EMBEDDING, CONV)


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    """Per-layer facts: the kind, the rotated length and ``r`` / block size fitted to it (pure)."""
    assert isinstance(config, OFTConfig)
    kind = require_kind(name, module, OFT_KINDS, "OFT")
    base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
    if kind == CONV and isinstance(module, AdapterLayer) and not isinstance(module, OFTLayer) and (
            base.groups != 1 or any(k != 1 for k in base.kernel_size)):
        raise UnsupportedModuleError(
            f"target module {name!r} is a {type(base).__name__} with kernel {tuple(base.kernel_size)} and groups "
            f"{base.groups} already wrapped by another method's layer: OFT can wrap it only for a 1x1 kernel and "
            "groups=1 (it rotates the flattened filter otherwise). Adjust target_modules."
        )
    features = base.embedding_dim if kind == EMBEDDING else conv_filter_size(base) if kind == CONV else base.in_features
    r, block_size, warning = fit_block_size(features, config.r, config.oft_block_size)
    return {"kind": kind, "r": r, "block_size": block_size, "fit_warning": warning}


def _create_layer(
    module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str, dtype: torch.dtype
) -> OFTLayer:
    assert isinstance(config, OFTConfig)
    warn_fitted(options["fit_warning"])
    if config.fan_in_fan_out and options["kind"] in (LINEAR, QUANT_LINEAR):
        warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                      "Using fan_in_fan_out=False.", PeftWarning, stacklevel=3)
    layer = module if isinstance(module, OFTLayer) else OFTLayer(module, options["kind"])
    settings = OFTSettings(
        r=options["r"], block_size=options["block_size"], module_dropout=float(config.module_dropout),
        coft=config.coft, eps=float(config.eps), block_share=config.block_share,
        use_cayley_neumann=config.use_cayley_neumann, num_cayley_neumann_terms=config.num_cayley_neumann_terms,
    )
    layer.update_layer(adapter_name, settings, init_weights=config.init_weights, dtype=dtype)
    return layer


OFT = register_method(
    MethodSpec(
        peft_type=PeftType.OFT,
        prefix="oft_",
        config_cls=OFTConfig,
        tuner_name="OFTModel",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=default_lora_targets,  # the reference's OFT table is LoRA's
        identity_at_init=True,
        mergeable=True,
        # r=1 (one block of the whole input): divides every layer of the suite's models (no fitting warning) and
        # makes a fresh non-identity adapter clearly visible
        example_configs=(
            {"r": 1, "oft_block_size": 0},
            {"r": 1, "oft_block_size": 0, "use_cayley_neumann": False, "coft": True, "eps": 10.0,
             "bias": "oft_only"},
        ),
        # a rotation changes tiny BERT's ~1e-2 logits little; the 3-term series turns N(0, 0.1²) into a clear change
        non_identity_kwargs={"init_weights": False, "num_cayley_neumann_terms": 3},
        additive=False,  # several adapters compose rotations (x R_1 R_2), they do not add updates
        supported_kinds=OFT_KINDS,
        pattern_fields=(),
        mixed_compatible=True,
        layer_cls=OFTLayer,
    )
)

__all__ = ["OFT", "OFTConfig", "OFTLayer"]
