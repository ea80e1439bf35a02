"""``FrozenBuffers``: per-adapter tensors that move and cast with the layer but are neither trained nor saved
(defined in :mod:`peftkit.layers.buffers`, kept importable here)."""

from __future__ import annotations

from ...layers.buffers import FrozenBuffers

__all__ = ["FrozenBuffers"]
