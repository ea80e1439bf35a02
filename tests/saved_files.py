"""Helpers that rewrite saved adapter files the way other writers leave them."""

from __future__ import annotations

import os

from safetensors import safe_open
from safetensors.torch import load_file, save_file


def drop_saved_config(directory: str | os.PathLike[str]) -> None:
    """Rewrite ``adapter_model.safetensors`` in ``directory`` without peftkit's ``peftkit_adapter_config`` metadata
    entry, as the reference (or any other writer) saves it: a hand-edited ``adapter_config.json`` is then not
    caught as a mismatch by the pairing check, so the checks behind it (shapes) are what a load runs into."""
    path = os.path.join(directory, "adapter_model.safetensors")
    with safe_open(path, framework="pt") as fh:
        metadata = {k: v for k, v in (fh.metadata() or {}).items() if k != "peftkit_adapter_config"}
    save_file(load_file(path), path, metadata=metadata)
