"""VB-LoRA layers on ``nn.Linear`` and transformers' GPT-2 ``Conv1D``.

Per adapter a layer holds ``vblora_logits_A: (r, in / L, num_vectors)`` and ``vblora_logits_B: (out / L, r,
num_vectors)``; the bank ``(num_vectors, L)`` is held once by the tuner (``SharedAdapterTensors``) and referenced,
not registered, here. Forward: ``y = base(x) + (dropout(x) @ A.T) @ B.T`` with ``A: (r, in)``, ``B: (out, r)``
assembled from the bank (``bank.vblora_factors``), added into the base output in place where autograd allows
(``ops.lowrank.add_lowrank_``), so no dense ``ΔW`` and no output-sized temporary is made.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError, PeftWarning
from ...layers.base import AdapterLayer
from ...layers.dispatch import HF_CONV1D, LINEAR, inplace_safe, require_kind
from ...layers.shared import SharedAdapterTensors
from ...ops.lowrank import add_lowrank_, lowrank_update_reference
from .bank import MASKED_LOGIT, vblora_factors
from .config import VBLoRAConfig

#: the module kinds VB-LoRA wraps (the reference: ``nn.Linear`` and ``Conv1D``; no quantized layers)
VBLORA_KINDS = (LINEAR, HF_CONV1D)


class VBLoRALayer(AdapterLayer):
    """VB-LoRA on a linear layer (``nn.Linear`` or GPT-2 ``Conv1D``, whose weight is stored ``(in, out)``)."""

    adapter_layer_names = ("vblora_logits_A", "vblora_logits_B")
    other_param_names = ("r", "topk", "vblora_dropout")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer)
        self.vblora_logits_A = nn.ParameterDict({})
        self.vblora_logits_B = nn.ParameterDict({})
        self.vblora_dropout = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.topk: dict[str, int] = {}
        self.fan_in_fan_out = fan_in_fan_out
        base = self.get_base_layer()
        if fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        # the tuner's bank holder (set by ``attach_bank``); a plain attribute so the bank is not registered per layer
        vars(self)["_bank"] = None

    @property
    def vblora_vector_bank(self) -> SharedAdapterTensors | None:
        """The model's shared vector banks, ``{adapter_name: (num_vectors, vector_length)}`` (the reference's name)."""
        return vars(self)["_bank"]

    def attach_bank(self, bank: SharedAdapterTensors) -> None:
        """Reference the tuner's bank holder (one tensor per adapter for the whole model)."""
        vars(self)["_bank"] = bank

    def update_layer(self, adapter_name: str, config: VBLoRAConfig, dtype: torch.dtype | None = None) -> None:
        """Create adapter ``adapter_name``: logits ``~ N(0, init_logits_std²)`` (float32 unless ``dtype``)."""
        length, n = config.vector_length, config.num_vectors
        device = self.get_base_layer().weight.device
        logits_A = torch.empty(config.r, self.in_features // length, n, dtype=dtype)
        logits_B = torch.empty(self.out_features // length, config.r, n, dtype=dtype)
        self.vblora_logits_A[adapter_name] = nn.Parameter(logits_A.normal_(0.0, config.init_logits_std).to(device))
        self.vblora_logits_B[adapter_name] = nn.Parameter(logits_B.normal_(0.0, config.init_logits_std).to(device))
        p = config.vblora_dropout
        self.vblora_dropout[adapter_name] = nn.Dropout(p=p) if p > 0 else nn.Identity()
        self.r[adapter_name] = config.r
        self.topk[adapter_name] = config.topk
        self._refresh()

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The adapter's logits here and its shared bank (so trainability and disabling reach the bank too)."""
        params = super().adapter_parameters(adapter_name)
        bank = vars(self)["_bank"]
        if bank is not None and adapter_name in bank:
            params.append(bank[adapter_name])
        return params

    # ------------------------------------------------------------------ factors
    def factors(self, adapter_name: str, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A: (r, in), B: (out, r))`` of adapter ``adapter_name`` (differentiable; ``dtype``: computed in it).

        Training on logits restored from a ``save_only_topk_weights`` file (``MASKED_LOGIT`` or ``-inf`` outside
        the top-k) raises ``RuntimeError``, as the reference does."""
        logits_A, logits_B = self.vblora_logits_A[adapter_name], self.vblora_logits_B[adapter_name]
        bank = vars(self)["_bank"][adapter_name]
        if self.training and not torch.compiler.is_compiling() and bool((logits_A[0, 0] <= MASKED_LOGIT).any()):
            raise RuntimeError("Found infinity values in VB-LoRA logits. Ensure training was not resumed from a "
                               "`save_only_topk_weights` model.")
        if dtype is not None:
            logits_A, logits_B, bank = logits_A.to(dtype), logits_B.to(dtype), bank.to(dtype)
        return vblora_factors(logits_A, logits_B, bank.to(logits_A.device), self.topk[adapter_name])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``B @ A`` in the base weight's layout (transposed for ``Conv1D``) and dtype; computed in float32 for
        half-precision adapters on CPU."""
        weight = self.get_base_layer().weight
        dtype = self.vblora_logits_A[adapter_name].dtype
        low_cpu = weight.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        A, B = self.factors(adapter_name, torch.float32 if low_cpu else None)
        delta = B @ A
        return (delta.t() if self.fan_in_fan_out else delta).to(weight.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """VB-LoRA's effect is ``W + B A``."""
        return True

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in) -> (..., out)``: the base output plus ``(dropout(x) @ A.T) @ B.T`` per active adapter."""
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self._row_adapters is not None:
            return self.mixed_add(x, result, self._delta)
        inplace = inplace_safe(self.base_layer) and len(self._forward_adapters) == 1
        for name in self._forward_adapters:
            A, B = self.factors(name)
            h = self.vblora_dropout[name](x.to(A.dtype))
            if inplace:
                result = add_lowrank_(result, h, A, B, 1.0)
            else:
                result = lowrank_update_reference(result, h, A, B, 1.0)
        return result.to(x.dtype)

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Adapter ``name``'s update ``(dropout(x) @ A.T) @ B.T`` on ``x: (..., in)`` alone (mixed batches)."""
        A, B = self.factors(name)
        h = self.vblora_dropout[name](x.to(A.dtype))
        return nn.functional.linear(nn.functional.linear(h, A), B)


def layer_options(name: str, module: nn.Module, config: Any) -> dict[str, Any]:
    """Per-layer facts: the kind and ``fan_in_fan_out`` (True for ``Conv1D``), after checking that the layer is
    linear with ``in`` and ``out`` divisible by ``vector_length``."""
    assert isinstance(config, VBLoRAConfig)
    kind = require_kind(name, module, VBLORA_KINDS, "VB-LoRA")
    base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
    in_f, out_f = base.weight.shape if kind == HF_CONV1D else (base.in_features, base.out_features)
    for label, size in (("in_features", in_f), ("out_features", out_f)):
        if size % config.vector_length:
            raise ConfigError("vector_length", config.vector_length,
                              f"allowed: a divisor of {label} ({size}) of target module {name!r}")
    if config.fan_in_fan_out != (kind == HF_CONV1D):
        warnings.warn(f"fan_in_fan_out={config.fan_in_fan_out} does not fit target module {name!r} "
                      f"({type(base).__name__}); VB-LoRA uses fan_in_fan_out={kind == HF_CONV1D} there.",
                      PeftWarning, stacklevel=6)
    return {"kind": kind, "fan_in_fan_out": kind == HF_CONV1D}


def create_layer(module: nn.Module, options: dict[str, Any], config: Any, adapter_name: str,
                 dtype: torch.dtype) -> VBLoRALayer:
    """Wrap ``module`` (or reuse its VB-LoRA layer) and add adapter ``adapter_name``'s logits; the tuner's
    ``shared_state`` hook then hands the layer the bank."""
    assert isinstance(config, VBLoRAConfig)
    layer = module if isinstance(module, VBLoRALayer) else VBLoRALayer(module, options["fan_in_fan_out"])
    layer.update_layer(adapter_name, config, dtype)
    return layer


def attach_shared_bank(tuner: nn.Module, config: Any, adapter_name: str, layers: list[nn.Module]) -> None:
    """``MethodSpec.shared_state``: create adapter ``adapter_name``'s bank ``U(-bound, bound)`` of shape
    ``(num_vectors, vector_length)`` once, in the tuner's ``vblora_vector_bank`` holder (the reference's attribute
    and checkpoint key ``base_model.vblora_vector_bank``), and reference the holder from ``layers``."""
    assert isinstance(config, VBLoRAConfig)
    holder = getattr(tuner, "vblora_vector_bank", None)
    if not isinstance(holder, SharedAdapterTensors):
        holder = SharedAdapterTensors()
        tuner.vblora_vector_bank = holder
    ours = [layer for layer in layers if isinstance(layer, VBLoRALayer) and layer.has_adapter(adapter_name)]
    first = ours[0].vblora_logits_A[adapter_name] if ours else torch.empty(0)
    bound = config.init_vector_bank_bound
    bank = torch.empty(config.num_vectors, config.vector_length, dtype=first.dtype)
    holder[adapter_name] = nn.Parameter(bank.uniform_(-bound, bound).to(first.device))
    for layer in ours:
        layer.attach_bank(holder)
