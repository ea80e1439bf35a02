"""Shared code of the LyCORIS-style methods (LoHa, LoKr): config validation, layer options and the layer base.

A LyCORIS layer builds a dense update ``ΔW`` of the base weight from its factors (``get_delta_weight``) and adds
``F.linear(x, ΔW)`` / ``F.conv{1,2}d(x, ΔW, <base stride/padding/...>)`` to the base output, as the reference does.
In training, ``module_dropout`` skips the whole adapter with that probability and ``rank_dropout`` zeroes output
rows of ``ΔW``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftConfig, as_set, check, is_int, is_number
from ..errors import UnsupportedModuleError
from ..injection.apply import defer_init, skip_random_init
from ..injection.match import pattern_value
from ..layers.base import AdapterLayer
from ..layers.dispatch import CONV, LINEAR, module_kind

#: module kinds a LyCORIS method wraps (nn.Linear, nn.Conv1d, nn.Conv2d), as the reference
LYCORIS_KINDS: tuple[str, ...] = (LINEAR, CONV)


def validate_lycoris_config(config: Any) -> None:
    """Checks shared by ``LoHaConfig`` and ``LoKrConfig``; raises ``ConfigError`` naming the field."""
    config.target_modules = as_set(config.target_modules)
    config.exclude_modules = as_set(config.exclude_modules)
    if config.rank_pattern is None:
        config.rank_pattern = {}
    if config.alpha_pattern is None:
        config.alpha_pattern = {}
    check(is_int(config.r) and config.r >= 1, "r", config.r, "allowed: an int >= 1")
    check(is_number(config.alpha), "alpha", config.alpha, "allowed: a number")
    for name in ("rank_dropout", "module_dropout"):
        value = getattr(config, name)
        check(is_number(value) and 0 <= value <= 1, name, value, f"allowed: a float with 0 <= {name} <= 1")
    check(isinstance(config.use_effective_conv2d, bool), "use_effective_conv2d", config.use_effective_conv2d,
          "allowed: True or False")
    for name in ("target_modules", "exclude_modules"):
        value = getattr(config, name)
        ok = value is None or isinstance(value, str) or (
            isinstance(value, (set, list, tuple)) and all(isinstance(v, str) for v in value))
        check(ok, name, value, "allowed: None, a regex str, 'all-linear' or a list of module names")
    check(config.modules_to_save is None or (not isinstance(config.modules_to_save, str)
                                             and all(isinstance(m, str) for m in config.modules_to_save)),
          "modules_to_save", config.modules_to_save, "allowed: None or a list of module names")
    ltt = config.layers_to_transform
    check(ltt is None or is_int(ltt) or (isinstance(ltt, (list, tuple)) and all(is_int(i) for i in ltt)),
          "layers_to_transform", ltt, "allowed: None, an int or a list of ints")
    check(not (isinstance(config.target_modules, str) and ltt is not None), "layers_to_transform", ltt,
          "layers_to_transform cannot be used when target_modules is a str; use a list of module names")
    # as the reference: an empty layers_pattern ([] or "") means none, and is allowed without layers_to_transform
    check(not (config.layers_pattern and ltt is None), "layers_pattern", config.layers_pattern,
          "layers_pattern is only allowed together with layers_to_transform")
    for key, rank in config.rank_pattern.items():
        check(is_int(rank) and rank >= 1, f"rank_pattern[{key!r}]", rank, "allowed: an int >= 1")
    for key, alpha in config.alpha_pattern.items():
        check(is_number(alpha), f"alpha_pattern[{key!r}]", alpha, "allowed: a number")


def lycoris_create_layer(layer_cls: type[AdapterLayer]):
    """The ``create_layer`` of a LyCORIS method: wrap ``module`` (or reuse its layer) and add the adapter."""

    def create(module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str,
               dtype: torch.dtype) -> AdapterLayer:
        layer = module if isinstance(module, layer_cls) else layer_cls(module)
        layer.update_layer(adapter_name, r=options["r"], alpha=options["alpha"], config=config,  # type: ignore[operator]
                           dtype=dtype)
        return layer

    return create


def lycoris_layer_options(method: str, layer_cls: type[AdapterLayer]):
    """The ``layer_options`` of a LyCORIS method: kind, rank and alpha after the patterns."""

    def options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
        kind = module_kind(module)
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if kind not in LYCORIS_KINDS or (kind == CONV and not isinstance(base, (nn.Conv1d, nn.Conv2d))):
            raise UnsupportedModuleError(
                f"target module {name!r} is a {type(base).__name__}; {method} supports nn.Linear, nn.Conv1d and "
                "nn.Conv2d. Adjust target_modules."
            )
        return {
            "kind": kind,
            "r": pattern_value(config.rank_pattern, name, config.r),  # type: ignore[attr-defined]
            "alpha": pattern_value(config.alpha_pattern, name, config.alpha),  # type: ignore[attr-defined]
        }

    return options


class LycorisLayer(AdapterLayer):
    """Base of LoHa and LoKr layers on ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``.

    Subclasses implement ``update_layer`` and ``_raw_delta(name) -> ΔW / scaling`` (any shape with the base weight's
    number of elements, in the order of the base weight).
    """

    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "rank_dropout_scale", "module_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}
        # as the reference: Linear in/out_features, conv in/out_channels (not divided by groups)
        base = self.get_base_layer()
        self.in_features: int | None = getattr(base, "in_features", getattr(base, "in_channels", None))
        self.out_features: int | None = getattr(base, "out_features", getattr(base, "out_channels", None))
        for attr in self.adapter_layer_names:  # one ParameterDict per factor, keyed by adapter name
            setattr(self, attr, nn.ParameterDict({}))

    def _set_hparams(self, name: str, r: int, alpha: float, config: Any) -> None:
        self.r[name] = r
        self.alpha[name] = alpha
        self.scaling[name] = alpha / r
        self.rank_dropout[name] = config.rank_dropout
        self.rank_dropout_scale[name] = getattr(config, "rank_dropout_scale", True)
        self.module_dropout[name] = config.module_dropout

    def _factory(self) -> tuple[Callable[..., torch.Tensor], bool]:
        """``(empty, deferred)`` for a new adapter's tensors: while a load will fill them (``skip_random_init``:
        inference loads, ``low_cpu_mem_usage``, a load's probe) they are created on the meta device and not
        initialised, so a config's sizes are never allocated before the checkpoint is checked against them."""
        deferred = skip_random_init()
        return (functools.partial(torch.empty, device="meta") if deferred else torch.empty), deferred

    def _finish_update(self, name: str, dtype: torch.dtype | None, deferred: bool = False) -> None:
        """Move the new adapter's tensors to the base weight's device and ``dtype`` (deferred: they stay on meta
        in that dtype, and the load fills them; missing ones become zeros)."""
        weight = self.get_base_layer().weight
        for attr in self.adapter_layer_names:
            holder = getattr(self, attr)
            if name in holder:
                param = holder[name]
                if deferred:
                    holder[name] = nn.Parameter(torch.empty_like(param, device="meta", dtype=dtype or weight.dtype))
                else:
                    holder[name] = nn.Parameter(param.data.to(device=weight.device, dtype=dtype or weight.dtype))
        if deferred:
            defer_init(self.adapter_parameters(name), weight.device)
        self.set_adapter(self._active_adapter or [name])

    def _raw_delta(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _delta(self, name: str, apply_rank_dropout: bool = False) -> torch.Tensor:
        """``ΔW`` of adapter ``name`` in the base weight's shape; rank dropout zeroes output rows (training)."""
        weight = (self._raw_delta(name) * self.scaling[name]).reshape(self.get_base_layer().weight.shape)
        if apply_rank_dropout:
            drop = (torch.rand(weight.size(0)) > self.rank_dropout[name]).to(weight.dtype)
            drop = drop.view(-1, *[1] * (weight.dim() - 1)).to(weight.device)
            if self.rank_dropout_scale[name]:
                drop = drop / drop.mean()
            weight = weight * drop
        return weight

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense ``ΔW`` of ``adapter_name`` (base weight shape ``(out, in)`` or ``(out, in, *kernel)``)."""
        return self._delta(adapter_name)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """On ``nn.Linear`` only, as the reference (its LoHa/LoKr ``Linear`` classes say yes, the conv ones no)."""
        return module_kind(self.get_base_layer()) == LINEAR

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x`` through the base layer's operation with weight ``weight`` and no bias.

        Not named ``_apply``: that would shadow ``nn.Module._apply``, which ``.to()``/``.half()``/``.cuda()`` call.
        ``x: (..., in)`` (Linear) or ``(B, C_in, *spatial)`` (conv); ``weight`` the base weight's shape."""
        base = self.get_base_layer()
        x = x.to(weight.dtype)
        if isinstance(base, nn.Linear):
            return F.linear(x, weight)
        conv = F.conv2d if isinstance(base, nn.Conv2d) else F.conv1d
        return conv(x, weight, stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        previous_dtype = result.dtype
        if self._row_adapters is not None:
            return self.mixed_add(x, result, lambda name, xs: self._apply_weight(xs, self._delta(name)))
        for name in self._forward_adapters:
            keep = None  # module dropout: the whole adapter is skipped with probability module_dropout (training)
            if self.training:
                keep = torch.rand(1) > self.module_dropout[name]  # drawn as the reference does (same RNG stream)
                if not torch.compiler.is_compiling() and not bool(keep):
                    continue
            apply_rank_dropout = self.training and bool(self.rank_dropout[name])
            delta = self._apply_weight(x, self._delta(name, apply_rank_dropout))
            if keep is not None and torch.compiler.is_compiling():  # no data-dependent branch: a 0/1 factor
                delta = delta * keep.to(device=delta.device, dtype=delta.dtype)
            result = result + delta
        return result.to(previous_dtype)
