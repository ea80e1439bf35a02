"""MiSS layers on ``nn.Linear`` (and quantized linears): three variants chosen per adapter by ``init_weights``.

Base weight ``W: (out, in)``, ``x: (..., in)``:

- ``"miss"`` (``init_weights`` True/False): ``miss_block B: (r, out)``; ``ΔW[o, j] = B[j mod r, o]``, so
  ``y = base(x) + (Σ_k x[..., k r:(k+1) r]) @ B`` (the last shard zero-padded): O(rows · (in + r · out)), no
  dense ``ΔW``.
- ``"mini"``: ``B: (r, mini_r)``, used as ``B.repeat(1, out / mini_r)`` in the formula above.
- ``"bat"``: ``B: (out/r, r, r)``; every ``r×r`` block ``W_ij`` (row block ``i``, column block ``j``) becomes
  ``W_ij (I + B_i) + B_i``. The weight depends on ``W``, so the forward builds ``W + ΔW`` (one batched product
  over a view of ``W``, no copy of it) and runs one linear.

Several active adapters compose in order, each transforming the weight the previous ones left (``"miss"``/``"mini"``
add a constant; ``"bat"`` reads the weight): additive-only stacks add their products to the base output; a stack
with a ``"bat"`` adapter builds the composed weight. Merging applies the same transforms in the same order, and
unmerging inverts them (``"bat"``: ``W_ij = (W'_ij - B_i)(I + B_i)⁻¹``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...injection.apply import defer_init, skip_random_init
from ...layers.base import AdapterLayer
from ...layers.dispatch import inplace_safe
from ...layers.transform_merge import check_transforms, merge_transforms, unmerge_transforms
from ...ops.lowrank import can_update_inplace
from ...quantization import backend_of, dense_weight
from .blocks import bat_weight, shard_sum, shared_delta
from .fastpath import can_use, shared_block_linear

MISS, BAT, MINI = "miss", "bat", "mini"


def mode_of(init_weights: bool | str) -> str:
    """The variant an ``init_weights`` value selects."""
    return init_weights if init_weights in (BAT, MINI) else MISS  # type: ignore[return-value]


class MissLayer(AdapterLayer):
    """MiSS adapters on a linear layer; ``miss_block[name]`` is saved as ``miss_block`` (reference key and shapes:
    ``(r, out)``, ``(out/r, r, r)`` for ``"bat"``, ``(r, mini_r)`` for ``"mini"``)."""

    adapter_layer_names = ("miss_block",)
    other_param_names = ("miss_r", "miss_dropout", "miss_mini_r", "miss_mode")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.miss_block = nn.ParameterDict({})
        self.miss_dropout = nn.ModuleDict({})
        self.miss_r: dict[str, int] = {}
        self.miss_mini_r: dict[str, int] = {}
        self.miss_mode: dict[str, str] = {}  # per adapter (the reference keeps the first adapter's for the layer)
        base = self.get_base_layer()
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        backend = backend_of(base)
        self.quantization_backend = None if backend is None else backend.name

    def update_layer(self, adapter_name: str, r: int, mini_r: int, init_weights: bool | str, dropout: float,
                     dtype: torch.dtype | None = None) -> None:
        """Create adapter ``adapter_name`` (zeros for ``init_weights`` True / ``"bat"`` / ``"mini"``: identity;
        Kaiming-uniform ``(r, out)`` for False)."""
        mode = mode_of(init_weights)
        self.miss_r[adapter_name] = r
        self.miss_mini_r[adapter_name] = mini_r
        self.miss_mode[adapter_name] = mode
        self.miss_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        shape = {MISS: (r, self.out_features), BAT: (self.out_features // r, r, r), MINI: (r, mini_r)}[mode]
        weight = self.get_base_layer().weight
        dtype = dtype or (weight.dtype if weight.dtype.is_floating_point else torch.float32)
        if skip_random_init():  # a load fills it: never allocate or draw it
            self.miss_block[adapter_name] = nn.Parameter(torch.empty(shape, device="meta", dtype=dtype))
            defer_init([self.miss_block[adapter_name]], weight.device)
        else:
            block = torch.zeros(shape)
            if init_weights is False:
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))
            self.miss_block[adapter_name] = nn.Parameter(block.to(device=weight.device, dtype=dtype))
        self.set_adapter(self._active_adapter or [adapter_name])

    # ------------------------------------------------------------------ the update
    def _shared_block(self, name: str) -> torch.Tensor:
        """``(r, out)``: the ``"miss"`` block, or the ``"mini"`` block repeated ``out / mini_r`` times."""
        block = self.miss_block[name]
        if self.miss_mode[name] == MINI:
            block = block.repeat(1, self.out_features // self.miss_mini_r[name])
        return block

    def _transform(self, weight: torch.Tensor, name: str, sign: int = 1) -> torch.Tensor:
        """``weight`` (``(out, in)``) after adapter ``name`` (``sign=-1``: before it), in the block's dtype."""
        if self.miss_mode[name] == BAT:
            return bat_weight(weight, self.miss_block[name], sign)
        block = self._shared_block(name)
        return weight.to(block.dtype) + sign * shared_delta(block, self.in_features, self.out_features)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Additive form of merging ``adapter_name`` into the current base weight: ``(out, in)``, the weight's dtype
        (float32 on quantized layers)."""
        weight = dense_weight(self.get_base_layer()).detach()
        return (self._transform(weight, adapter_name) - weight.to(self.miss_block[adapter_name].dtype)).to(
            weight.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """True, as the reference: the effect is ``W + get_delta_weight`` on a 2-d weight."""
        return True

    # ------------------------------------------------------------------ merging
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Apply each adapter's transform to the base weight, in order."""
        merge_transforms(self, self._adapters_to_merge(adapter_names),
                         lambda name, w: self._transform(w, name), safe_merge)

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        """Raise :class:`MergeError` if merging ``adapter_names`` would put NaN/inf into the base weight."""
        check_transforms(self, self._adapters_to_merge(adapter_names, warn=False),
                         lambda name, w: self._transform(w, name), chain=True)

    def unmerge(self) -> None:
        """Invert the merged transforms, last first."""
        unmerge_transforms(self, lambda name, w: self._transform(w, name, sign=-1))

    # ------------------------------------------------------------------ forward
    def _add_shared(self, result: torch.Tensor, x: torch.Tensor, name: str, inplace: bool) -> torch.Tensor:
        """``result + shard_sum(dropout(x)) @ B`` (in place when allowed and autograd is off)."""
        block = self._shared_block(name)
        s = shard_sum(self.miss_dropout[name](x.to(block.dtype)), self.miss_r[name])  # (..., r)
        if result.dtype != block.dtype:
            return result + (s @ block).to(result.dtype)
        flat = result.reshape(-1, result.shape[-1])
        if inplace and not torch.is_grad_enabled() and can_update_inplace(result, block):
            flat.addmm_(s.reshape(-1, s.shape[-1]), block)  # inference: no extra (N, out) tensor
            return result
        # with autograd, an in-place update of a view of ``result`` makes backward copy and zero-fill the gradient
        # (CopySlices), ~15% of this layer's step; one fused out-of-place addmm is cheaper
        return torch.addmm(flat, s.reshape(-1, s.shape[-1]), block).view(result.shape)

    def _adapted(self, x: torch.Tensor, names: tuple[str, ...] | list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The layer's output with adapters ``names`` applied in order."""
        base = self.get_base_layer()
        if any(self.miss_mode[n] == BAT for n in names):  # the weight itself changes: compose it, one linear
            # backend resolved at construction: dense_weight's backend lookup would break a compiled graph
            weight = base.weight if self.quantization_backend is None else dense_weight(base)
            for name in names:
                weight = self._transform(weight, name)
            bias = None if base.bias is None else base.bias.to(weight.dtype)
            return F.linear(x.to(weight.dtype), weight, bias)
        plain = inplace_safe(base) and type(base) is nn.Linear
        if len(names) == 1 and plain and not args and not kwargs:
            block = self._shared_block(names[0])
            dropout = not isinstance(self.miss_dropout[names[0]], nn.Identity)
            if can_use(x, base.weight, block, plain, dropout):  # training: one autograd function (fastpath.py)
                return shared_block_linear(x, base.weight, base.bias, block)
        result = self.base_layer(x, *args, **kwargs)
        inplace = inplace_safe(base) and not torch.compiler.is_compiling()
        for name in names:
            result = self._add_shared(result, x, name, inplace)
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in) -> (..., out)`` in ``x``'s dtype."""
        return self.forward_replacing(x, self._adapted, *args, **kwargs)
