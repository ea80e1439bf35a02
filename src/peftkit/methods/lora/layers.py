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
from torch.nn.modules import module as torch_module

from ...errors import ConfigError, GroupedConvMergeError
from ...injection.apply import defer_init, is_probing, skip_random_init
from ...layers.base import AdapterLayer
from ...layers.dispatch import inplace_safe
from ...module_utils import add_child, init_module_state, new_module
from ...ops.batched import add_mixed_lowrank_, mixed_embedding_hidden, stack_adapters
from ...ops.lora_fused import add_lora_, dora_add_
from ...ops.lowrank import add_scaled_, can_update_inplace
from .dora import DoraMagnitude, dora_update, view_norm
from .fastpath import calls_modules, dropout_p, try_forward
from .init import init_conv_or_linear_, init_embedding_, init_from_weight, uses_base_weight
from .variants import LoraVariant, variant_for


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoraLayer(AdapterLayer):
    """State shared by every LoRA layer: ranks, alphas, scalings and dropout per adapter."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_rslora", "lora_bias")

    r: dict[str, int]
    lora_alpha: dict[str, float]
    scaling: dict[str, float]
    use_rslora: dict[str, bool]
    lora_bias: dict[str, bool]
    lora_dropout: nn.ModuleDict
    lora_A: nn.ModuleDict
    lora_B: nn.ModuleDict
    lora_embedding_A: nn.ParameterDict
    lora_embedding_B: nn.ParameterDict
    lora_magnitude_vector: nn.ModuleDict
    _dora_merged_norm: dict[str, torch.Tensor]
    _variants: dict[str, LoraVariant]
    _dora_norm_cache: dict[str, tuple[object, torch.Tensor]]
    _bt_cache: dict[str, tuple[Any, ...]]
    _lean_plan: tuple[Any, ...] | None
    fan_in_fan_out: bool
    in_features: int
    out_features: int
    #: whether the input is cast to the adapter weights' dtype before ``lora_A`` (the reference's attribute);
    #: :func:`peftkit.helpers.disable_input_dtype_casting` sets it to False per layer, for forward hooks that
    #: manage dtypes themselves (diffusers' layerwise casting). A class default: one attribute read when unset.
    cast_input_dtype_enabled: bool = True

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False,
                 features: tuple[int, int] | None = None) -> None:
        """``features``: ``(in, out)`` when the layer adapts something other than the base's ``weight``
        (:class:`~.param.ParamLayer`); by default they come from the base weight's shape."""
        super().__init__(base_layer)
        base = self.get_base_layer()
        in_features, out_features = features or _features(base, tuple(base.weight.shape), fan_in_fan_out)
        # plain attributes of a fresh module: set directly (nn.Module.__setattr__ costs ~3 µs each, per layer)
        vars(self).update(
            r={},  # dict[str, int]
            lora_alpha={},  # dict[str, float]
            scaling={},  # dict[str, float]
            use_rslora={},  # dict[str, bool]
            lora_bias={},  # dict[str, bool]
            _dora_merged_norm={},  # dict[str, Tensor]: row norms used when a DoRA adapter was merged
            _variants={},  # dict[str, LoraVariant]: adapters that are not plain LoRA (see variants.py)
            _dora_norm_cache={},  # dict[str, tuple[key, Tensor]]
            _bt_cache={},  # dict[str, tuple]: see fastpath._lean_entry
            _lean_plan=None,  # tuple | None: see fastpath._build_lean_plan
            fan_in_fan_out=fan_in_fan_out,
            _inplace=inplace_safe(base),
            in_features=in_features,
            out_features=out_features,
        )
        self._modules.update(  # empty containers: what their constructors build, ~2x cheaper (module_utils)
            lora_dropout=new_module(nn.ModuleDict),
            lora_A=new_module(nn.ModuleDict),
            lora_B=new_module(nn.ModuleDict),
            lora_embedding_A=new_module(nn.ParameterDict),
            lora_embedding_B=new_module(nn.ParameterDict),
            lora_magnitude_vector=new_module(nn.ModuleDict),  # DoRA: magnitude (out,) per adapter
        )

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
        use_dora: bool = False,
        **options: Any,
    ) -> None:
        """Create adapter ``adapter_name`` with rank ``r`` on the base weight's device, in ``dtype``; a variant
        (DoRA, ...: :func:`.variants.variant_for` of the options) is chosen here, once."""
        variant = variant_for(self, use_dora=use_dora, **options)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = use_rslora
        self.lora_bias[adapter_name] = lora_bias
        self.scaling[adapter_name] = lora_scaling(r, lora_alpha, use_rslora)
        add_child(self.lora_dropout, adapter_name,
                  nn.Dropout(p=lora_dropout) if lora_dropout > 0 else new_module(nn.Identity))
        weight = self.adapted_weight()
        # meta: nothing to fill. Loading: A and B stay on meta and adopt the checkpoint's tensors (missing ones
        # become zeros after it); PiSSA/OLoRA change the base weight and DoRA's magnitude is computed from A and B
        # (a variant's ``init_allocates``), so they always init.
        # A load's probe (is_probing) inits nothing: it only checks the checkpoint's shapes.
        allocates = variant is not None and variant.init_allocates
        init = not is_probing() and (uses_base_weight(init_lora_weights) or allocates
                                     or not (weight.is_meta or skip_random_init()))
        deferred = not init and not weight.is_meta
        factory = {"device": torch.device("meta") if deferred else weight.device, "dtype": dtype or weight.dtype}
        self._create(adapter_name, r, lora_bias, factory)
        if init:
            self._init(adapter_name, init_lora_weights)
        elif deferred:
            defer_init(self.adapter_parameters(adapter_name), weight.device)
        self._variants.pop(adapter_name, None)
        if variant is not None:
            variant.init(self, adapter_name)
            self._variants[adapter_name] = variant
        self._bt_cache.pop(adapter_name, None)
        self._refresh()

    def _cast_input_dtype(self, x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """``x`` in ``dtype`` (shape unchanged), or ``x`` itself when casting is disabled
        (``cast_input_dtype_enabled``), when it already has ``dtype``, or when it is None, as the reference."""
        if x is None or not self.cast_input_dtype_enabled or x.dtype == dtype:
            return x
        return x.to(dtype)

    def adapted_weight(self) -> torch.Tensor:
        """The base tensor this layer's adapters update (its device and dtype are the adapters'): the base
        layer's ``weight``; another parameter for :class:`~.param.ParamLayer`."""
        return self.get_base_layer().weight

    # ------------------------------------------------------------------ DoRA (layout: see dora.py)
    def _dora_view(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight (or a weight of its shape) in DoRA's norm view ``(n, ...)``; its own inverse."""
        return weight

    def _dora_magnitude_shape(self) -> tuple[int, ...]:
        """Shape of the magnitude (and of :meth:`dora_weight_norm`) as the reference saves it."""
        return (-1,)

    def _lora_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of ``adapter_name`` as stored."""
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def _dora_delta(self, adapter_name: str, view: torch.Tensor) -> torch.Tensor:
        """``scaling * B @ A`` in the norm view's layout (shape of ``view``), detached."""
        return self._delta_product(adapter_name).detach().reshape(view.shape)

    def _dora_norm(self, adapter_name: str) -> torch.Tensor:
        """``‖V + ΔV‖`` in the magnitude's shape, detached (on the meta device while A and B are: a load's probe)."""
        weight = self.get_base_layer().weight
        view = self._dora_view(weight.to("meta") if self._lora_weights(adapter_name)[0].is_meta else weight).detach()
        norm = view_norm(view, self._dora_delta(adapter_name, view))
        return norm.reshape(self._dora_magnitude_shape())

    def _create_dora(self, adapter_name: str) -> None:
        norm = self._dora_norm(adapter_name)
        self.lora_magnitude_vector[adapter_name] = DoraMagnitude(norm.to(self._lora_weights(adapter_name)[0].dtype))

    def dora_weight_norm(self, adapter_name: str) -> torch.Tensor:
        """``‖V + scaling * B @ A‖`` in the magnitude's shape, detached. Cached while the base weight, A, B, the
        scaling and the merged adapters are unchanged (tensor ``_version``s are part of the key), so an eval
        forward with frozen weights computes it once. Under ``torch.compile`` it is computed in the graph (the
        cache key reads ``id`` and ``data_ptr``, which dynamo cannot trace)."""
        if _compiling():
            return self._dora_norm(adapter_name)
        weight = self.get_base_layer().weight
        A, B = self._lora_weights(adapter_name)
        scaling = self.scaling[adapter_name]
        key = (tuple((id(t), t.data_ptr(), t._version) for t in (weight, A, B)),
               scaling if not isinstance(scaling, torch.Tensor) else (id(scaling), scaling._version),
               tuple(self.merged_adapters))
        hit = self._dora_norm_cache.get(adapter_name)
        if hit is not None and hit[0] == key:
            return hit[1]
        norm = self._dora_norm(adapter_name)
        self._dora_norm_cache[adapter_name] = (key, norm)
        return norm

    def _dora_factor(self, adapter_name: str, norm: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``m / n`` shaped ``(n, 1, ...)`` to scale the norm view ``like`` along its first axis."""
        factor = self.lora_magnitude_vector[adapter_name].weight.detach().reshape(-1) / norm.reshape(-1)
        return factor.reshape(-1, *(1,) * (like.dim() - 1)).to(like.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """As :meth:`AdapterLayer.merge`; an adapter with a variant merges through it (DoRA sets
        ``V <- (m / ‖V + ΔV‖) * (V + ΔV)`` in the norm view)."""
        for name in self._adapters_to_merge(adapter_names):
            variant = self._variants.get(name)
            if variant is None or variant.plain_merge:
                super().merge(safe_merge, [name])
                continue
            variant.merge(self, name, safe_merge)
            self.merged_adapters.append(name)
            self._refresh()

    def unmerge(self) -> None:
        """Undo the merged adapters, last merged first (a variant's through it; DoRA: ``V <- V / factor - ΔV``)."""
        while self.merged_adapters:
            name = self.merged_adapters[-1]
            variant = self._variants.get(name)
            if variant is None or variant.plain_merge:
                _unmerge_last_additive(self)
                continue
            self.merged_adapters.pop()
            variant.unmerge(self, name)
        self._refresh()

    def _adapters_to_merge(self, adapter_names: list[str] | None, warn: bool = True) -> list[str]:
        """As :meth:`AdapterLayer._adapters_to_merge`; an adapter whose variant cannot merge (aLoRA) refuses here,
        which the tuner calls for every layer before merging any, so a refused merge leaves the model unchanged."""
        names = super()._adapters_to_merge(adapter_names, warn)
        for name in names:
            variant = self._variants.get(name)
            if variant is not None:
                variant.refuse_merge(self, name)
        return names

    def _reject_variants_in_mixed_batch(self, present: tuple[str, ...]) -> None:
        """Mixed batches (``adapter_names=...``) serve plain LoRA adapters only, as the reference (DoRA, ...)."""
        bad = [n for n in present if n in self._variants]
        if bad:
            kinds = sorted({self._variants[n].name for n in bad})
            raise ValueError(f"mixed batches (adapter_names=...) are not supported with {'/'.join(kinds)} adapters: "
                             f"{bad}")

    def adapter_state(self, adapter_name: str) -> dict[str, tuple[str, torch.Tensor]]:
        """As :meth:`AdapterLayer.adapter_state`, but the DoRA magnitude is saved as ``lora_magnitude_vector``
        (without ``.weight``), as the reference does for backward compatibility."""
        state = super().adapter_state(adapter_name)
        key = "lora_magnitude_vector.weight"
        if key in state:
            state["lora_magnitude_vector"] = state.pop(key)
        return state

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._dora_norm_cache.pop(adapter_name, None)
        self._bt_cache.pop(adapter_name, None)
        self._variants.pop(adapter_name, None)

    def _refresh(self) -> None:
        """As :meth:`AdapterLayer._refresh`; any change of the adapters (added, activated, merged, deleted, ...)
        also drops the no-grad plan (:func:`.fastpath._build_lean_plan`)."""
        super()._refresh()
        self.__dict__["_lean_plan"] = None

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
        """``scaling * B @ A`` as ``(out, in)`` in float32 when the weights are half precision on CPU. A factor module
        whose stored ``weight`` is not its matrix (BD-LoRA's block-diagonal factors) gives it by ``dense_weight()``."""
        A_mod, B_mod = self.lora_A[adapter_name], self.lora_B[adapter_name]
        A = A_mod.dense_weight() if hasattr(A_mod, "dense_weight") else A_mod.weight
        B = B_mod.dense_weight() if hasattr(B_mod, "dense_weight") else B_mod.weight
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
        add_child(self.lora_A, adapter_name, _empty(nn.Linear, self.in_features, r, bias=False, **factory))
        add_child(self.lora_B, adapter_name, _empty(nn.Linear, r, self.out_features, bias=lora_bias, **factory))

    def _init(self, adapter_name: str, mode: bool | str) -> None:
        """As :meth:`LoraLayer._init`; PiSSA / OLoRA also replace the base weight by the residual
        ``W - scaling * B @ A`` (computed in float32), so the output is unchanged at init."""
        if not uses_base_weight(mode):
            super()._init(adapter_name, mode)
            return
        base_weight = self.get_base_layer().weight
        A_mod, B_mod = self.lora_A[adapter_name], self.lora_B[adapter_name]
        A, B, residual = init_from_weight(self._weight_out_in().detach().float(), mode, self.r[adapter_name],
                                          self.scaling[adapter_name], source=self.get_base_layer())
        with torch.no_grad():
            A_mod.weight.copy_(A)
            B_mod.weight.copy_(B)
            if B_mod.bias is not None:
                B_mod.bias.zero_()
            base_weight.copy_((residual.t() if self.fan_in_fan_out else residual).to(base_weight.dtype))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling * B @ A``, shape ``(out, in)`` (``(in, out)`` for ``Conv1D``), in the base weight's dtype (a
        variant's own update when it has one: :meth:`.variants.LoraVariant.delta_weight`, KaSA's ``lora_diag``)."""
        variant = self._variants.get(adapter_name)
        own = variant.delta_weight(self, adapter_name) if variant is not None else None
        if own is not None:
            return own
        delta = self._delta_product(adapter_name)
        delta = delta.t() if self.fan_in_fan_out else delta
        return delta.to(self.get_base_layer().weight.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """True for plain LoRA. An adapter with a variant (DoRA: its magnitude rescales ``W + ΔW``; aLoRA: position
        dependent) or with ``lora_bias`` (it changes the bias) is not ``W + get_delta_weight``; the reference converts
        DoRA / ``lora_bias`` adapters anyway, dropping the magnitude / bias (README: deliberate differences)."""
        return adapter_name not in self._variants and not self.lora_bias.get(adapter_name, False)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in) -> (..., out)``: ``base(x) + scaling * B(A(dropout(x)))`` per active adapter (an adapter
        with a variant, e.g. DoRA, through its :meth:`.variants.LoraVariant.forward`).

        In eager mode a call without extra arguments first goes to :func:`.fastpath.try_forward` (the cached
        no-grad plan while decoding, the fused training node), which returns None where the general path below is
        needed. Under ``torch.compile`` the layer computes the plain formula (:meth:`_plain_forward`), which dynamo
        traces without a graph break."""
        if _compiling():
            return self._plain_forward(x, *args, **kwargs)
        if not (args or kwargs):
            fast = try_forward(self, x)
            if fast is not None:
                return fast
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        if self._row_adapters is not None:
            return self._mixed_forward(x, *args, **kwargs)
        return self._add_adapters(x, self.base_layer(x, *args, **kwargs))

    def _plain_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The forward as the paper writes it, ``base(x) + scaling * B(A(dropout(x)))`` per adapter (a variant's
        adapter through its ``forward``), out of place: what ``torch.compile`` traces."""
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        if self._row_adapters is not None:
            return self._mixed_forward(x, *args, **kwargs)
        result = base_out = self.base_layer(x, *args, **kwargs)
        variants = self._variants
        for name in self._forward_adapters:
            if name in variants:
                result = variants[name].forward(self, name, x, result, base_out)
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            hidden = lora_A(self.lora_dropout[name](self._cast_input_dtype(x, lora_A.weight.dtype)))  # (..., r)
            if lora_B.bias is None:  # scale in rank space: no output-sized scaling pass in forward or backward
                update = lora_B(hidden * self.scaling[name])
            else:
                update = lora_B(hidden) * self.scaling[name]
            result = (result + update).to(base_out.dtype)
        return result

    def train(self, mode: bool = True) -> LoraLayer:
        """As ``nn.Module.train``; entering training drops the no-grad caches (:func:`.fastpath._lean_entry`)."""
        if mode:
            self._bt_cache.clear()
            self._lean_plan = None
        return super().train(mode)

    def _add_adapters(self, x: torch.Tensor, result: torch.Tensor, names: tuple[str, ...] | None = None
                      ) -> torch.Tensor:
        """Add the updates of ``names`` (default: the forward adapters) to the base output ``result``: in place
        when allowed (plain torch base, no adapter with a variant), with dropout fused into the A-projection; an
        adapter with a variant goes through its ``forward``."""
        names = self._forward_adapters if names is None else names
        variants = self._variants
        varied = bool(variants) and any(n in variants for n in names)
        inplace = self._inplace and not varied  # the base output is never written in place while a variant needs it
        base_out = result
        lora_A, lora_B, dropouts = self.lora_A._modules, self.lora_B._modules, self.lora_dropout._modules
        for name in names:
            if varied and name in variants:
                result = variants[name].forward(self, name, x, result, base_out)
                continue
            A_mod, B_mod, dropout = lora_A[name], lora_B[name], dropouts[name]
            if calls_modules(self, A_mod, B_mod):  # the reference's formula: casting disabled, or hooks to run
                update = B_mod(A_mod(dropout(self._cast_input_dtype(x, A_mod.weight.dtype)))) * self.scaling[name]
                result = (result + update).to(base_out.dtype)
                continue
            p = dropout_p(dropout)
            x_in = x
            if p is None:  # a dropout module of another kind: call it, no fused dropout
                x_in, p = dropout(x), 0.0
            result = add_lora_(result, x_in, A_mod.weight, B_mod.weight, self.scaling[name], B_mod.bias, p, inplace)
        return result

    # ------------------------------------------------------------------ DoRA
    def _weight_out_in(self) -> torch.Tensor:
        """The base weight as ``(out, in)`` (transposed for ``Conv1D``)."""
        return self._dora_view(self.get_base_layer().weight)

    def _dora_view(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t() if self.fan_in_fan_out else weight

    def _dora_forward(self, name: str, x: torch.Tensor, result: torch.Tensor, base_out: torch.Tensor
                      ) -> torch.Tensor:
        """``result + (m/n - 1) * W x + (m/n) * scaling * B(A(dropout(x)))``; the base output (minus its bias)
        stands for ``W x`` when there is no dropout or in eval mode."""
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        dropout = self.lora_dropout[name]
        if (result is base_out and self._forward_adapters == (name,) and self._inplace and lora_B.bias is None
                and dropout_p(dropout) == 0.0 and not calls_modules(self, lora_A, lora_B)):  # the only adapter: the base output may be updated in place
            fast = dora_add_(result, x, lora_A.weight, lora_B.weight, self.scaling[name],
                             self.lora_magnitude_vector[name].weight, self.dora_weight_norm(name),
                             self.get_base_layer().bias)
            if fast is not None:
                return fast
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = self.get_base_layer().bias
            base_no_bias = base_out if bias is None else base_out - bias
            dropped = x
        else:
            dropped = dropout(x)
            base_no_bias = F.linear(dropped, self._weight_out_in().to(dropped.dtype))
        lora_out = lora_B(lora_A(self._cast_input_dtype(dropped, lora_A.weight.dtype))) * self.scaling[name]
        magnitude = self.lora_magnitude_vector[name].weight
        return dora_update(result, base_no_bias, lora_out, magnitude, self.dora_weight_norm(name))

    def _mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Mixed batch: row ``b`` gets the update of its own adapter (``x: (N, *, in)``)."""
        result = self.base_layer(x, *args, **kwargs)
        plan = self.row_plan(x.shape[0])
        if not plan.present:
            return result
        self._reject_variants_in_mixed_batch(plan.present)
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
            raise ConfigError("lora_bias", True, "lora_bias=True is not supported for Embedding (it has no bias); "
                              "allowed for embedding layers: False")  # ValueError, as the reference raises
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r, **factory))

    def _init(self, adapter_name: str, mode: bool | str) -> None:
        init_embedding_(self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name], mode,
                        self.get_base_layer().weight)

    def _lora_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def _dora_view(self, weight: torch.Tensor) -> torch.Tensor:
        """``(num_embeddings, dim) <-> (dim, num_embeddings)``: DoRA normalises each embedding dimension."""
        return weight.t()

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
        variants = self._variants
        varied = bool(variants) and any(n in variants for n in self._forward_adapters)
        base_out = result  # never written in place while a variant (DoRA) needs it
        for name in self._forward_adapters:
            if varied and name in variants:
                result = variants[name].forward(self, name, x, result, base_out)
                continue
            B = self.lora_embedding_B[name]
            hidden = self._hidden(name, x)  # (..., r)
            scaling = self.scaling[name]
            if self._inplace and not varied and not _compiling() and can_update_inplace(result, B):
                hidden = hidden * scaling if isinstance(scaling, torch.Tensor) else hidden
                alpha = 1.0 if isinstance(scaling, torch.Tensor) else scaling
                result.view(-1, result.shape[-1]).addmm_(hidden.reshape(-1, hidden.shape[-1]), B.t(), alpha=alpha)
            else:
                result = (result + (hidden @ B.t()) * scaling).to(result.dtype)
        return result


    def _hidden(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x: (...) int -> (..., r)``: rows of ``A.T``, times the base's ``embed_scale`` when it has one."""
        hidden = self._embed(x, self.lora_embedding_A[name].t())
        embed_scale = getattr(self.get_base_layer(), "embed_scale", None)
        if embed_scale is not None:
            hidden = hidden * embed_scale.to(hidden.dtype) if torch.is_tensor(embed_scale) else hidden * embed_scale
        return hidden

    def _dora_forward(self, name: str, x: torch.Tensor, result: torch.Tensor, base_out: torch.Tensor
                      ) -> torch.Tensor:
        """``(m/n) * (base + s * e(x) A^T B^T)``: the base output stands for ``W x`` (embeddings have no bias)."""
        update = (self._hidden(name, x) @ self.lora_embedding_B[name].t()) * self.scaling[name]
        return dora_update(result, base_out, update, self.lora_magnitude_vector[name].weight,
                           self.dora_weight_norm(name))

    def _mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Mixed batch: one embedding lookup over the stacked rank-space tables, then one batched matmul."""
        result = self.base_layer(x, *args, **kwargs)
        plan = self.row_plan(x.shape[0])
        if not plan.present:
            return result
        self._reject_variants_in_mixed_batch(plan.present)
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
    """LoRA on ``nn.Conv1d/2d/3d``: A is a conv with the base kernel, stride, padding and dilation; B is 1x1.

    With a grouped base (``groups > 1``), as the reference: A is a full conv ``in -> r`` (``(r, in, *k)``) and B a
    1x1 conv ``r -> out`` with the base's groups (``(out, r / groups, 1, ...)``); such adapters cannot be merged."""

    def _create(self, adapter_name: str, r: int, lora_bias: bool, factory: dict[str, Any]) -> None:
        base = self.get_base_layer()
        conv_cls = type(base) if type(base) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) else _conv_class(base)
        ones = (1,) * (base.weight.dim() - 2)
        self.lora_A[adapter_name] = _empty(conv_cls, self.in_features, r, base.kernel_size, base.stride,
                                           base.padding, base.dilation, bias=False, **factory)
        self.lora_B[adapter_name] = _empty(conv_cls, r, self.out_features, ones, ones, groups=base.groups,
                                           bias=lora_bias, **factory)

    def _adapters_to_merge(self, adapter_names: list[str] | None, warn: bool = True) -> list[str]:
        """As :meth:`AdapterLayer._adapters_to_merge`; a grouped base refuses here, which the tuner calls for every
        layer before merging any, so a refused merge leaves the whole model unchanged."""
        names = super()._adapters_to_merge(adapter_names, warn)
        if names:
            self._refuse_grouped_merge()
        return names

    def _refuse_grouped_merge(self) -> None:
        groups = self.get_base_layer().groups
        if groups > 1:
            raise GroupedConvMergeError(f"Merging is not supported for LoRA on convolutions with groups > 1 (this "
                                        f"layer has groups={groups}); use unload() or keep the adapter unmerged")

    def _dora_magnitude_shape(self) -> tuple[int, ...]:
        """``(1, out, 1, ...)``: broadcasts against ``(N, out, *spatial)`` outputs, as the reference saves it."""
        return (1, -1) + (1,) * (self.get_base_layer().weight.dim() - 2)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling * B ∘ A`` as one conv kernel ``(out, in, *kernel)`` (groups=1 only)."""
        self._refuse_grouped_merge()
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
        variants = self._variants
        varied = bool(variants) and any(n in variants for n in self._forward_adapters)
        base_out = result  # never written in place while a variant (DoRA) needs it
        for name in self._forward_adapters:
            if varied and name in variants:
                result = variants[name].forward(self, name, x, result, base_out)
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            delta = lora_B(lora_A(self.lora_dropout[name](self._cast_input_dtype(x, lora_A.weight.dtype))))
            if self._inplace and not varied and not _compiling() and can_update_inplace(result, lora_A.weight):
                add_scaled_(result, delta, self.scaling[name])
            else:
                result = (result + delta * self.scaling[name]).to(result.dtype)
        return result

    def _dora_forward(self, name: str, x: torch.Tensor, result: torch.Tensor, base_out: torch.Tensor
                      ) -> torch.Tensor:
        """``result + (m/n - 1) * conv(x, W) + (m/n) * scaling * B(A(dropout(x)))``; the base output (minus its
        bias) stands for ``conv(x, W)`` when there is no dropout or in eval mode."""
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        dropout = self.lora_dropout[name]
        base = self.get_base_layer()
        if isinstance(dropout, nn.Identity) or not self.training:
            bias_shape = (1, -1) + (1,) * (base_out.dim() - 2)
            base_no_bias = base_out if base.bias is None else base_out - base.bias.view(bias_shape)
            dropped = x
        else:
            dropped = dropout(x)
            weight = base.weight.to(dropped.dtype)
            if hasattr(base, "_conv_forward"):  # honours padding_mode
                base_no_bias = base._conv_forward(dropped, weight, None)
            else:
                conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 2]
                base_no_bias = conv(dropped, weight, None, base.stride, base.padding, base.dilation, base.groups)
        lora_out = lora_B(lora_A(self._cast_input_dtype(dropped, lora_A.weight.dtype))) * self.scaling[name]
        magnitude = self.lora_magnitude_vector[name].weight
        return dora_update(result, base_no_bias, lora_out, magnitude, self.dora_weight_norm(name))

    def _mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Mixed batch through a conv layer: one gather per adapter present (convolutions cannot share one bmm)."""
        result = self.base_layer(x, *args, **kwargs)
        plan = self.row_plan(x.shape[0])
        if not plan.present:
            return result
        self._reject_variants_in_mixed_batch(plan.present)
        work = _writable(result, self.lora_A[plan.present[0]].weight.dtype, self._inplace)
        for u, name in enumerate(plan.present):
            rows = (plan.index == u).nonzero().squeeze(1)
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            delta = lora_B(lora_A(x.index_select(0, rows).to(lora_A.weight.dtype))) * self.scaling[name]
            work.index_add_(0, rows, delta.to(work.dtype))
        return work.to(result.dtype)


