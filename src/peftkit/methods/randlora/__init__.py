"""RandLoRA (full-rank updates from shared random bases): registration of the method with the registry.

The shared bases (:class:`RandLoraBases`) are made once per distinct spec (seed, r, sizes, sparsity) after the layers
of an adapter exist (``extra_layers``: the first step that sees all of them, so the bases are sized by the largest
adapted layer, as the reference's ``_find_dim``) and referenced by every layer. Checkpoints store them as the
reference does when ``save_projection``: once under ``base_model.randlora_A`` / ``randlora_B`` (``export_state``)
and once more under each layer (``RandLoraLayer.adapter_state``); with ``save_projection=False`` not at all (the seed
regenerates them bit-exactly).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...errors import (
    AdapterConflictError,
    AdapterLoadError,
    PeftWarning,
    ShapeMismatchError,
)
from ...layers.dispatch import HF_CONV1D, LINEAR, QUANT_LINEAR, require_kind
from ...module_utils import walk_modules
from ...registry import MethodSpec, register_method
from ...target_tables import default_lora_targets
from ...types import PeftType
from .bases import BasisSpec, RandLoraBases, generate_bases
from .config import RandLoraConfig
from .layers import RandLoraLayer

#: the module kinds RandLoRA wraps (the reference: ``nn.Linear``, bitsandbytes 8-bit / 4-bit linears and transformers'
#: ``Conv1D``; torchao linears merge through the same dense read / re-quantization)
RANDLORA_KINDS = (LINEAR, QUANT_LINEAR, HF_CONV1D)
#: checkpoint names of the shared bases (model level: after ``base_model.``; per layer: after the layer's path)
BASIS_KEYS = ("randlora_A", "randlora_B")


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    """Per-layer facts: the layer kind and ``fan_in_fan_out`` (detected: True exactly for ``Conv1D``)."""
    kind = require_kind(name, module, RANDLORA_KINDS, "RandLoRA")
    return {"kind": kind, "fan_in_fan_out": kind == HF_CONV1D}


def _create_layer(module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str,
                  dtype: torch.dtype) -> RandLoraLayer:
    assert isinstance(config, RandLoraConfig)
    layer = module if isinstance(module, RandLoraLayer) else RandLoraLayer(module, options["fan_in_fan_out"])
    layer.update_layer(adapter_name, config.r, config.randlora_alpha, config.randlora_dropout, config.init_weights,
                       dtype=dtype)
    return layer


def _layers(model: nn.Module) -> list[RandLoraLayer]:
    return [m for _, m in walk_modules(model) if isinstance(m, RandLoraLayer)]


def basis_spec(config: RandLoraConfig, layers: list[RandLoraLayer]) -> BasisSpec:
    """The bases ``config`` asks for over ``layers``: sized by the elementwise largest ``(out, in)``; ternary with
    ``sparsity = sqrt(min_dim)`` (``very_sparse``, checked first as the reference) or ``3`` (``sparse``)."""
    out_dim, in_dim = max(m.out_features for m in layers), max(m.in_features for m in layers)
    max_dim, min_dim = max(out_dim, in_dim), min(out_dim, in_dim)
    sparsity = math.sqrt(min_dim) if config.very_sparse else 3.0 if config.sparse else None
    return BasisSpec(config.projection_prng_key, config.r, max_dim, min_dim, sparsity)


def _bind_bases(model: nn.Module, config: PeftConfig, adapter_name: str, applied: Any,
                autocast_adapter_dtype: bool) -> None:
    """Give every layer of ``adapter_name`` its shared bases: an existing object of the same spec, or new ones.
    Checked against the other adapters' first (the reference's rules): the same ``projection_prng_key`` and
    ``save_projection`` for all."""
    assert isinstance(config, RandLoraConfig)
    layers = _layers(model)
    mine = [layer for layer in layers if layer.has_adapter(adapter_name)]
    others = {id(b): b for layer in layers for name, b in layer.randlora_bases.items() if name != adapter_name}
    for bases in others.values():
        for field, ours, theirs in (("projection_prng_key", config.projection_prng_key, bases.spec.seed),
                                    ("save_projection", config.save_projection, bases.save_projection)):
            if ours != theirs:
                raise AdapterConflictError(
                    f"{field}={ours!r} differs from the RandLoRA adapters already in the model ({field}={theirs!r}); "
                    f"all RandLoRA adapters of a model must use the same {field}")
    if not mine:
        return
    spec = basis_spec(config, mine)
    shared = next((b for b in others.values() if b.spec == spec), None)
    if shared is None:
        first = mine[0]
        shared = RandLoraBases(spec, config.save_projection, dtype=first.randlora_lambda[adapter_name].dtype,
                               device=first.get_base_layer().weight.device)
    for layer in mine:
        layer.bind_bases(adapter_name, shared)


def _bases_of(model: nn.Module, adapter_name: str) -> RandLoraBases:
    for layer in _layers(model):
        if adapter_name in layer.randlora_bases:
            return layer.randlora_bases[adapter_name]
    raise AdapterLoadError(f"no RandLoRA layer of the model holds adapter {adapter_name!r}")


def _prefix(keys: Any) -> str:
    """``"base_model."`` when the checkpoint keys are a ``PeftModel``'s (``base_model.model.…``), else ``""``."""
    return "base_model." if any(str(k).startswith("base_model.model.") for k in keys) else ""


