"""LoRA adapter layers for ``nn.Linear`` (and GPT-2 ``Conv1D``), ``nn.Embedding`` and ``nn.Conv1d/2d/3d``.

Per adapter ``a``: ``lora_A[a]`` maps ``in -> r``, ``lora_B[a]`` maps ``r -> out``, and the layer computes
``base(x) + scaling[a] * lora_B[a](lora_A[a](dropout[a](x)))`` with ``scaling = lora_alpha / r``
(``lora_alpha / sqrt(r)`` under rsLoRA). Embeddings keep ``lora_embedding_A[a]: (r, num_embeddings)`` and
``lora_embedding_B[a]: (dim, r)`` as bare parameters, as the reference does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...layers.base import AdapterLayer
from ...layers.dispatch import inplace_safe
from ...ops.batched import add_mixed_lowrank_, mixed_embedding_hidden, stack_adapters
from ...ops.lowrank import add_lowrank_, add_scaled_, can_update_inplace, lowrank_update_reference
from .init import init_conv_or_linear_, init_embedding_


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoraLayer(AdapterLayer):
    """State shared by every LoRA layer: ranks, alphas, scalings and dropout per adapter."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict({})
        self.lora_A = nn.ModuleDict({})
        self.lora_B = nn.ModuleDict({})
        self.lora_embedding_A = nn.ParameterDict({})
        self.lora_embedding_B = nn.ParameterDict({})
        self.fan_in_fan_out = fan_in_fan_out
        self._inplace = inplace_safe(self.get_base_layer())
        weight = self.get_base_layer().weight
        shape = tuple(weight.shape)
        self.in_features, self.out_features = _features(self.get_base_layer(), shape, fan_in_fan_out)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        lora_bias: bool = False,
        dtype: torch.dtype | None = None,
        **_: Any,
    ) -> None:
        """Create adapter ``adapter_name`` with rank ``r`` on the base weight's device, in ``dtype``."""
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = use_rslora
        self.lora_bias[adapter_name] = lora_bias
        self.scaling[adapter_name] = lora_scaling(r, lora_alpha, use_rslora)
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        weight = self.get_base_layer().weight
        factory = {"device": weight.device, "dtype": dtype or weight.dtype}
        self._create(adapter_name, r, lora_bias, factory)
        self._init(adapter_name, init_lora_weights)
        self._refresh()

    def _create(self, adapter_name: str, r: int, lora_bias: bool, factory: dict[str, Any]) -> None:
        raise NotImplementedError

    def _init(self, adapter_name: str, mode: bool | str) -> None:
        init_conv_or_linear_(self.lora_A[adapter_name], self.lora_B[adapter_name], mode, self.r[adapter_name])

    # ------------------------------------------------------------------ scale helpers (reference API)
    def set_scale(self, adapter: str, scale: float) -> None:
        """``scaling[adapter] = scale * lora_alpha / r`` (rsLoRA: ``/ sqrt(r)``)."""
        if adapter in self.scaling:
            self.scaling[adapter] = scale * lora_scaling(self.r[adapter], self.lora_alpha[adapter],
                                                         self.use_rslora[adapter])

    def scale_layer(self, scale: float) -> None:
        """Multiply the scaling of every active adapter by ``scale``."""
        for name in self._forward_adapters:
            self.scaling[name] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        """Undo :meth:`scale_layer` (``scale=None`` resets to ``lora_alpha / r``)."""
        for name in self._forward_adapters:
            if scale is None:
                self.set_scale(name, 1.0)
            else:
                self.scaling[name] /= scale

    def _delta_product(self, adapter_name: str) -> torch.Tensor:
        """``scaling * B @ A`` as ``(out, in)`` in float32 when the weights are half precision on CPU."""
        A = self.lora_A[adapter_name].weight
        B = self.lora_B[adapter_name].weight
        cast = A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16)
        if cast:
            A, B = A.float(), B.float()
        return (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)) * self.scaling[adapter_name]

    def _stacks(self, names: tuple[str, ...], As: list[torch.Tensor], Bs: list[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked (zero-padded, B pre-scaled) weights of ``names`` for a mixed batch, cached across calls (e.g.
        the decoding steps of ``generate``) until a weight or a scaling changes."""
        scalings = [self.scaling[n] for n in names]
        if torch.is_grad_enabled() and any(t.requires_grad for t in (*As, *Bs)):
            return stack_adapters(As, Bs, scalings)  # differentiable: never reuse a graph across calls
        key = (names, tuple((id(t), t._version) for t in (*As, *Bs)),
               tuple(s if not isinstance(s, torch.Tensor) else (id(s), s._version) for s in scalings))
        return self.cached_stacks(key, lambda: stack_adapters(As, Bs, scalings))

    def get_delta_bias(self, adapter_name: str) -> torch.Tensor | None:
        bias = self.lora_B[adapter_name].bias if adapter_name in self.lora_B else None
        return None if bias is None else bias * self.scaling[adapter_name]


class Linear(LoraLayer):
    """LoRA on ``nn.Linear``; with ``fan_in_fan_out=True`` on GPT-2 ``Conv1D`` (weight ``(in, out)``)."""

    def _create(self, adapter_name: str, r: int, lora_bias: bool, factory: dict[str, Any]) -> None:
        self.lora_A[adapter_name] = _empty(nn.Linear, self.in_features, r, bias=False, **factory)
        self.lora_B[adapter_name] = _empty(nn.Linear, r, self.out_features, bias=lora_bias, **factory)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling * B @ A``, shape ``(out, in)`` (``(in, out)`` for ``Conv1D``), in the base weight's dtype."""
        delta = self._delta_product(adapter_name)
        delta = delta.t() if self.fan_in_fan_out else delta
        return delta.to(self.get_base_layer().weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in) -> (..., out)``."""
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        if self._row_adapters is not None:
            return self._mixed_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self._forward_adapters:
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            dropped = self.lora_dropout[name](x)
            update = add_lowrank_ if self._inplace else lowrank_update_reference
            result = update(result, dropped, lora_A.weight, lora_B.weight, self.scaling[name], lora_B.bias)
        return result


    def _mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Mixed batch: row ``b`` gets the update of its own adapter (``x: (N, *, in)``)."""
        result = self.base_layer(x, *args, **kwargs)
        plan = self.row_plan(x.shape[0])
        if not plan.present:
            return result
        As = [self.lora_A[n].weight for n in plan.present]
        Bs = [self.lora_B[n].weight for n in plan.present]
        A_stack, B_stack = self._stacks(plan.present, As, Bs)
        work = _writable(result, A_stack.dtype, self._inplace)
        add_mixed_lowrank_(work, x, plan.index, plan.runs, A_stack, B_stack, plan.rows_are_slots)
        biases = [self.lora_B[n].bias for n in plan.present]
        if any(b is not None for b in biases):
            rows = torch.stack([_bias_or_zeros(b, work) * self.scaling[n] for b, n in zip(biases, plan.present)]
                               + [work.new_zeros(work.shape[-1])])
            slots = torch.where(plan.index < 0, len(plan.present), plan.index)
            work.view(work.shape[0], -1, work.shape[-1]).add_(rows[slots].unsqueeze(1))
        return work.to(result.dtype)


class Embedding(LoraLayer):
    """LoRA on ``nn.Embedding``: ``A: (r, num_embeddings)`` starts at 0, ``B: (dim, r)`` ~ N(0, 1)."""

    def _create(self, adapter_name: str, r: int, lora_bias: bool, factory: dict[str, Any]) -> None:
        if lora_bias:
            raise NotImplementedError("lora_bias=True is not supported for embedding layers")
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r, **factory))

    def _init(self, adapter_name: str, mode: bool | str) -> None:
        init_embedding_(self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name], mode)

    def _delta_product(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        if A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16):
            A, B = A.float(), B.float()
        return (B @ A) * self.scaling[adapter_name]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``(scaling * B @ A).T``, shape ``(num_embeddings, dim)``."""
        return self._delta_product(adapter_name).t().to(self.get_base_layer().weight.dtype)

    def get_delta_bias(self, adapter_name: str) -> torch.Tensor | None:
        return None

    def _embed(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.embedding(x, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (...) int -> (..., dim)``; the update is multiplied by the base's ``embed_scale`` when it has one."""
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        if self._row_adapters is not None:
            return self._mixed_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        embed_scale = getattr(self.get_base_layer(), "embed_scale", None)
        for name in self._forward_adapters:
            A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
            hidden = self._embed(x, A.t())  # (..., r)
            scaling = self.scaling[name]
            if embed_scale is not None:
                hidden = hidden * embed_scale.to(hidden.dtype) if torch.is_tensor(embed_scale) else hidden * embed_scale
            if self._inplace and can_update_inplace(result, B):
                hidden = hidden * scaling if isinstance(scaling, torch.Tensor) else hidden
                alpha = 1.0 if isinstance(scaling, torch.Tensor) else scaling
                result.view(-1, result.shape[-1]).addmm_(hidden.reshape(-1, hidden.shape[-1]), B.t(), alpha=alpha)
            else:
                result = (result + (hidden @ B.t()) * scaling).to(result.dtype)
        return result


    def _mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Mixed batch: one embedding lookup over the stacked rank-space tables, then one batched matmul."""
        result = self.base_layer(x, *args, **kwargs)
        plan = self.row_plan(x.shape[0])
        if not plan.present:
            return result
        As = [self.lora_embedding_A[n] for n in plan.present]
        Bs = [self.lora_embedding_B[n] for n in plan.present]
        A_stack, B_stack = self._stacks(plan.present, As, Bs)
        hidden = mixed_embedding_hidden(x, plan.index, A_stack.transpose(1, 2))  # (N, *, R)
        embed_scale = getattr(self.get_base_layer(), "embed_scale", None)
        if embed_scale is not None:
            hidden = hidden * (embed_scale.to(hidden.dtype) if torch.is_tensor(embed_scale) else embed_scale)
        work = _writable(result, A_stack.dtype, self._inplace)
        n = x.shape[0]
        slots = torch.where(plan.index < 0, A_stack.shape[0] - 1, plan.index)
        work.view(n, -1, work.shape[-1]).baddbmm_(hidden.reshape(n, -1, hidden.shape[-1]), B_stack[slots])
        return work.to(result.dtype)


class Conv(LoraLayer):
    """LoRA on ``nn.Conv1d/2d/3d``: A is a conv with the base kernel, stride, padding and dilation; B is 1x1."""

    def _create(self, adapter_name: str, r: int, lora_bias: bool, factory: dict[str, Any]) -> None:
        base = self.get_base_layer()
        conv_cls = type(base) if type(base) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) else _conv_class(base)
        ones = (1,) * (base.weight.dim() - 2)
        self.lora_A[adapter_name] = _empty(conv_cls, self.in_features, r, base.kernel_size, base.stride,
                                           base.padding, base.dilation, bias=False, **factory)
        self.lora_B[adapter_name] = _empty(conv_cls, r, self.out_features, ones, ones, bias=lora_bias, **factory)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling * B ∘ A`` as one conv kernel ``(out, in, *kernel)``."""
        A = self.lora_A[adapter_name].weight  # (r, in, *k)
        B = self.lora_B[adapter_name].weight  # (out, r, 1, ...)
        if A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16):
            A, B = A.float(), B.float()
        delta = torch.tensordot(B.reshape(B.shape[0], B.shape[1]), A, dims=([1], [0]))
        return (delta * self.scaling[adapter_name]).to(self.get_base_layer().weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (N, in, *spatial) -> (N, out, *spatial')``."""
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        if self._row_adapters is not None:
            return self._mixed_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self._forward_adapters:
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            delta = lora_B(lora_A(self.lora_dropout[name](x.to(lora_A.weight.dtype))))
            if self._inplace and can_update_inplace(result, lora_A.weight):
                add_scaled_(result, delta, self.scaling[name])
            else:
                result = (result + delta * self.scaling[name]).to(result.dtype)
        return result

    def _mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Mixed batch through a conv layer: one gather per adapter present (convolutions cannot share one bmm)."""
        result = self.base_layer(x, *args, **kwargs)
        plan = self.row_plan(x.shape[0])
        if not plan.present:
            return result
        work = _writable(result, self.lora_A[plan.present[0]].weight.dtype, self._inplace)
        for u, name in enumerate(plan.present):
            rows = (plan.index == u).nonzero().squeeze(1)
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            delta = lora_B(lora_A(x.index_select(0, rows).to(lora_A.weight.dtype))) * self.scaling[name]
            work.index_add_(0, rows, delta.to(work.dtype))
        return work.to(result.dtype)


def _writable(result: torch.Tensor, dtype: torch.dtype, inplace_ok: bool) -> torch.Tensor:
    """``result`` itself when a mixed-batch update may be added into it, else a copy in ``dtype``."""
    if inplace_ok and result.dtype == dtype and result.is_contiguous() and not result.requires_grad:
        return result
    return result.to(dtype=dtype, copy=True).contiguous()


def _bias_or_zeros(bias: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_zeros(like.shape[-1]) if bias is None else bias.to(like.dtype)


def _features(base: nn.Module, shape: tuple[int, ...], fan_in_fan_out: bool) -> tuple[int, int]:
    """``(in_features, out_features)`` of a base layer from its weight shape."""
    if isinstance(base, nn.Embedding):
        return shape[0], shape[1]  # num_embeddings, embedding_dim
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return base.in_channels, base.out_channels
    return (shape[0], shape[1]) if fan_in_fan_out else (shape[1], shape[0])


def _conv_class(base: nn.Module) -> type[nn.Module]:
    dims = base.weight.dim() - 2
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]


def _empty(cls: type[nn.Module], *args: Any, device: torch.device, dtype: torch.dtype, **kwargs: Any) -> nn.Module:
    """Build ``cls(*args, **kwargs)`` without running its initialiser (the init functions fill it once)."""
    with torch.device("meta"):
        module = cls(*args, **kwargs)
    return module.to_empty(device=device).to(dtype)
