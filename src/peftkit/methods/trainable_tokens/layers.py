"""TrainableTokens layers: chosen rows of an embedding (or of a weight tied to it) replaced by trained ones.

Shapes: base weight ``W: (num_embeddings, dim)`` (an ``nn.Embedding``; a tied output ``nn.Linear`` has the same
weight); per adapter ``trainable_tokens_delta: (k, dim)`` with ``k = len(token_indices)``. The forward pass uses
``W'`` = ``W`` with rows ``token_indices`` replaced by the delta (``index_copy``), as the reference does: the delta
holds the new rows themselves, not a difference. Merging writes those rows into ``W``; unmerging writes back the
rows saved when the adapter was created.

A layer built with ``tied_adapter=`` holds no tensors of its own: it shares the other layer's dicts, so both apply
the same rows and a checkpoint holds the same tensor under both module names (as the reference's files do).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import AdapterConflictError, MergeError, UnsupportedModuleError, UnsupportedOperationError
from ...layers.base import AdapterLayer


class TrainableTokensLayer(AdapterLayer):
    """Trainable rows of an ``nn.Embedding``, or (tied) of an ``nn.Linear`` sharing an embedding's weight."""

    adapter_layer_names = ("trainable_tokens_delta",)
    other_param_names = ("token_indices", "trainable_tokens_original")

    def __init__(self, base_layer: nn.Module, tied_adapter: TrainableTokensLayer | None = None) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise UnsupportedModuleError(
                f"TrainableTokens wraps nn.Embedding (or an nn.Linear tied to one), not {type(base).__name__}"
            )
        # a list keeps the tied layer out of named_modules() and so out of the state dict walk
        self._tied_adapter = [tied_adapter] if tied_adapter is not None else []
        if tied_adapter is None:
            self.trainable_tokens_delta = nn.ParameterDict({})
            self.trainable_tokens_original: dict[str, torch.Tensor] = {}  # (k, dim) rows before the adapter
            self.token_indices: dict[str, list[int]] = {}
        else:
            self.trainable_tokens_delta = tied_adapter.trainable_tokens_delta
            self.trainable_tokens_original = tied_adapter.trainable_tokens_original
            self.token_indices = tied_adapter.token_indices
        self.in_features, self.out_features = (
            (base.num_embeddings, base.embedding_dim) if isinstance(base, nn.Embedding)
            else (base.in_features, base.out_features)
        )

    @property
    def tied_adapter(self) -> TrainableTokensLayer | None:
        """The layer whose rows this one applies (None: this layer owns its tensors)."""
        return self._tied_adapter[0] if self._tied_adapter else None

    def update_layer(self, adapter_name: str, token_indices: list[int], init_weights: bool = True,
                     dtype: torch.dtype | None = None) -> None:
        """Create adapter ``adapter_name``: ``(k, dim)`` rows, a copy of ``W[token_indices]`` (``init_weights``) or
        ~ N(0, 1). A tied layer does nothing: it follows the layer it is tied to."""
        if self.tied_adapter is not None:
            self._refresh()
            return
        weight = self.get_base_layer().weight
        rows = weight.detach()[torch.tensor(token_indices, device=weight.device)]
        values = rows.clone() if init_weights else torch.randn(rows.shape, dtype=rows.dtype).to(weight.device)
        self.token_indices[adapter_name] = list(token_indices)
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values.to(dtype or weight.dtype))
        self.trainable_tokens_original[adapter_name] = rows.clone()
        self._refresh()

    # ------------------------------------------------------------------ weights
    def _index(self, adapter_name: str, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.token_indices[adapter_name], dtype=torch.long, device=device)

    def _check_disjoint(self, adapter_names: list[str]) -> None:
        """Raise :class:`AdapterConflictError` when two of ``adapter_names`` (merged ones included) share a row."""
        seen: dict[int, str] = {}
        for name in dict.fromkeys(self.merged_adapters + list(adapter_names)):
            for i in self.token_indices.get(name, ()):
                if i in seen and seen[i] != name:
                    raise AdapterConflictError(
                        f"token_indices of adapters {seen[i]!r} and {name!r} overlap (token {i}); allowed: "
                        "adapters with disjoint token indices active or merged together"
                    )
                seen[i] = name

    def get_merged_weights(self, adapter_names: list[str] | tuple[str, ...]) -> torch.Tensor:
        """``W: (num_embeddings, dim)`` with the rows of ``adapter_names`` replaced (differentiable in the deltas)."""
        weight = self.get_base_layer().weight
        for name in adapter_names:
            delta = self.trainable_tokens_delta[name]
            weight = weight.index_copy(0, self._index(name, weight.device), delta.to(weight.dtype))
        return weight

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The additive form ``W' - W`` (zero outside the adapter's rows), in the base weight's dtype."""
        weight = self.get_base_layer().weight.detach()
        rows = self._index(adapter_name, weight.device)
        delta = torch.zeros_like(weight)
        delta[rows] = self.trainable_tokens_delta[adapter_name].detach().to(weight.dtype) - weight[rows]
        return delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the rows of ``adapter_names`` (default: the active adapters) into the base weight (in place, so a
        weight tied to another module stays tied)."""
        names = self._adapters_to_merge(adapter_names)
        if not names:
            return
        self._check_disjoint(names)
        weight = self.get_base_layer().weight
        for name in names:
            rows = self.trainable_tokens_delta[name].detach().to(weight.dtype)
            if safe_merge and not torch.isfinite(rows).all():
                raise MergeError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            with torch.no_grad():
                weight.data.index_copy_(0, self._index(name, weight.device), rows)
            self.merged_adapters.append(name)
        self._refresh()

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        """Raise :class:`MergeError` if merging would put NaN/inf into the base weight."""
        for name in self._adapters_to_merge(adapter_names, warn=False):
            if not torch.isfinite(self.trainable_tokens_delta[name].detach()).all():
                raise MergeError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")

    def unmerge(self) -> None:
        """Write back the original rows of every merged adapter, last merged first."""
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                original = self.trainable_tokens_original[name].to(weight.device, weight.dtype)
                weight.data.index_copy_(0, self._index(name, weight.device), original)
        self._refresh()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Embedding: ``x: (...) int -> (..., dim)``; tied linear: ``x: (..., in) -> (..., out)``."""
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        if self._row_adapters is not None:
            raise UnsupportedOperationError("TrainableTokens does not support adapter_names= (mixed batches)")
        names = self._forward_adapters
        if not names:
            return self.base_layer(x, *args, **kwargs)
        self._check_disjoint(list(names))
        return self._forward_with(x, self.get_merged_weights(names))

    def _forward_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's computation with ``weight: (num_embeddings, dim)`` in place of its own."""
        base = self.get_base_layer()
        if isinstance(base, nn.Embedding):
            result = F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type,
                                 base.scale_grad_by_freq, base.sparse)
            embed_scale = getattr(base, "embed_scale", None)  # e.g. Gemma's scaled word embedding
            if embed_scale is not None:
                result = result * (embed_scale.to(result.dtype) if torch.is_tensor(embed_scale) else embed_scale)
            return result
        return F.linear(x, weight, base.bias)