def _export_state(model: nn.Module, config: PeftConfig, adapter_name: str,
                  tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the model-level copy of the shared bases (``base_model.randlora_A`` / ``randlora_B``, as the reference)
    when ``save_projection``; the per-layer copies come from the layers' ``adapter_state``."""
    assert isinstance(config, RandLoraConfig)
    if not config.save_projection:
        return tensors
    bases, prefix = _bases_of(model, adapter_name), _prefix(tensors)
    return {**tensors, **{prefix + name: getattr(bases, name).detach() for name in BASIS_KEYS}}


def _is_model_level(key: str) -> bool:
    return key.removeprefix("base_model.model.").removeprefix("base_model.") in BASIS_KEYS


def _convert_checkpoint(model: nn.Module, checkpoint: dict[str, torch.Tensor],
                        adapter_name: str) -> dict[str, torch.Tensor]:
    """Load the model-level bases of ``checkpoint`` into the adapter's (the per-layer copies then load through the
    layers). ``save_projection=True`` without bases in the file is an error; with ``save_projection=False`` bases
    found in the file are ignored with a warning (the seed regenerates them)."""
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if not isinstance(config, RandLoraConfig):
        return checkpoint
    is_basis = [k for k in checkpoint if k.rsplit(".", 1)[-1] in BASIS_KEYS]
    if not config.save_projection:
        if is_basis:
            warnings.warn("save_projection=False but the checkpoint holds randlora_A / randlora_B; they are ignored "
                          "and the bases regenerated from projection_prng_key", PeftWarning, stacklevel=4)
        return {k: v for k, v in checkpoint.items() if k not in set(is_basis)}
    if not is_basis:
        raise AdapterLoadError(
            f"save_projection=True but the checkpoint of adapter {adapter_name!r} holds no randlora_A / randlora_B; "
            "set save_projection=False in adapter_config.json to regenerate them from projection_prng_key")
    saved = {key.rsplit(".", 1)[-1]: checkpoint[key] for key in is_basis if _is_model_level(key)}
    if len(saved) == len(BASIS_KEYS):
        _adopt_saved_bases(model, adapter_name, saved["randlora_A"], saved["randlora_B"])
    return {k: v for k, v in checkpoint.items() if not _is_model_level(k)}


def _adopt_saved_bases(model: nn.Module, adapter_name: str, saved_a: torch.Tensor, saved_b: torch.Tensor) -> None:
    """Give ``adapter_name`` the file's bases: copied into its own when they have the same shape and are not
    shared with another adapter that uses other values; else, when the file's bases fit every layer of the adapter
    (the reference saves a later adapter with the first adapter's bases, sized by the first adapter's layers), new
    bases holding the file's tensors. Anything else is a :class:`ShapeMismatchError`."""
    layers = [layer for layer in _layers(model) if adapter_name in layer.randlora_bases]
    bases = layers[0].randlora_bases[adapter_name]
    same_shape = saved_a.shape == bases.randlora_A.shape and saved_b.shape == bases.randlora_B.shape
    users = {name for layer in _layers(model) for name, b in layer.randlora_bases.items() if b is bases}
    if same_shape and (users == {adapter_name} or (torch.equal(saved_a.to(bases.randlora_A), bases.randlora_A)
                                                   and torch.equal(saved_b.to(bases.randlora_B), bases.randlora_B))):
        with torch.no_grad():
            bases.randlora_A.copy_(saved_a)
            bases.randlora_B.copy_(saved_b)
        return
    r = bases.spec.r
    fits = (saved_a.dim() == 3 and saved_b.dim() == 3 and saved_a.shape[:2] == (r, 1) and saved_b.shape[2] == r
            and all(saved_a.shape[2] >= layer.min_dim and saved_b.shape[0] >= max(layer.in_features, layer.out_features)
                    and saved_b.shape[1] * r >= layer.min_dim for layer in layers))
    if not fits:
        raise ShapeMismatchError(
            f"size mismatch for base_model.randlora_A / randlora_B: checkpoint {tuple(saved_a.shape)} / "
            f"{tuple(saved_b.shape)} vs model {tuple(bases.randlora_A.shape)} / {tuple(bases.randlora_B.shape)}; "
            "the saved bases do not fit the adapter's layers (r / target_modules differ from the saved adapter's)")
    spec = BasisSpec(bases.spec.seed, r, saved_b.shape[0], saved_a.shape[2], bases.spec.sparsity)
    adopted = RandLoraBases.from_tensors(spec, bases.save_projection, saved_a.to(bases.randlora_A),
                                         saved_b.to(bases.randlora_B))
    for layer in layers:
        layer.bind_bases(adapter_name, adopted)


def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, float | None]:
    """For ``peftkit inspect``: ``([m, m], m, strength, None)`` of one layer from its saved tensors (``m =
    min(in, out)`` from ``randlora_gamma: (nb, m)``; the file does not say the larger dimension ``M``). The bases
    have unit variance, so ``E‖ΔW‖_F² = s² M ‖Af‖_F²`` over ``B``; ``strength`` is its root for a square layer
    (``M = m``), with ``Af`` from the saved ``randlora_A`` or, without it, ``E‖Af‖² = Σ lam[k, b]² ‖gamma[b]‖²``."""
    lam, gamma = params["randlora_lambda"].double(), params["randlora_gamma"].double()
    m = gamma.shape[1]
    scaling = float(config.get("randlora_alpha", 640)) / lam.shape[0]
    if "randlora_A" in params:
        sliced = params["randlora_A"].double()[:, 0, :m]
        af_norm2 = float((lam.unsqueeze(-1) * sliced.unsqueeze(1) * gamma.unsqueeze(0)).pow(2).sum())
    else:
        af_norm2 = float((lam.pow(2) @ gamma.pow(2)).sum())
    return [m, m], m, scaling * math.sqrt(m * af_norm2), None


RANDLORA = register_method(
    MethodSpec(
        peft_type=PeftType.RANDLORA,
        prefix="randlora_",
        config_cls=RandLoraConfig,
        tuner_name="RandLoraModel",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=default_lora_targets,
        identity_at_init=True,
        mergeable=True,
        example_configs=({"r": 4, "randlora_alpha": 8},
                         {"r": 3, "randlora_alpha": 6, "sparse": True, "save_projection": False,
                          "randlora_dropout": 0.1}),
        non_identity_kwargs={"init_weights": False},
        supported_kinds=RANDLORA_KINDS,
        layer_cls=RandLoraLayer,
        extra_layers=_bind_bases,
        export_state=_export_state,
        convert_checkpoint=_convert_checkpoint,
        pattern_fields=(),
        update_strength=_update_strength,
    )
)

__all__ = ["RANDLORA", "RandLoraBases", "RandLoraConfig", "RandLoraLayer", "basis_spec", "generate_bases"]
