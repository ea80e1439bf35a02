"""``SharedAdapterTensors``: per-adapter tensors held once per model by the tuner and shared by all its layers."""

from __future__ import annotations

from torch import nn


class SharedAdapterTensors(nn.ParameterDict):
    """``holder[adapter_name] -> parameter``, an attribute of the tuner (VB-LoRA's ``vblora_vector_bank``).

    The adapter layers reference the holder without registering it, so each tensor exists once. Its checkpoint key
    is the holder's own path without the adapter name (``base_model.vblora_vector_bank``, as the reference saves
    it); the tuner drops an adapter's entry when the adapter is deleted or its injection is rolled back.
    """
