"""Uni-LoRA layers on ``nn.Linear`` and transformers' GPT-2 ``Conv1D``.

A layer holds, per adapter, the fixed ``unilora_indices_A: (r, in)`` / ``unilora_indices_B: (out, r)`` (int64) into
the model's one trainable vector ``theta_d: (theta_d_length,)`` and the matching ``unilora_scales_A`` /
``unilora_scales_B`` (the adapter's dtype, as ``theta_d``). ``theta_d`` is held once by the tuner (``SharedAdapterTensors``,
attribute ``unilora_theta_d``) and referenced, not registered, here. Forward: ``A = theta_d[idx_A] * scales_A``,
``B = theta_d[idx_B] * scales_B``, ``y = base(x) + (dropout(x) @ A.T) @ B.T``, added into the base output in place
where autograd allows (``ops.lowrank.add_lowrank_``): no dense ``ΔW`` and no output-sized temporary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import MergeError, UnsupportedModuleError
from ...layers.base import AdapterLayer
from ...layers.buffers import BufferDict
from ...layers.dispatch import HF_CONV1D, LINEAR, inplace_safe, module_kind
from ...layers.shared import SharedAdapterTensors
from ...ops.lowrank import add_lowrank_, lowrank_update_reference
from .config import UniLoraConfig
from .indices import assign_indices

#: the module kinds Uni-LoRA wraps (the reference: ``nn.Linear`` and ``Conv1D``; no quantized layers)
UNILORA_KINDS = (LINEAR, HF_CONV1D)
#: the per-layer buffers (saved under these names with ``save_indices``)
INDEX_BUFFERS = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")


class UniLoraLayer(AdapterLayer):
    """Uni-LoRA on a linear layer (``nn.Linear`` or GPT-2 ``Conv1D``, whose weight is stored ``(in, out)``).

    It holds no parameter: its adapter's trainable tensor is the model's shared ``theta_d``
    (:attr:`unilora_theta_d`), reported by :meth:`adapter_parameters` so that trainability and disabling reach it.
    """

    other_param_names = ("r", *INDEX_BUFFERS, "unilora_dropout")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer)
        for name in INDEX_BUFFERS:
            setattr(self, name, BufferDict())
        self.unilora_dropout = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.fan_in_fan_out = fan_in_fan_out
        base = self.get_base_layer()
        if fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        # plain attributes: the tuner's theta_d holder (not registered per layer), and per adapter its dtype and
        # whether checkpoints hold its indices and scales
        vars(self).update(_theta=None, _dtype={}, _save_indices={})

    @property
    def unilora_theta_d(self) -> SharedAdapterTensors | None:
        """The model's shared vectors, ``{adapter_name: (theta_d_length,)}`` (the reference's name)."""
        return vars(self)["_theta"]

    def attach_theta(self, holder: SharedAdapterTensors) -> None:
        """Reference the tuner's ``theta_d`` holder (one tensor per adapter for the whole model)."""
        vars(self)["_theta"] = holder

    def update_layer(self, adapter_name: str, config: UniLoraConfig, dtype: torch.dtype) -> None:
        """Create adapter ``adapter_name``: empty index and scale buffers of the factors' shapes (filled by
        :meth:`set_indices` once every layer of the adapter exists) and its dropout; ``dtype``: the adapter's (of
        ``theta_d`` and the scales: float32 on half-precision bases unless ``autocast_adapter_dtype=False``, as the
        reference)."""
        weight = self.get_base_layer().weight
        shapes = {"A": (config.r, self.in_features), "B": (self.out_features, config.r)}
        for name in INDEX_BUFFERS:
            holder = getattr(self, name)
            holder.persistent = config.save_indices  # in the module's state_dict only when saved, as the reference
            indices = name.startswith("unilora_indices")
            holder[adapter_name] = torch.zeros(shapes[name[-1]], device=weight.device,
                                               dtype=torch.long if indices else dtype)
        p = config.unilora_dropout
        self.unilora_dropout[adapter_name] = nn.Dropout(p=p) if p > 0 else nn.Identity()
        self.r[adapter_name] = config.r
        self._dtype[adapter_name] = dtype
        self._save_indices[adapter_name] = config.save_indices
        self._refresh()

    def set_indices(self, adapter_name: str, indices_A: torch.Tensor, indices_B: torch.Tensor,
                    scales_A: torch.Tensor, scales_B: torch.Tensor) -> None:
        """Store adapter ``adapter_name``'s assignment (``indices_A, scales_A: (r, in)``, ``indices_B, scales_B:
        (out, r)``) into its buffers (the layer's device; scales in the adapter's dtype)."""
        with torch.no_grad():
            for name, value in zip(INDEX_BUFFERS, (indices_A, indices_B, scales_A, scales_B)):
                getattr(self, name)[adapter_name].copy_(value)

    def has_adapter(self, name: str) -> bool:
        """Does this layer hold adapter ``name`` (its index buffers)?"""
        return name in self.unilora_indices_A

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The adapter's shared ``theta_d`` (the only trainable tensor; none when this layer lacks the adapter)."""
        holder = vars(self)["_theta"]
        if holder is None or adapter_name not in holder or not self.has_adapter(adapter_name):
            return []
        return [holder[adapter_name]]

    def adapter_state(self, adapter_name: str) -> dict[str, tuple[str, torch.Tensor]]:
        """With ``save_indices``: the index and scale buffers under the reference's keys (``unilora_indices_A``,
        ...); else nothing (``theta_d`` is saved once, by the tuner's holder)."""
        if not self._save_indices.get(adapter_name, False) or not self.has_adapter(adapter_name):
            return {}
        return {name: (f"{name}.{adapter_name}", getattr(self, name)[adapter_name]) for name in INDEX_BUFFERS}

    def delete_adapter(self, adapter_name: str) -> None:
        """As :meth:`AdapterLayer.delete_adapter`, forgetting the adapter's dtype and ``save_indices`` too."""
        super().delete_adapter(adapter_name)
        self._dtype.pop(adapter_name, None)
        self._save_indices.pop(adapter_name, None)

    # ------------------------------------------------------------------ factors
    def factors(self, adapter_name: str, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A: (r, in), B: (out, r))`` of adapter ``adapter_name``: ``theta_d`` gathered at the indices times the
        scales (differentiable in ``theta_d``; ``dtype``: computed in it)."""
        theta = vars(self)["_theta"][adapter_name]
        scales_A, scales_B = self.unilora_scales_A[adapter_name], self.unilora_scales_B[adapter_name]
        if dtype is not None:
            theta, scales_A, scales_B = theta.to(dtype), scales_A.to(dtype), scales_B.to(dtype)
        A = theta[self.unilora_indices_A[adapter_name]] * scales_A
        B = theta[self.unilora_indices_B[adapter_name]] * scales_B
        return A, B

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``B @ A`` in the base weight's layout (transposed for ``Conv1D``) and dtype; computed in float32 for
        half-precision adapters on CPU (as the reference)."""
        weight = self.get_base_layer().weight
        dtype = vars(self)["_theta"][adapter_name].dtype
        low_cpu = weight.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        A, B = self.factors(adapter_name, torch.float32 if low_cpu else None)
        delta = B @ A
        return (delta.t() if self.fan_in_fan_out else delta).to(weight.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Uni-LoRA's effect is ``W + B A``."""
        return True

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """As :meth:`AdapterLayer.merge`; ``safe_merge`` also refuses a non-finite ``theta_d`` (as the reference),
        even where the bad entry is one no index of this layer uses."""
        if safe_merge:
            self._check_theta(self._adapters_to_merge(adapter_names, warn=False))
        super().merge(safe_merge, adapter_names)

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        """As :meth:`AdapterLayer.check_merge`, plus a non-finite ``theta_d`` (see :meth:`merge`)."""
        self._check_theta(self._adapters_to_merge(adapter_names, warn=False))
        super().check_merge(adapter_names)

    def _check_theta(self, names: list[str]) -> None:
        theta = vars(self)["_theta"]
        for name in names:
            if not bool(torch.isfinite(theta[name]).all()):
                raise MergeError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in) -> (..., out)``: the base output plus ``(dropout(x) @ A.T) @ B.T`` per active adapter."""
        result = self.forward_adding(x, self._add, inplace_safe(self.base_layer), *args, **kwargs)
        return result.to(x.dtype)

    def _add(self, result: torch.Tensor, name: str, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        """``result: (..., out)`` plus adapter ``name``'s update on ``x: (..., in)`` (in place when ``inplace``)."""
        A, B = self.factors(name)
        h = self.unilora_dropout[name](x.to(A.dtype))
        if inplace:
            return add_lowrank_(result, h, A, B, 1.0)
        return lowrank_update_reference(result, h, A, B, 1.0)


