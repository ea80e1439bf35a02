"""Activated LoRA (aLoRA, ``LoraConfig.alora_invocation_tokens``): the adapter acts only from the invocation.

For each row of a batch the input ids are searched for the *last* occurrence of the invocation token sequence;
its start, counted from the end of the row, is the row's *offset* (``len(row) - start``, so at least
``len(alora_invocation_tokens)``), None when the sequence does not occur. A targeted ``nn.Linear`` then computes

    y[b, t] = base(x)[b, t] + [t >= T - offset_b] * scaling * B(A(dropout(x[b, t])))

for ``x: (batch, T, in)``: the positions before the invocation see the base model only, so the base model's KV cache
for a prompt can be reused when the adapter is invoked on it. During ``generate`` the offsets are computed once
from the prompt; each decoding step (``T = 1`` with a KV cache) has ``min(offset, T) = 1``, so every generated token
is adapted. A row without the invocation (offset None), or a call without ``input_ids`` (only ``inputs_embeds``),
gets the base model. This is the reference's semantics (``peft/tuners/lora/variants.py``: ``ALoraLinearVariant``,
``calculate_alora_offsets``).

The offsets reach the layers through the tuner (:class:`ALoraTunerMixin`): its ``forward`` and ``generate`` compute
them (or take ``alora_offsets=[...]`` from the caller) and leave them on the LoRA layers until the next call, so a
gradient-checkpointing recomputation during backward sees the same offsets. aLoRA adapts ``nn.Linear`` (and
quantized linears) only, cannot be combined with DoRA, cannot be merged, and does not run in mixed batches
(``adapter_names=...``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ...errors import MergeError, PeftWarning
from .variants import LoraVariant

if TYPE_CHECKING:
    from .layers import LoraLayer

#: attribute of a LoRA layer holding the current call's offsets (``list[int | None]`` per row, or None)
OFFSETS_ATTR = "_alora_offsets"


class ALoraMergeError(MergeError, NotImplementedError):
    """aLoRA adapters cannot be merged: the update depends on the token position (the reference raises
    ``NotImplementedError``)."""


def invocation_offsets(input_ids: torch.Tensor, invocation: Sequence[int]) -> list[int | None]:
    """Per row of ``input_ids: (batch, T)`` (or ``(T,)``, one row), ``T - start`` of the last occurrence of
    ``invocation`` in the row, or None where it does not occur (the reference's ``calculate_alora_offsets``)."""
    ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
    n = len(invocation)
    T = ids.shape[-1]
    if n == 0 or n > T:
        return [None] * ids.shape[0]
    pattern = torch.as_tensor(list(invocation), dtype=ids.dtype, device=ids.device)
    hits = (ids.unfold(1, n, 1) == pattern).all(-1)  # (batch, T - n + 1): a match starts here
    offsets: list[int | None] = []
    for row in hits:
        starts = row.nonzero()
        offsets.append(None if starts.numel() == 0 else T - int(starts[-1]))
    return offsets


def position_mask(offsets: Sequence[int | None] | None, batch: int, T: int, device: torch.device) -> torch.Tensor:
    """``(batch, T)`` bool: True at the last ``min(offset_b, T)`` positions of row ``b`` (none for a None offset,
    none at all when ``offsets`` is None)."""
    if offsets is None:
        return torch.zeros(batch, T, dtype=torch.bool, device=device)
    counts = torch.tensor([0 if o is None else min(int(o), T) for o in offsets], dtype=torch.long, device=device)
    return torch.arange(T, device=device).unsqueeze(0) >= (T - counts).unsqueeze(1)


class ALoraVariant(LoraVariant):
    """aLoRA on a linear layer: the low-rank update on the positions from the invocation on (see the module doc)."""

    name = "aLoRA"
    mergeable = False

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor,
                base_out: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``x: (batch, T, in)`` or ``(batch, in)``, ``result: (..., out)``: ``result`` plus the update on the masked
        positions (out of place)."""
        lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        batch = result.shape[0]
        T = result.shape[1] if result.dim() == 3 else 1
        mask = position_mask(getattr(layer, OFFSETS_ATTR, None), batch, T, result.device).reshape(-1)  # (batch*T,)
        x_rows = x.reshape(-1, x.shape[-1])[mask].to(lora_A.weight.dtype)  # the positions that get the update
        update = lora_B(lora_A(layer.lora_dropout[adapter_name](x_rows))) * layer.scaling[adapter_name]
        flat = result.reshape(-1, result.shape[-1])
        # index_put (accumulate) with the bool mask keeps only the mask for backward (the same one the gather
        # keeps); index_add would also keep ``update``, a (rows, out) tensor per layer
        return flat.index_put((mask,), update.to(flat.dtype), accumulate=True).view(result.shape)

    def merge(self, layer: LoraLayer, adapter_name: str, safe_merge: bool) -> None:
        raise ALoraMergeError(f"aLoRA does not support merging (adapter {adapter_name!r}): its update depends on "
                              "the token position; use unload() or keep it unmerged")


def set_offsets(layers: Any, offsets: Sequence[int | None] | None) -> None:
    """Leave ``offsets`` on every LoRA layer of ``layers`` for the calls that follow."""
    from .layers import LoraLayer

    for layer in layers:
        if isinstance(layer, LoraLayer):
            layer.__dict__[OFFSETS_ATTR] = None if offsets is None else list(offsets)


class ALoraTunerMixin:
    """Mixed into ``LoraModel``: ``forward`` / ``generate`` compute the aLoRA offsets of the active adapter from
    ``input_ids`` (or take ``alora_offsets=[...]``) and hand them to the layers. Without an aLoRA adapter active
    this costs one config lookup per model call."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._prepare_alora(args, kwargs, "forward")
        return super().forward(*args, **kwargs)  # type: ignore[misc]

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self._prepare_alora(args, kwargs, "generate")
        return self.model.generate(*args, **kwargs)  # type: ignore[attr-defined]

    def _prepare_alora(self, args: tuple[Any, ...], kwargs: dict[str, Any], entry: str) -> None:
        given = kwargs.pop("alora_offsets", None)
        invocation = self._alora_invocation()
        if invocation is None and given is None:
            return
        offsets = given
        if offsets is None:
            input_ids = kwargs.get("input_ids")
            if input_ids is None and args and isinstance(args[0], torch.Tensor):
                input_ids = args[0]
            if input_ids is None:
                warnings.warn(f"Cannot calculate aLoRA offsets without input_ids (in {entry}); the aLoRA adapter is "
                              "disabled for this call.", PeftWarning, stacklevel=4)
            else:
                assert invocation is not None
                offsets = invocation_offsets(input_ids, invocation)
        num_beams = kwargs.get("num_beams")
        if entry == "generate" and offsets is not None and isinstance(num_beams, int) and num_beams > 1:
            raise ValueError("Beam search not yet supported for aLoRA.")
        set_offsets(self.adapter_layers(), offsets)  # type: ignore[attr-defined]

    def _alora_invocation(self) -> list[int] | None:
        """``alora_invocation_tokens`` of the active adapter (the first one), or None."""
        active = self.active_adapters  # type: ignore[attr-defined]
        config = self.peft_config.get(active[0]) if active else None  # type: ignore[attr-defined]
        return getattr(config, "alora_invocation_tokens", None) or None