_compiling = torch.compiler.is_compiling  # True (a constant) while dynamo traces


def _unmerge_last_additive(layer: LoraLayer) -> None:
    """Subtract the (additive, non-DoRA) last merged adapter of ``layer`` from its base weights."""
    name = layer.merged_adapters.pop()
    base = layer.get_base_layer()
    with torch.no_grad():
        base.weight.data.sub_(layer.get_delta_weight(name).to(base.weight.dtype))
        delta_b = layer.get_delta_bias(name)
        if delta_b is not None:
            base.bias.data.sub_(delta_b.to(base.bias.dtype))


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
    """Build ``cls(*args, **kwargs)`` with uninitialised tensors on ``device`` in ``dtype``, without running its
    initialiser (the init functions fill it once; on the meta device nothing is filled)."""
    if cls is nn.Linear:
        return _empty_linear(*args, device=device, dtype=dtype, **kwargs)
    module = cls(*args, **kwargs, device="meta", dtype=dtype)  # type: ignore[call-arg]
    return module if torch.device(device).type == "meta" else module.to_empty(device=device)


def _empty_linear(in_features: int, out_features: int, bias: bool = True, *, device: torch.device,
                  dtype: torch.dtype) -> nn.Linear:
    """An ``nn.Linear`` whose ``weight: (out, in)`` and ``bias: (out,)`` are ``torch.empty`` on ``device``: the
    same module ``nn.Linear(...)`` builds, minus ``reset_parameters`` (about 8x cheaper per adapter)."""
    module = nn.Linear.__new__(nn.Linear)
    init_module_state(module)
    weight = nn.Parameter(torch.empty((out_features, in_features), device=device, dtype=dtype))
    bias_param = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
    if torch_module._global_parameter_registration_hooks:  # someone watches registrations: go through them
        module.in_features, module.out_features = in_features, out_features
        module.weight, module.bias = weight, bias_param
        return module
    # what nn.Module.__setattr__ does for these names on a fresh module, without its per-call checks
    vars(module).update(in_features=in_features, out_features=out_features)
    module._parameters.update(weight=weight, bias=bias_param)
    return module
