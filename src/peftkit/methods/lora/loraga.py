"""LoRA-GA: LoRA initialised from the gradient (``init_lora_weights="lora_ga"``, https://arxiv.org/abs/2407.05000).

Two steps, as the reference's ``peft.tuners.lora.loraga``:

1. :func:`preprocess_loraga` runs the user's training steps with gradients enabled on the targeted ``nn.Linear`` /
   ``Conv1D`` weights only, and attaches the mean gradient ``G: (out, in)`` (the weight's layout) to each module as
   ``module._peft_loraga_grad`` (the reference's attribute, so a model preprocessed by either library initialises in
   either).
2. ``get_peft_model`` with ``init_lora_weights="lora_ga"`` takes the top ``2r`` singular triplets of ``G``, gives
   ``r`` right singular vectors to ``A`` and ``r`` left ones (times their singular values) to ``B`` as
   ``LoraGAConfig.direction`` says, rescales them (``scale``), and replaces the base weight by ``W - s * B @ A``, so
   the model's output is unchanged at init. Without a gradient (loading a saved adapter) it falls back to the
   default init and leaves the base weight alone, as the reference.

Memory: one ``(out, in)`` gradient per targeted layer (the size of those weights), no gradient for any other
parameter; activations live only inside each training step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ...config import as_subconfig
from ...errors import ConfigError, ConfigTypeError, UnsupportedModuleError
from ...ops.datainit import LORAGA_DIRECTIONS, LORAGA_SCALES, loraga_factors
from .corda import _check_keys, _load, _progress, _save, call_with_progress

if TYPE_CHECKING:
    from .config import LoraConfig

#: the attribute holding a layer's mean gradient (the reference's name)
GRAD_ATTR = "_peft_loraga_grad"


@dataclass
class LoraGAConfig:
    """The reference's ``LoraGAConfig`` (``LoraConfig(lora_ga_config=...)``; saved as a dict).

    Args:
        direction: which gradient singular vectors go to A and B: ``"ArBr"`` (A odd, B even of the top 2r),
            ``"A2rBr"`` (A ``[r, 2r)``, B ``[0, r)``), ``"ArB2r"`` (A ``[0, r)``, B ``[r, 2r)``, the default) or
            ``"random"``.
        scale: ``"stable"`` (``B *= out^(1/4) / sqrt(stable_gamma)``), ``"weight_svd"`` (B's largest singular value
            matched to the weight's), ``"gd_scale"`` (``A, B /= scaling``) or ``"unit"`` (none).
        stable_gamma: the gamma of ``"stable"`` scaling (> 0).
    """

    direction: Literal["ArBr", "A2rBr", "ArB2r", "random"] = "ArB2r"
    scale: Literal["stable", "weight_svd", "gd_scale", "unit"] = "stable"
    stable_gamma: int = 16

    def __post_init__(self) -> None:
        if self.direction not in LORAGA_DIRECTIONS:
            raise ConfigError("lora_ga_config.direction", self.direction, f"allowed: {list(LORAGA_DIRECTIONS)}")
        if self.scale not in LORAGA_SCALES:
            raise ConfigError("lora_ga_config.scale", self.scale, f"allowed: {list(LORAGA_SCALES)}")
        gamma = self.stable_gamma
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
            raise ConfigTypeError("lora_ga_config.stable_gamma", gamma, "allowed: a number > 0")
        if gamma <= 0:
            raise ConfigError("lora_ga_config.stable_gamma", gamma, "allowed: a number > 0")


def as_lora_ga_config(value: object) -> LoraGAConfig | None:
    """``LoraConfig.lora_ga_config`` as a :class:`LoraGAConfig`: a dict (a loaded ``adapter_config.json``) is
    converted, None and instances pass through."""
    return as_subconfig("lora_ga_config", value, LoraGAConfig)


@dataclass(frozen=True)
class LoraGAInit:
    """``init_lora_weights="lora_ga"`` resolved with its ``lora_ga_config`` (None: not given), as layers get it."""

    config: LoraGAConfig | None


def _targets(model: nn.Module, lora_config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The layers ``get_peft_model`` will adapt, refusing quantized ones (LoRA-GA needs full-precision gradients)."""
    from ...injection.plan import plan_injection
    from ...layers.dispatch import HF_CONV1D, LINEAR, QUANT_LINEAR
    from ...registry import get_method

    plan = plan_injection(model, lora_config, "default", get_method("LORA"))
    modules = dict(model.named_modules())
    quantized = [layer.name for layer in plan.layers if layer.options.get("kind") == QUANT_LINEAR
                 or hasattr(getattr(modules[layer.name], "weight", None), "quant_state")]
    if quantized:
        raise UnsupportedModuleError(f"LoRA-GA needs full-precision gradients; the targeted layers {quantized[:5]} "
                                     "are quantized. Preprocess and initialise on the unquantized model")
    return [(layer.name, modules[layer.name]) for layer in plan.layers
            if layer.options.get("kind") in (LINEAR, HF_CONV1D)]


def preprocess_loraga(
    model: nn.Module,
    lora_config: LoraConfig,
    train_step: Callable[[], None] | Iterable[Any],
    cache_file: str | os.PathLike[str] | None = None,
) -> None:
    """Attach the mean gradient of every layer ``get_peft_model(model, lora_config)`` will adapt (the reference's
    ``preprocess_loraga``; call it before ``get_peft_model`` with the same config).

    Args:
        model: the model to adapt.
        lora_config: a ``LoraConfig`` with ``init_lora_weights="lora_ga"`` and a ``lora_ga_config``.
        train_step: a callable running forward and backward passes over some training batches (the reference's
            API), or an iterable of batches (dicts of keyword arguments returning an output with ``.loss``),
            streamed with a progress bar, one backward pass per batch.
        cache_file: a ``torch.save`` file of the gradients (``{"<module>._peft_loraga_grad": ...}``, the reference's
            format): read instead of running ``train_step`` when it exists, written afterwards otherwise.

    Each layer's gradient is summed over the backward passes and divided by their number (counted per call of the
    layer whose output received a gradient, as the reference's backward hook). Cost: the training steps' forward
    and backward passes with only the targeted weights requiring gradients, and one ``(out, in)`` gradient per
    targeted layer (kept until ``get_peft_model`` consumes it). The model's ``requires_grad`` flags and
    train/eval mode are restored.

    Raises:
        ConfigError: ``init_lora_weights`` is not ``"lora_ga"`` or ``lora_ga_config`` is None.
        UnsupportedModuleError: a targeted layer is quantized.
    """
    if lora_config.lora_ga_config is None or lora_config.init_lora_weights != "lora_ga":
        field = "lora_ga_config" if lora_config.init_lora_weights == "lora_ga" else "init_lora_weights"
        raise ConfigError(field, getattr(lora_config, field), "LoRA-GA needs LoraConfig(init_lora_weights="
                          "'lora_ga', lora_ga_config=LoraGAConfig(...))")
    targets = _targets(model, lora_config)
    if not targets:
        raise ConfigError("target_modules", lora_config.target_modules, "LoRA-GA adapts nn.Linear and Conv1D "
                          "layers; target at least one")
    cache = _load(cache_file, model)
    if cache is None:
        cache = {f"{name}.{GRAD_ATTR}": grad for name, grad in estimate_gradients(model, targets, train_step).items()}
        _save(cache_file, cache)
    else:
        _check_keys("cache_file", cache_file, cache, [f"{name}.{GRAD_ATTR}" for name, _ in targets])
    for name, module in targets:
        setattr(module, GRAD_ATTR, cache[f"{name}.{GRAD_ATTR}"])


def estimate_gradients(model: nn.Module, targets: list[tuple[str, nn.Module]],
                       train_step: Callable[[], None] | Iterable[Any]) -> dict[str, torch.Tensor]:
    """``{name: mean gradient of the module's weight}`` over the backward passes ``train_step`` runs, with only
    those weights requiring gradients (the model's flags, gradients and mode are restored)."""
    counts = dict.fromkeys((name for name, _ in targets), 0)

    def counter(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda grad: counts.__setitem__(name, counts[name] + 1))
        return hook

    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    saved_grads = {name: module.weight.grad for name, module in targets}
    was_training = model.training
    handles = [module.register_forward_hook(counter(name)) for name, module in targets]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for _, module in targets:
            module.weight.grad = None
            module.weight.requires_grad_(True)
        model.train()
        with torch.enable_grad():
            _run_steps(model, train_step)
        return {name: module.weight.grad.detach() / counts[name] for name, module in targets
                if counts[name] > 0 and module.weight.grad is not None}
    finally:
        for handle in handles:
            handle.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        for name, module in targets:
            module.weight.grad = saved_grads[name]
        model.train(was_training)


def _run_steps(model: nn.Module, train_step: Callable[[], None] | Iterable[Any]) -> None:
    """Call ``train_step``, or run forward and ``loss.backward()`` on each of its batches under a progress bar."""
    if callable(train_step):
        call_with_progress(model, train_step, False, "LoRA-GA gradients")
        return
    total = len(train_step) if hasattr(train_step, "__len__") else None  # type: ignore[arg-type]
    for batch in _progress(train_step, False, "LoRA-GA gradients", total):
        output = model(**batch) if isinstance(batch, dict) else model(*batch)
        output.loss.backward()


def lora_ga_init(source: nn.Module, weight: torch.Tensor, r: int, scaling: float, options: object
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A: (r, in), B: (out, r), residual: (out, in))`` from the gradient :func:`preprocess_loraga` attached to the
    base layer ``source`` (consumed), with ``weight: (out, in)`` its float32 weight and ``options`` a
    :class:`LoraGAInit`. A and B are rounded to the base weight's dtype before the residual is computed, as the
    reference. Without a gradient: the default init (kaiming A, zero B) and the weight unchanged.

    Raises:
        ConfigError: a gradient is attached but the config has no ``lora_ga_config``, or its shape is not the
            layer's weight's.
    """
    from ...layers.dispatch import HF_CONV1D, module_kind

    grad = getattr(source, GRAD_ATTR, None)
    if grad is None:
        A = torch.empty(r, weight.shape[1], device=weight.device)
        nn.init.kaiming_uniform_(A, a=5**0.5)
        return A, weight.new_zeros(weight.shape[0], r), weight
    config = options.config if isinstance(options, LoraGAInit) else None
    if config is None:
        raise ConfigError("lora_ga_config", None, "init_lora_weights='lora_ga' needs lora_ga_config=LoraGAConfig(...)")
    grad = grad.to(weight.device, torch.float32)
    stored = source.weight
    if grad.shape != stored.shape:
        raise ConfigError("lora_ga_config", config, f"the LoRA-GA gradient has shape {tuple(grad.shape)}, the layer's "
                          f"weight {tuple(stored.shape)}: preprocess the same model as get_peft_model adapts")
    grad_out_in = grad.t() if module_kind(source) == HF_CONV1D else grad  # Conv1D stores (in, out)
    # "stable" scaling uses the stored weight's first dimension, as the reference (in_features for Conv1D)
    A, B = loraga_factors(grad_out_in, weight, r, scaling, config.direction, config.scale, config.stable_gamma,
                          out_features=stored.shape[0])
    dtype = stored.dtype
    A, B = A.to(dtype).float(), B.to(dtype).float()
    delattr(source, GRAD_ATTR)
    return A, B, weight - scaling * B @ A
