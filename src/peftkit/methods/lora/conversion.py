"""``convert_to_lora`` / ``save_as_lora``: an adapter that adds a dense ``ΔW`` (LoHa, LoKr, LoRA) as a LoRA.

As the reference (``peft.tuners.lora.conversion``): each adapted layer's ``ΔW = get_delta_weight(adapter)`` is
factored by its SVD into ``B @ A`` (singular values in ``B``) truncated to ``rank`` (an int), or to the smallest rank
holding a fraction ``rank`` (a float in ``(0, 1]``) of the energy. The scaling is folded into the factors, so every
converted layer has ``lora_alpha == r`` (scaling 1). Which layers can be converted is each layer's own answer
(``AdapterLayer.supports_lora_conversion``); nothing here depends on the adapter's method.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...errors import AdapterNotFoundError, ConfigError, ConfigTypeError, PeftWarning, UnsupportedModuleError
from ...layers.base import AdapterLayer
from ...layers.dispatch import HF_CONV1D, module_kind
from ...layers.modules_to_save import ModulesToSaveWrapper
from ...ops.svd import lora_factors, resolve_rank, svd_spectrum
from ...serialization.files import save_adapter_files
from ...serialization.state_dict import WRAPPER_PREFIX, checkpoint_modules
from ...types import PeftType
from .config import LoraConfig

#: ``(module, adapter_name, rank) -> (A: (k, in), B: (out, k), k)``
ConvertFn = Callable[[AdapterLayer, str, float], tuple[torch.Tensor, torch.Tensor, int]]


def convert_to_lora(
    model: nn.Module,
    rank: float,
    adapter_name: str = "default",
    progressbar: bool = False,
    compile_kwargs: dict[str, Any] | None = None,
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The ``LoraConfig`` and checkpoint tensors of a LoRA that reproduces adapter ``adapter_name`` of ``model``.

    ``model``: a ``PeftModel`` (keys ``base_model.model.<path>.lora_A.weight``) or a model with injected adapters
    (keys ``<path>.lora_A.weight``). ``rank``: an int ``k >= 1`` (every layer gets rank ``k``; at most
    ``min(out, in)`` of each layer), or a float in ``(0, 1]``: per layer, the smallest rank whose singular values
    hold that fraction of ``sum(S**2)`` (stored in ``rank_pattern`` / ``alpha_pattern``). With ``k = min(out, in)``
    the LoRA equals the adapter up to rounding. ``progressbar`` shows a tqdm bar; ``compile_kwargs`` compiles the
    per-layer SVD with ``torch.compile(**compile_kwargs)``. Tensors keep the dtype and device of each ``ΔW``; the
    SVD runs in float32. ``modules_to_save`` copies of the adapter are included under their usual keys.

    Raises: ``ConfigError`` (``ValueError``) for a bad ``rank`` value, a rank above a layer's ``min(out, in)`` or an
    adapter with ``bias != "none"``; ``ConfigTypeError`` (``TypeError``) for a ``rank`` that is not a number;
    ``UnsupportedModuleError`` (``TypeError``) when a layer holding the adapter cannot be converted (convolutions,
    embeddings, IA3, DoRA, ...) or no layer holds it; ``AdapterNotFoundError`` (``KeyError``) for an unknown adapter.
    """
    _check_rank(rank)
    layers = _adapter_layers(model, adapter_name)
    peft_config = _peft_configs(model).get(adapter_name)
    _check_layers(layers, adapter_name, peft_config)
    _check_config(peft_config, adapter_name)
    lora_config = _initial_config(peft_config, rank)
    convert: ConvertFn = _convert_layer if compile_kwargs is None else torch.compile(_convert_layer, **compile_kwargs)
    state_dict: dict[str, torch.Tensor] = {}
    for path, layer in _progress(layers, progressbar):
        name = path.removeprefix(WRAPPER_PREFIX)
        try:
            A, B, k = convert(layer, adapter_name, rank)
        except ConfigError as exc:
            raise ConfigError(exc.field, exc.value, f"{exc.allowed} (layer {name!r})") from None
        _record(lora_config, name, k, rank)
        state_dict[f"{path}.lora_A.weight"] = A
        state_dict[f"{path}.lora_B.weight"] = B
    if peft_config is not None and getattr(peft_config, "modules_to_save", None):
        lora_config.modules_to_save = copy.copy(peft_config.modules_to_save)
        state_dict.update(_modules_to_save_tensors(model, adapter_name))
    return lora_config, state_dict


