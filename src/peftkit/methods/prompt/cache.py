"""transformers caches that carry the key/value prefix of prefix tuning (imports transformers; load lazily).

Two flavours:

* :func:`prefix_cache` with ``replayable=False``: a plain ``DynamicCache`` (``EncoderDecoderCache`` for
  encoder-decoder models) filled with the prefix, as the reference builds it. The model appends the new keys to it,
  so it is the right starting cache for ``generate`` and for an eval forward whose returned cache is reused.
* ``replayable=True``: each layer returns ``cat(prefix, new)`` from ``update`` without storing ``new`` (and an
  encoder-decoder cache stores no cross-attention keys either). A forward through it can be recomputed (gradient
  checkpointing replays every layer during backward) and sees the same keys each time. It counts the ``update`` calls
  so a caller can tell whether the model used the prefix at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache

KV = tuple[torch.Tensor, torch.Tensor]


class ReplayablePrefixLayer(DynamicLayer):
    """A cache layer holding a fixed prefix ``(B, heads, nvt, head_dim)``; ``update(k, v)`` returns
    ``(cat(prefix_k, k), cat(prefix_v, v))`` along the sequence and stores nothing.

    ``source()`` recomputes the prefix from the encoder on every ``update``: under reentrant checkpointing each
    layer's recomputation then backpropagates through a graph of its own (a graph shared by the layers would be
    freed by the first layer's backward).
    """

    def __init__(self, initial: KV, source: Callable[[], KV]) -> None:
        super().__init__()
        keys, values = initial
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values  # shapes for get_seq_length / masks; update uses fresh tensors
        self.source = source
        self.updates = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.updates += 1
        keys, values = self.source()
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)


class ReplayablePrefixCache(DynamicCache):
    """A ``DynamicCache`` of :class:`ReplayablePrefixLayer` (one per layer)."""

    def __init__(self, initial: Sequence[KV], sources: Sequence[Callable[[], KV]]) -> None:
        Cache.__init__(self, layers=[ReplayablePrefixLayer(kv, source) for kv, source in zip(initial, sources)])

    @property
    def updates(self) -> int:
        """How many times the model called ``update`` on any layer."""
        return sum(getattr(layer, "updates", 0) for layer in self.layers)


class PassThroughLayer(DynamicLayer):
    """A cache layer that stores nothing: ``update(k, v)`` returns ``(k, v)`` (cross-attention during a replayable
    forward, so a recomputation computes the same keys again instead of reading stored ones)."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return key_states, value_states


class _NeverUpdated(dict):  # type: ignore[type-arg]
    """``EncoderDecoderCache.is_updated`` that stays empty: cross-attention keys are always recomputed."""

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def prefix_cache(layers_kv: Callable[[], Sequence[KV]], encoder_decoder: bool, replayable: bool = False) -> Cache:
    """The cache holding the prefix ``layers_kv()`` (per layer ``(keys, values)``, each ``(B, heads, nvt,
    head_dim)``).

    For encoder-decoder models the prefix goes to the decoder's self-attention cache and the cross-attention cache
    starts empty (the encoder gets no prefix, as in the reference).
    """
    self_cache: DynamicCache
    if replayable:
        with torch.no_grad():
            initial = [(k.detach(), v.detach()) for k, v in layers_kv()]
        self_cache = ReplayablePrefixCache(initial, [_layer_source(layers_kv, i) for i in range(len(initial))])
    else:
        self_cache = DynamicCache(list(layers_kv()))
    if not encoder_decoder:
        return self_cache
    if not replayable:
        return EncoderDecoderCache(self_cache, DynamicCache())
    cache = EncoderDecoderCache(self_cache, Cache(layer_class_to_replicate=PassThroughLayer))
    cache.is_updated = _NeverUpdated()
    return cache


def _layer_source(layers_kv: Callable[[], Sequence[KV]], index: int) -> Callable[[], KV]:
    return lambda: layers_kv()[index]


def prefix_updates(cache: Cache) -> int:
    """Number of ``update`` calls a replayable prefix cache received (-1 for other caches)."""
    inner = getattr(cache, "self_attention_cache", cache)
    return inner.updates if isinstance(inner, ReplayablePrefixCache) else -1