def layer_options(name: str, module: nn.Module, config: Any) -> dict[str, Any]:
    """Per-layer facts: the kind and ``fan_in_fan_out`` (True exactly for ``Conv1D``, whatever the config says; the
    planner warns about ``fan_in_fan_out=True`` on ``nn.Linear``)."""
    assert isinstance(config, UniLoraConfig)
    kind = module_kind(module)
    base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
    if kind not in UNILORA_KINDS:
        raise UnsupportedModuleError(
            f"target module {name!r} is a {type(base).__name__}; Uni-LoRA supports torch.nn.Linear and "
            "transformers.pytorch_utils.Conv1D only. Adjust target_modules.")
    return {"kind": kind, "fan_in_fan_out": kind == HF_CONV1D}


def create_layer(module: nn.Module, options: dict[str, Any], config: Any, adapter_name: str,
                 dtype: torch.dtype) -> UniLoraLayer:
    """Wrap ``module`` (or reuse its Uni-LoRA layer) and add adapter ``adapter_name``'s buffers; the tuner's
    ``shared_state`` hook then creates ``theta_d`` and assigns the indices over all the adapter's layers."""
    assert isinstance(config, UniLoraConfig)
    layer = module if isinstance(module, UniLoraLayer) else UniLoraLayer(module, options["fan_in_fan_out"])
    layer.update_layer(adapter_name, config, dtype)
    return layer


