"""Per-adapter buffers of a layer: ``holder[adapter_name] -> tensor``, moved and cast with the module, never
trained (the reference's ``BufferDict``)."""

from __future__ import annotations

from collections.abc import Iterator, KeysView

import torch
from torch import nn


class BufferDict(nn.Module):
    """Per-adapter persistent buffers: ``holder[name]`` is a tensor (saved as ``<attr>`` without the adapter
    name, in memory ``<attr>.<name>``); moved and cast with the module. Buffers are never trained."""

    #: whether the buffers are in ``state_dict`` (and so in saved adapters)
    persistent: bool = True

    def __contains__(self, name: object) -> bool:
        return name in self._buffers

    def __getitem__(self, name: str) -> torch.Tensor:
        buffer = self._buffers[name]
        assert buffer is not None
        return buffer

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value, persistent=self.persistent)

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)

    def keys(self) -> KeysView[str]:
        return self._buffers.keys()


class FrozenBuffers(BufferDict):
    """Non-persistent per-adapter buffers (absent from ``state_dict`` and from saved adapters, as the reference's
    ``BufferDict(persistent=False)``): factors rebuilt from the base weight."""

    persistent = False
