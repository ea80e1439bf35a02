"""``AdapterLayer``: a module that wraps a base layer and holds any number of named adapters.

Methods subclass it, declare which attributes hold per-adapter parameters (``adapter_layer_names``) and implement
``update_layer`` (create an adapter), ``get_delta_weight`` (the dense update of the base weight) and ``forward``.
Merging, unmerging, activation, deletion and the structural state-dict view are written once here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import MergeError, PeftWarning
from ..module_utils import init_module_state, set_training
from ..ops.batched import contiguous_runs


class AdapterState:
    """Activation state shared by adapter layers and ``modules_to_save`` wrappers (reference attribute names)."""

    _active_adapter: list[str]
    _disable_adapters: bool

    @property
    def active_adapters(self) -> list[str]:
        """Names of the active adapters (may include adapters this module does not hold)."""
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (a list when several are active)."""
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    @property
    def disable_adapters(self) -> bool:
        """True while adapters are disabled (the module computes the base output)."""
        return self._disable_adapters


#: ``add(result, adapter_name, x, inplace) -> result + update`` of an additive method (see ``forward_adding``)
AddUpdate = Callable[[torch.Tensor, str, torch.Tensor, bool], torch.Tensor]


class AdapterLayer(AdapterState, nn.Module):
    """Base of every adapter layer (the reference's ``BaseTunerLayer``).

    Attributes read by the ecosystem keep the reference's names: ``base_layer``, ``active_adapters``,
    ``merged_adapters``, ``disable_adapters``, ``merged``.
    """

    #: attributes that are ``nn.ModuleDict``/``nn.ParameterDict`` keyed by adapter name and hold trainable tensors
    adapter_layer_names: tuple[str, ...] = ()
    #: attributes that are plain dicts keyed by adapter name (hyper-parameters, dropout modules, ...)
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        init_module_state(self)  # nn.Module.__init__'s state, ~2x cheaper (module_utils); every adapted layer runs this
        self.base_layer = base_layer
        # plain attributes of a fresh module (none is a property, Parameter, Module or buffer): set directly, since
        # nn.Module.__setattr__ costs a few µs each and every adapted layer of a model runs this
        vars(self).update(
            _active_adapter=[],  # list[str]
            merged_adapters=[],  # list[str]
            _disable_adapters=False,
            # adapters that take part in forward: active, present here and not merged. Refreshed on every change.
            _forward_adapters=(),  # tuple[str, ...]
            # per-row adapter names while a mixed batch runs (set by TunerModel.mixed_batch), else None
            _row_adapters=None,  # tuple[str, ...] | None
            _row_cache=None,  # tuple[object, RowPlan] | None
            _stack_cache=None,  # tuple[object, Any] | None
        )

    # ------------------------------------------------------------------ state
    def train(self, mode: bool = True) -> AdapterLayer:
        """As ``nn.Module.train``: the base layer through its own ``train``; the adapter internals (plain torch
        containers and layers, about ten modules per layer) get the flag directly (:func:`set_training`), which
        makes ``model.eval()`` / ``model.train()`` of an adapted model several times cheaper."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")  # noqa: TRY004 - as nn.Module.train
        self.__dict__["training"] = mode
        for name, child in self._modules.items():
            if child is None:
                continue
            if name == "base_layer":
                child.train(mode)
            else:
                set_training(child, mode)
        return self

    @property
    def merged(self) -> bool:
        """True when at least one adapter is merged into the base weights."""
        return bool(self.merged_adapters)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (so code reading ``module.weight`` keeps working)."""
        return self.get_base_layer().weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return getattr(self.get_base_layer(), "bias", None)

    def get_base_layer(self) -> nn.Module:
        """The innermost wrapped module (wrappers may be nested)."""
        layer = self.base_layer
        while isinstance(layer, AdapterLayer):
            layer = layer.base_layer
        return layer

    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds, in insertion order."""
        names: dict[str, None] = {}
        attrs, modules = vars(self), self._modules  # direct lookups: nn.Module.__getattr__ is slow and this is hot
        for attr in self.adapter_layer_names + self.other_param_names:
            holder = modules[attr] if attr in modules else attrs.get(attr)
            if holder is not None:
                names.update(dict.fromkeys(holder.keys()))
        return list(names)

    def has_adapter(self, name: str) -> bool:
        """Does this layer hold adapter ``name``?"""
        return any(name in getattr(self, attr) for attr in self.adapter_layer_names)

    def _refresh(self) -> None:
        held = set(self.adapter_names())
        self._forward_adapters = tuple(
            a for a in self._active_adapter if a in held and a not in self.merged_adapters
        )

    # ------------------------------------------------------------------ activation and trainability
    def set_adapter(self, adapter_names: str | Iterable[str], trainable: dict[str, bool] | None = None) -> None:
        """Activate ``adapter_names``. Adapter parameters get ``requires_grad`` from ``trainable[name]``
        (missing names: active adapters trainable, inactive frozen)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._active_adapter = names
        for name in self.adapter_names():
            grad = (trainable or {}).get(name, name in names) and name in names
            for param in self.adapter_parameters(name):
                param.requires_grad_(grad)
            for attr in vars(self).get("frozen_peft_weight_names", {}).get(name, ()):  # e.g. MiCA's lora_B
                holder = getattr(self, attr)
                item = holder[name] if name in holder else None  # noqa: SIM401 (nn.ModuleDict has no .get)
                for param in (item.parameters() if isinstance(item, nn.Module) else [item] if item is not None else []):
                    param.requires_grad_(False)
        self._refresh()

    def enable_adapters(self, enabled: bool) -> None:
        """Enable (True) or disable (False) every adapter of this layer; disabling freezes them."""
        self._disable_adapters = not enabled
        if not enabled:
            for name in self.adapter_names():
                for param in self.adapter_parameters(name):
                    param.requires_grad_(False)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter ``adapter_name`` held by this layer."""
        params: list[nn.Parameter] = []
        for attr in self.adapter_layer_names:
            holder = getattr(self, attr)
            if adapter_name not in holder:
                continue
            item = holder[adapter_name]
            if not isinstance(item, nn.Module):
                params.append(item)
            elif item._modules:
                params.extend(item.parameters())
            else:  # a leaf module (nn.Linear, ...): its own parameters, without a recursive walk
                params.extend(p for p in item._parameters.values() if p is not None)
        return params

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name`` from this layer (it must not be merged)."""
        if adapter_name in self.merged_adapters:
            raise MergeError(f"cannot delete adapter {adapter_name!r}: it is merged; call unmerge_adapter() first")
        for attr in self.adapter_layer_names + self.other_param_names:
            holder = getattr(self, attr)
            if adapter_name in holder:
                del holder[adapter_name]
        if adapter_name in self._active_adapter:
            remaining = sorted(self.adapter_names())
            self._active_adapter = [a for a in self._active_adapter if a != adapter_name] or remaining[:1]
        self._refresh()

    # ------------------------------------------------------------------ structural state dict
    def adapter_state(self, adapter_name: str) -> dict[str, tuple[str, torch.Tensor]]:
        """``{saved key: (in-memory key, tensor)}`` for adapter ``adapter_name``, keys relative to this layer.

        The saved key is the in-memory key with the adapter name removed: ``lora_A.default.weight`` is saved as
        ``lora_A.weight``; a ``ParameterDict`` entry ``lora_embedding_A.default`` as ``lora_embedding_A``.
        """
        state: dict[str, tuple[str, torch.Tensor]] = {}
        for attr in self.adapter_layer_names:
            holder = getattr(self, attr)
            if adapter_name not in holder:
                continue
            item = holder[adapter_name]
            if isinstance(item, nn.Module):
                for key, tensor in item.state_dict(keep_vars=True).items():
                    state[f"{attr}.{key}"] = (f"{attr}.{adapter_name}.{key}", tensor)
            else:
                state[attr] = (f"{attr}.{adapter_name}", item)
        return state

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense update of the base weight for ``adapter_name``, in the base weight's layout and dtype."""
        raise NotImplementedError

    def get_delta_bias(self, adapter_name: str) -> torch.Tensor | None:
        """Update of the base bias (None when the adapter does not change it)."""
        return None

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether ``convert_to_lora`` can express adapter ``adapter_name`` of this layer as a LoRA: its effect
        must be ``W + get_delta_weight(adapter_name)`` on a 2-d weight. False unless a layer class says so."""
        return False

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the deltas of ``adapter_names`` (default: the active adapters) into the base weights.

        With ``safe_merge`` the merged weights are checked for NaN/inf before anything is written, and a
        :class:`MergeError` leaves the weights untouched.
        """
        names = self._adapters_to_merge(adapter_names)
        base = self.get_base_layer()
        for name in names:
            delta_w = self.get_delta_weight(name)
            delta_b = self.get_delta_bias(name)
            if delta_b is not None and base.bias is None:
                raise MergeError(
                    f"cannot merge adapter {name!r}: it has a bias (lora_bias=True) but the base layer has bias=None"
                )
            if safe_merge:
                _check_finite(base.weight, delta_w, name)
                if delta_b is not None and base.bias is not None:
                    _check_finite(base.bias, delta_b, name)
            with torch.no_grad():
                base.weight.data.add_(delta_w.to(base.weight.dtype))
                if delta_b is not None:
                    base.bias.data.add_(delta_b.to(base.bias.dtype))
            self.merged_adapters.append(name)
        self._refresh()

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        """Raise :class:`MergeError` if merging ``adapter_names`` would put NaN/inf into the base weights."""
        base = self.get_base_layer()
        for name in self._adapters_to_merge(adapter_names, warn=False):
            _check_finite(base.weight, self.get_delta_weight(name), name)
            delta_b = self.get_delta_bias(name)
            if delta_b is not None and base.bias is not None:
                _check_finite(base.bias, delta_b, name)

    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weights, last merged first."""
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                base.weight.data.sub_(self.get_delta_weight(name).to(base.weight.dtype))
                delta_b = self.get_delta_bias(name)
                if delta_b is not None:
                    base.bias.data.sub_(delta_b.to(base.bias.dtype))
        self._refresh()

    def _adapters_to_merge(self, adapter_names: list[str] | None, warn: bool = True) -> list[str]:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        unknown = [n for n in names if not self.has_adapter(n)]
        if adapter_names is not None and unknown and len(unknown) == len(names):
            return []  # the adapter may target other layers only
        names = [n for n in names if self.has_adapter(n)]
        already = [n for n in names if n in self.merged_adapters]
        if warn and already and len(already) == len(names):
            warnings.warn("All adapters are already merged, nothing to do.", PeftWarning, stacklevel=3)
        return [n for n in names if n not in self.merged_adapters]

    def row_plan(self, batch_size: int) -> RowPlan:
        """How the rows of a batch of ``batch_size`` map to this layer's adapters during a mixed batch (cached)."""
        key = (self._row_adapters, batch_size)  # by value: ids of freed tuples get reused
        if self._row_cache is not None and self._row_cache[0] == key:
            return self._row_cache[1]
        plan = RowPlan.build(expand_rows(self._row_adapters or (), batch_size), self.has_adapter,
                             self.get_base_layer().weight.device)
        self._row_cache = (key, plan)
        return plan

    def row_groups(self, batch_size: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Mixed batch: each adapter of the batch that this layer holds, with its row indices ``(n,)`` (long)."""
        plan = self.row_plan(batch_size)
        for u, name in enumerate(plan.present):
            yield name, (plan.index == u).nonzero().squeeze(1)

    def mixed_add(self, x: torch.Tensor, result: torch.Tensor,
                  delta: Callable[[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Mixed batch of an additive method: ``result`` (the base output, ``(N, ..., out)``) plus
        ``delta(name, x[rows])`` on each adapter's rows (``x: (N, ...)``); rows of no adapter keep the base output.
        One gather and one ``index_add`` per adapter present."""
        for name, rows in self.row_groups(x.shape[0]):
            result = result.index_add(0, rows, delta(name, x.index_select(0, rows)).to(result.dtype))
        return result

    def mixed_replace(self, x: torch.Tensor, result: torch.Tensor,
                      adapted: Callable[[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Mixed batch of a method that transforms the whole output: each adapter's rows of ``result`` (the base
        output, ``(N, ..., out)``) replaced by ``adapted(name, x[rows])``, the layer's output with only that
        adapter; rows of no adapter keep the base output."""
        for name, rows in self.row_groups(x.shape[0]):
            result = result.index_copy(0, rows, adapted(name, x.index_select(0, rows)).to(result.dtype))
        return result

    def forward_adding(self, x: torch.Tensor, add: AddUpdate, inplace_ok: bool, *args: Any,
                       **kwargs: Any) -> torch.Tensor:
        """Forward of a method that adds each adapter's update to the base output: ``add(result, name, x, inplace)``
        returns ``result: (..., out)`` plus adapter ``name``'s update on ``x: (..., in)`` (written into ``result``
        when ``inplace``). Disabled: the base forward; mixed batch: each adapter's update on its own rows
        (:meth:`mixed_add`); else the forward adapters in order, in place only when ``inplace_ok`` (autograd does
        not need the base output), for a single adapter and outside ``torch.compile``."""
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self._row_adapters is not None:
            return self.mixed_add(x, result, lambda name, xs: add(
                xs.new_zeros((*xs.shape[:-1], result.shape[-1]), dtype=result.dtype), name, xs, False))
        names = self._forward_adapters
        inplace = inplace_ok and len(names) == 1 and not torch.compiler.is_compiling()
        for name in names:
            result = add(result, name, x, inplace)
        return result

    def forward_replacing(self, x: torch.Tensor, adapted: Callable[..., torch.Tensor], *args: Any,
                          **kwargs: Any) -> torch.Tensor:
        """Forward of a method whose adapters transform the layer (its output is not the base output plus a
        delta): ``adapted(x, names, *args, **kwargs)`` is the layer's output with the adapters ``names`` applied in
        order. Disabled or no forward adapter: the base forward; mixed batch: each adapter's rows through it alone
        (:meth:`mixed_replace`); else ``adapted`` over the forward adapters, in ``x``'s dtype."""
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        if self._row_adapters is not None:
            return self.mixed_replace(x, self.base_layer(x, *args, **kwargs),
                                      lambda name, xs: adapted(xs, [name], *args, **kwargs))
        if not self._forward_adapters:
            return self.base_layer(x, *args, **kwargs)
        return adapted(x, self._forward_adapters, *args, **kwargs).to(x.dtype)

    def cached_stacks(self, key: object, build: Callable[[], Any]) -> Any:
        """``build()``, reused while ``key`` is unchanged (stacked adapter weights of mixed batches: the key holds
        the adapters' names, tensor versions and scalings, so any change to them rebuilds)."""
        if self._stack_cache is None or self._stack_cache[0] != key:
            self._stack_cache = (key, build())
        return self._stack_cache[1]

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base output, unmerging first when adapters are disabled but merged."""
        if self._disable_adapters and self.merged_adapters:
            self.unmerge()
        return self.base_layer(x, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={self._active_adapter}"


def expand_rows(names: tuple[str, ...], batch_size: int) -> tuple[str, ...]:
    """Per-row adapter names for a batch of ``batch_size`` rows.

    Generation repeats each input row ``k`` times (beams, returned sequences) with ``repeat_interleave``, so a
    batch ``k`` times larger than ``names`` repeats each name ``k`` times; the encoder of an encoder-decoder
    still sees the original batch.
    """
    if batch_size == len(names):
        return names
    if not names or batch_size % len(names):
        raise ValueError(
            f"adapter_names has {len(names)} entries but a layer received a batch of {batch_size} rows; "
            "pass one adapter name per row of the batch"
        )
    k = batch_size // len(names)
    return tuple(name for name in names for _ in range(k))


@dataclass(frozen=True)
class RowPlan:
    """Routing of one mixed batch through one layer.

    ``present``: the adapters of the batch that this layer holds (slot ``u`` = ``present[u]``); ``index: (N,)``
    the slot of each row (-1: base only); ``slots``: the same as a tuple; ``runs``: contiguous runs of equal slots;
    ``rows_are_slots``: ``slots == (0, 1, ..., N-1)``.
    """

    present: tuple[str, ...]
    index: torch.Tensor
    slots: tuple[int, ...]
    runs: list[tuple[int, int, int]]

    rows_are_slots: bool  # row b uses slot b for every row (each row its own adapter, in stack order)

    @staticmethod
    def build(rows: tuple[str, ...], holds: Callable[[str], bool], device: torch.device) -> RowPlan:
        present = tuple(n for n in dict.fromkeys(rows) if holds(n))
        slot = {name: u for u, name in enumerate(present)}
        slots = tuple(slot.get(n, -1) for n in rows)
        index = torch.tensor(slots, dtype=torch.long, device=device)
        return RowPlan(present, index, slots, contiguous_runs(slots), slots == tuple(range(len(slots))))


def _check_finite(weight: torch.Tensor, delta: torch.Tensor, name: str) -> None:
    merged = weight.detach() + delta.to(weight.dtype)
    if not torch.isfinite(merged).all():
        raise MergeError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
