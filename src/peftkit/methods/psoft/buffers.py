"""``FrozenBuffers``: per-adapter tensors that move and cast with the layer but are neither trained nor saved."""

from __future__ import annotations

from collections.abc import Iterator, KeysView

import torch
from torch import nn


class FrozenBuffers(nn.Module):
    """``holder[adapter_name] -> tensor``: non-persistent buffers (absent from ``state_dict`` and from saved
    adapters, as the reference's ``BufferDict(persistent=False)``): factors rebuilt from the base weight."""

    def __contains__(self, name: object) -> bool:
        return name in self._buffers

    def __getitem__(self, name: str) -> torch.Tensor:
        buffer = self._buffers[name]
        assert buffer is not None
        return buffer

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value, persistent=False)

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)

    def keys(self) -> KeysView[str]:
        return self._buffers.keys()
