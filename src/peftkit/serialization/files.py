"""Reading and writing adapter weight files (safetensors or ``.bin``), atomically."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import AdapterLoadError
from ..fileio import atomic_write, resolve_file

SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"


def _independent(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that share no storage (safetensors refuses shared storage)."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach()
        ident = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()) if tensor.numel() else None
        if not tensor.is_contiguous() or (ident is not None and ident in seen):
            tensor = tensor.contiguous().clone()
        if ident is not None:
            seen.add(ident)
        out[key] = tensor.cpu() if tensor.device.type != "cpu" else tensor
    return out


def save_weights(tensors: dict[str, torch.Tensor], directory: str, safe_serialization: bool = True) -> str:
    """Write ``tensors`` to ``adapter_model.safetensors`` (or ``adapter_model.bin``) in ``directory``, atomically.

    Returns the written path.
    """
    os.makedirs(directory, exist_ok=True)
    tensors = _independent(tensors)
    if safe_serialization:
        from safetensors.torch import save_file

        path = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    else:
        path = os.path.join(directory, WEIGHTS_NAME)
        atomic_write(path, lambda tmp: torch.save(tensors, tmp))
    return path


def load_peft_weights(
    model_id: str | os.PathLike[str], device: str | torch.device | None = None, key_mapping: Any = None, **kwargs: Any
) -> dict[str, torch.Tensor]:
    """Read an adapter's tensors from a local directory or a Hub repo (``subfolder``, ``revision``, ...).

    Prefers ``adapter_model.safetensors``; falls back to ``adapter_model.bin`` read with ``weights_only=True``.
    Raises :class:`AdapterLoadError` naming the directory when neither exists, and naming the file when it cannot
    be read (truncated or corrupt).
    """
    subfolder = kwargs.pop("subfolder", None)
    device = device or "cpu"
    path = resolve_file(model_id, SAFETENSORS_WEIGHTS_NAME, subfolder, **kwargs)
    if path is not None:
        return _read_safetensors(path, str(device))
    path = resolve_file(model_id, WEIGHTS_NAME, subfolder, **kwargs)
    if path is not None:
        return _read_bin(path, device)
    where = str(model_id) + (f"/{subfolder}" if subfolder else "")
    raise AdapterLoadError(f"no adapter weights in {where!r}: expected {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME}")


def _read_safetensors(path: str, device: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path, device=device)
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
        raise AdapterLoadError(f"cannot read adapter weights {path!r} (truncated or corrupt?): {exc}") from exc


def _read_bin(path: str, device: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise AdapterLoadError(f"cannot read adapter weights {path!r} (truncated or corrupt?): {exc}") from exc
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{path!r} does not hold a dict of tensors")
    return data