def attach_shared_theta(tuner: nn.Module, config: Any, adapter_name: str, layers: list[nn.Module]) -> None:
    """``MethodSpec.shared_state``: create adapter ``adapter_name``'s ``theta_d: (theta_d_length,)`` once, in the
    tuner's ``unilora_theta_d`` holder (the reference's attribute and checkpoint key ``base_model.unilora_theta_d``),
    ``U(-init_theta_d_bound, init_theta_d_bound)`` (``init_weights=False``: ``N(0, 1)``); assign every layer's
    indices and scales from ``proj_seed`` over the adapter's layers in model order (the reference's order), and
    reference the holder from them."""
    assert isinstance(config, UniLoraConfig)
    holder = getattr(tuner, "unilora_theta_d", None)
    if not isinstance(holder, SharedAdapterTensors):
        holder = SharedAdapterTensors()
        tuner.unilora_theta_d = holder
    given = {id(layer) for layer in layers}
    ours = [m for m in tuner.model.modules()  # type: ignore[union-attr]
            if id(m) in given and isinstance(m, UniLoraLayer) and m.has_adapter(adapter_name)]
    first = ours[0] if ours else None
    dtype = first._dtype[adapter_name] if first is not None else torch.float32
    device = first.unilora_indices_A[adapter_name].device if first is not None else torch.device("cpu")
    theta = torch.empty(config.theta_d_length, dtype=dtype)
    if config.init_weights:
        theta.uniform_(-config.init_theta_d_bound, config.init_theta_d_bound)
    else:
        theta.normal_()
    holder[adapter_name] = nn.Parameter(theta.to(device))
    shapes = [((m.r[adapter_name], m.in_features), (m.out_features, m.r[adapter_name])) for m in ours]
    for layer, assigned in zip(ours, assign_indices(shapes, config.theta_d_length, config.proj_seed)):
        layer.set_indices(adapter_name, *assigned)
        layer.attach_theta(holder)
