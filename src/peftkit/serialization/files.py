"""Reading and writing adapter weight files (safetensors or ``.bin``), atomically."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import sys
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
    """Write ``tensors`` to ``adapter_model.safetensors`` (or ``adapter_model.bin``) in ``directory``, atomically,
    then remove the other format's file from ``directory`` if there is one: it holds an older save, and the loader
    would prefer a stale ``adapter_model.safetensors`` to the new ``.bin``. No other file is touched.

    Returns the written path.
    """
    os.makedirs(directory, exist_ok=True)
    tensors = _independent(tensors)
    if safe_serialization:
        from safetensors.torch import save_file

        path, stale = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME), os.path.join(directory, WEIGHTS_NAME)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    else:
        path, stale = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
        atomic_write(path, lambda tmp: torch.save(tensors, tmp))
    _remove_stale(stale)
    return path


def _remove_stale(path: str) -> None:
    """Remove the file (or symlink) ``path`` if it exists; a directory of that name is left alone."""
    if os.path.islink(path) or os.path.isfile(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


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
    """The file's tensors, owned by the caller: never views of a memory map of the file (which another writer
    could change), so a loader may adopt them as parameters without copying."""
    from safetensors.torch import load_file

    if torch.device(device).type == "cpu":
        tensors = _read_whole_file(path)
        if tensors is not None:
            return tensors
    try:
        loaded = load_file(path, device=device)
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
        raise AdapterLoadError(f"cannot read adapter weights {path!r} (truncated or corrupt?): {exc}") from exc
    return {k: v.clone() for k, v in loaded.items()} if torch.device(device).type == "cpu" else loaded


#: safetensors dtype names -> torch dtypes read by :func:`_read_whole_file` (others go through ``load_file``)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _read_whole_file(path: str) -> dict[str, torch.Tensor] | None:
    """Read a little-endian safetensors file straight into one fresh tensor per entry (``readinto``: one copy, no
    memory map, no storage shared between tensors). None when the file is anything but plain and consistent
    (unknown dtype, overlapping or out-of-range offsets, a short read, a big-endian host): ``load_file`` then reads
    it and reports errors."""
    if sys.byteorder != "little":
        return None
    size = os.path.getsize(path)
    with open(path, "rb", buffering=0) as f:
        head = f.read(8)
        if len(head) != 8:
            return None
        start = 8 + int.from_bytes(head, "little")
        if start > size:
            return None
        try:
            header = json.loads(f.read(start - 8))
        except ValueError:
            return None
        if not isinstance(header, dict):
            return None
        specs = {}
        for key, info in header.items():
            if key != "__metadata__":
                spec = _tensor_spec(info, size - start)
                if spec is None:
                    return None
                specs[key] = spec
        spans = sorted((begin, end) for _, _, begin, end in specs.values())
        if any(a[1] > b[0] for a, b in itertools.pairwise(spans)) or (spans[-1][1] if spans else 0) != size - start:
            return None
        tensors = {key: torch.empty(shape, dtype=dtype) for key, (dtype, shape, _, _) in specs.items()}
        if not _read_into(f, start, [(specs[key][2], tensor) for key, tensor in tensors.items()]):
            return None
    return tensors


#: buffers per ``preadv`` call (Linux's IOV_MAX is 1024)
_IOV_MAX = 1024


def _read_into(f: io.FileIO, start: int, targets: list[tuple[int, torch.Tensor]]) -> bool:
    """Fill each tensor from the file bytes at ``start + offset``; the tensors tile the data section without gaps
    (checked by the caller). One ``preadv`` per 1024 tensors (a scatter read: one system call, no seeks) where
    the OS has it, else a seek and ``readinto`` per tensor. False on a short read."""
    ordered = sorted(((offset, t) for offset, t in targets if t.numel()), key=lambda item: item[0])
    views = [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for _, t in ordered]
    if not hasattr(os, "preadv"):
        for (offset, _), view in zip(ordered, views):
            f.seek(start + offset)
            if f.readinto(view) != len(view):
                return False
        return True
    for i in range(0, len(views), _IOV_MAX):
        chunk = views[i:i + _IOV_MAX]
        offset = start + ordered[i][0]
        want = sum(len(v) for v in chunk)
        got = os.preadv(f.fileno(), chunk, offset)
        while 0 < got < want:  # a partial read (signals, huge requests): continue where it stopped
            chunk = _advance(chunk, got)
            offset, want = offset + got, want - got
            got = os.preadv(f.fileno(), chunk, offset) if chunk else 0
        if got != want:
            return False
    return True


def _advance(views: list[memoryview], count: int) -> list[memoryview]:
    """``views`` without their first ``count`` bytes."""
    for i, view in enumerate(views):
        if count < len(view):
            return [view[count:], *views[i + 1:]]
        count -= len(view)
    return []


def _tensor_spec(info: object, data_len: int) -> tuple[torch.dtype, list[int], int, int] | None:
    """``(dtype, shape, begin, end)`` of one header entry, None if it is malformed or out of range."""
    if not isinstance(info, dict):
        return None
    dtype = _ST_DTYPES.get(info.get("dtype"))  # type: ignore[arg-type]
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if dtype is None or not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
        return None
    if not all(isinstance(d, int) and d >= 0 for d in shape) or not all(isinstance(o, int) for o in offsets):
        return None
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    if not 0 <= begin <= end <= data_len or end - begin != numel * dtype.itemsize:
        return None
    return dtype, shape, begin, end


def _read_bin(path: str, device: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise AdapterLoadError(f"cannot read adapter weights {path!r} (truncated or corrupt?): {exc}") from exc
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{path!r} does not hold a dict of tensors")
    return data