def save_as_lora(
    path: str | os.PathLike[str],
    model: nn.Module,
    rank: float,
    adapter_name: str = "default",
    progressbar: bool = False,
    compile_kwargs: dict[str, Any] | None = None,
) -> None:
    """:func:`convert_to_lora`, then write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``path``
    (created if missing; both files replaced together). Load it with ``PeftModel.from_pretrained(base, path)``
    here or in 🤗 PEFT. Arguments and errors as :func:`convert_to_lora`."""
    lora_config, state_dict = convert_to_lora(model, rank=rank, adapter_name=adapter_name, progressbar=progressbar,
                                              compile_kwargs=compile_kwargs)
    directory = os.fspath(path)
    os.makedirs(directory, exist_ok=True)
    save_adapter_files(directory, lora_config, state_dict)


# ---------------------------------------------------------------------------------------------------- checks
def _check_rank(rank: object) -> None:
    """An int >= 1 or a float in (0, 1]; as the reference, 0 and floats outside (0, 1] are ``ValueError``s."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ConfigTypeError("rank", rank, "allowed: an int >= 1 (the LoRA rank) or a float in (0, 1] (the "
                              "fraction of each layer's singular value energy to keep)")
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ConfigError("rank", rank, "a float rank is an energy threshold; allowed: 0 < rank <= 1 (or an int "
                          ">= 1 for a fixed rank)")
    if isinstance(rank, int) and rank < 1:
        raise ConfigError("rank", rank, "allowed: an int >= 1 or a float threshold in (0, 1]")


def _peft_configs(model: nn.Module) -> dict[str, PeftConfig]:
    configs = getattr(model, "peft_config", None)
    return configs if isinstance(configs, dict) else {}


def _holders(model: nn.Module, adapter_name: str) -> list[tuple[str, AdapterLayer]]:
    """``(checkpoint path, layer)`` of the adapter layers of ``model`` that hold ``adapter_name``. A layer nested
    in another one's ``base_layer`` (adapters of several methods on one module, ``PeftMixedModel``) gets the path of
    the module it adapts: the converted LoRA is the only layer there."""
    return [(clean, layer) for _, clean, module in checkpoint_modules(model) if isinstance(module, AdapterLayer)
            for layer in _chain(module) if layer.has_adapter(adapter_name)]


def _adapter_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, AdapterLayer]]:
    """:func:`_holders`; an adapter name that the model does not hold raises :class:`AdapterNotFoundError`."""
    layers = _holders(model, adapter_name)
    configs = _peft_configs(model)
    if configs and adapter_name not in configs:
        raise AdapterNotFoundError(adapter_name, configs)
    if not layers and not configs and any(isinstance(m, AdapterLayer) for m in model.modules()):
        held = {name for m in model.modules() if isinstance(m, AdapterLayer) for name in m.adapter_names()}
        raise AdapterNotFoundError(adapter_name, held)
    return layers


def _chain(layer: AdapterLayer) -> list[AdapterLayer]:
    """``layer`` and the adapter layers nested in its ``base_layer``, outermost first."""
    chain: list[AdapterLayer] = []
    module: nn.Module = layer
    while isinstance(module, AdapterLayer):
        chain.append(module)
        module = module.base_layer
    return chain


def _check_layers(layers: list[tuple[str, AdapterLayer]], adapter_name: str, config: PeftConfig | None) -> None:
    """Every layer holding the adapter must support the conversion, and there must be one."""
    unsupported = [(path, layer) for path, layer in layers if not layer.supports_lora_conversion(adapter_name)]
    if unsupported:
        kinds = sorted({f"{type(layer).__name__} on {type(layer.get_base_layer()).__name__}"
                        for _, layer in unsupported})
        names = [path.removeprefix(WRAPPER_PREFIX) for path, _ in unsupported][:5]
        raise UnsupportedModuleError(
            f"Some module types on this model do not support LoRA conversion: {', '.join(kinds)} (e.g. {names}). "
            "Only adapters that add a dense update W + dW to a linear layer convert (LoHa, LoKr, plain LoRA on "
            "nn.Linear / Conv1D); exclude the other layers from target_modules of the adapter you convert"
        )
    if not layers:
        method = f" ({config.peft_type})" if config is not None else ""
        raise UnsupportedModuleError(f"Could not detect any layer that supports LoRA conversion: no adapter layer "
                                     f"holds adapter {adapter_name!r}{method}")


def _check_config(config: PeftConfig | None, adapter_name: str) -> None:
    """As the reference: converting LoRA warns (nothing to gain), a trained bias cannot be carried over."""
    if config is None:
        return
    if config.peft_type == PeftType.LORA:
        warnings.warn("Converting a PEFT adapter to LoRA that is already a LoRA adapter. There is typically no need "
                      "for that.", PeftWarning, stacklevel=3)
    bias = getattr(config, "bias", getattr(config, "lora_bias", "none"))
    if bias != "none":
        raise ConfigError("bias", bias, f"adapter {adapter_name!r} trains biases, which a converted LoRA cannot "
                          "hold; allowed: 'none'")


# ---------------------------------------------------------------------------------------------------- config
def _initial_config(peft_config: PeftConfig | None, rank: float) -> LoraConfig:
    """The converted adapter's config before its layers are recorded (the reference's field choices).

    With a source config: its ``target_modules``, ``base_model_name_or_path`` and ``layers_pattern`` /
    ``layers_to_transform``; ``r = lora_alpha = rank`` for an int rank, else ``1`` (each layer's rank then comes
    from ``rank_pattern`` / ``alpha_pattern``)."""
    r = rank if isinstance(rank, int) else 1
    kwargs: dict[str, Any] = {"rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": set()}
    if peft_config is None:
        # the reference leaves lora_alpha at its default 8 here, which scales an int-rank result by 8 / rank;
        # lora_alpha = r keeps the scaling at 1 (README: deliberate differences)
        return LoraConfig(r=r, lora_alpha=r, target_modules=set(), **kwargs)
    targets = copy.copy(peft_config.target_modules)
    kwargs["target_modules"] = set() if targets is None else targets
    kwargs["base_model_name_or_path"] = peft_config.base_model_name_or_path
    if hasattr(peft_config, "layers_pattern"):
        kwargs["layers_pattern"] = peft_config.layers_pattern
        kwargs["layers_to_transform"] = peft_config.layers_to_transform
    return LoraConfig(r=r, lora_alpha=r, **kwargs)


def _record(config: LoraConfig, name: str, k: int, rank: float) -> None:
    """Add layer ``name`` of rank ``k`` to ``config``, as the reference: to ``rank_pattern`` / ``alpha_pattern`` when
    ``k`` differs from ``rank`` (a float threshold) or ``target_modules`` is a regex, else to ``target_modules``."""
    if k != rank or isinstance(config.target_modules, str):
        config.rank_pattern[name] = k
        config.alpha_pattern[name] = k
    else:
        assert isinstance(config.target_modules, set)
        config.target_modules.add(name)


# ---------------------------------------------------------------------------------------------------- tensors
@torch.no_grad()
def _convert_layer(layer: AdapterLayer, adapter_name: str, rank: float
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``A: (k, in)``, ``B: (out, k)``, ``k``: the truncated SVD of the layer's ``ΔW`` in its dtype and device.

    A transformers ``Conv1D`` stores its weight (and ``ΔW``) as ``(in, out)``: the SVD runs on that layout, as the
    reference's, and the factors are transposed into LoRA's ``(k, in)`` / ``(out, k)``."""
    delta = layer.get_delta_weight(adapter_name).detach()
    U, S, Vh = svd_spectrum(delta)
    k = resolve_rank(S, rank)
    if k > S.shape[0]:
        raise ConfigError("rank", k, f"the chosen rank is larger than the weight shape ({S.shape[0]} = min of "
                          f"{tuple(delta.shape)}); choose a lower rank")
    A, B = lora_factors(U, S, Vh, k, delta.dtype)
    if module_kind(layer.get_base_layer()) == HF_CONV1D:
        return B.T.contiguous(), A.T.contiguous(), k
    return A, B, k


def _modules_to_save_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's ``modules_to_save`` copies under the original modules' keys (``<path>.weight``), as saved."""
    out: dict[str, torch.Tensor] = {}
    for _, clean, module in checkpoint_modules(model):
        if isinstance(module, ModulesToSaveWrapper):
            for saved, (_, tensor) in module.adapter_state(adapter_name).items():
                out[f"{clean}.{saved}" if clean else saved] = tensor.detach()
    return out


def _progress(layers: list[tuple[str, AdapterLayer]], enabled: bool) -> Iterable[tuple[str, AdapterLayer]]:
    if not enabled:
        return layers
    from tqdm import tqdm

    return tqdm(layers, desc="Converting to LoRA")
