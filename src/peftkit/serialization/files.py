"""Reading and writing an adapter's files (config and safetensors or ``.bin`` weights), all or nothing."""

from __future__ import annotations

import io
import json
import math
import os
import re
import reprlib
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import CONFIG_NAME, PeftConfig, json_depth_exceeds
from ..errors import AdapterLoadError, AdapterMismatchError
from ..fileio import check_subfolder, resolve_file
from ..transaction import reading, replace_files

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


#: safetensors metadata key holding the ``adapter_config.json`` text saved together with the tensors
CONFIG_METADATA_KEY = "peftkit_adapter_config"
#: config fields that describe where an adapter came from, not what its tensors mean; users edit them by hand
#: (a moved base model), so a difference there does not make a config and its weights a mismatch
_DESCRIPTIVE_FIELDS = frozenset({"base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                                 "peft_version"})


def save_adapter_files(directory: str, config: PeftConfig, tensors: dict[str, torch.Tensor],
                       safe_serialization: bool = True) -> str:
    """Write one adapter into ``directory``: ``adapter_config.json`` (``config`` as is) and
    ``adapter_model.safetensors`` (or ``adapter_model.bin``), all or nothing (:func:`peftkit.transaction.
    replace_files`), removing the other format's weights file: it holds an older save, and a loader would prefer a
    stale ``adapter_model.safetensors`` to the new ``.bin``. No other file of ``directory`` is touched.

    The safetensors metadata keeps the config text under ``peftkit_adapter_config`` (the ``format: pt`` entry
    stays), so a load can tell a config and weights written by different saves apart (:func:`check_pair`).
    Returns the weights file's path."""
    tensors = _independent(tensors)
    config_text = config.to_json_string()
    if safe_serialization:
        from safetensors.torch import save_file

        metadata = {"format": "pt", CONFIG_METADATA_KEY: config_text}
        name, stale = SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
        write_weights = lambda tmp: save_file(tensors, tmp, metadata=metadata)
    else:
        name, stale = WEIGHTS_NAME, SAFETENSORS_WEIGHTS_NAME
        write_weights = lambda tmp: torch.save(tensors, tmp)
    write_config = lambda tmp: Path(tmp).write_text(config_text, encoding="utf-8")
    replace_files(directory, {name: write_weights, CONFIG_NAME: write_config}, remove=[stale])
    return os.path.join(directory, name)


def load_peft_weights(
    model_id: str | os.PathLike[str], device: str | torch.device | None = None, key_mapping: Any = None, **kwargs: Any
) -> dict[str, torch.Tensor]:
    """Read an adapter's tensors from a local directory or a Hub repo (``subfolder``, ``revision``, ...).

    Prefers ``adapter_model.safetensors``; falls back to ``adapter_model.bin`` read with ``weights_only=True``.
    Raises :class:`AdapterLoadError` naming the directory when neither exists, and naming the file when it cannot
    be read (truncated or corrupt).
    """
    subfolder = kwargs.pop("subfolder", None)
    with reading(local_directory(model_id, subfolder)):
        return _load_weights(model_id, device, subfolder, kwargs)[0]


def read_adapter(model_id: str | os.PathLike[str], config: PeftConfig | None = None,
                 device: str | torch.device | None = None, **kwargs: Any) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of the adapter saved in ``model_id`` (a directory or a Hub repo; ``subfolder``,
    ``revision``, ...), read together: a pending interrupted save is completed first, and a concurrent save cannot
    replace the files between the two reads (shared lock).

    ``config``: use this config instead of the saved one (then the pair is not checked). Otherwise a config and
    weights written by different saves raise :class:`AdapterMismatchError` (:func:`check_pair`)."""
    subfolder = kwargs.get("subfolder")
    hub = {k: v for k, v in kwargs.items() if k != "subfolder"}
    with reading(local_directory(model_id, subfolder)):
        chosen = config
        if chosen is None:
            chosen = PeftConfig.from_pretrained(model_id, **kwargs)
        tensors, metadata = _load_weights(model_id, device, subfolder, hub)
    if config is None:
        check_pair(chosen, metadata, str(model_id) + (f"/{subfolder}" if subfolder else ""))
    return chosen, tensors


def check_pair(config: PeftConfig, metadata: dict[str, str], where: str) -> None:
    """Raise :class:`AdapterMismatchError` when ``config`` (read from ``adapter_config.json``) differs from the
    config saved in the weights' metadata in a field that gives the tensors their meaning (every field except
    ``base_model_name_or_path``, ``revision``, ``inference_mode``, ``auto_mapping``, ``peft_version``). Weights
    without that metadata (``.bin``, files written by another library) are not checked."""
    text = metadata.get(CONFIG_METADATA_KEY)
    if text is None:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fields of a newer version: reported once, for the file's config
            if json_depth_exceeds(text):
                raise ValueError("nested too deeply")
            saved = json.loads(text)
            if not isinstance(saved, dict):
                raise TypeError("not a JSON object")
            saved_config = PeftConfig.from_dict(saved)
    except (ValueError, TypeError, RecursionError) as exc:
        raise AdapterMismatchError(f"the adapter weights in {where!r} carry an unreadable "
                                   f"{CONFIG_METADATA_KEY!r} metadata entry ({exc})") from None
    ours, theirs = json.loads(config.to_json_string()), json.loads(saved_config.to_json_string())
    fields = sorted((k for k in ours.keys() | theirs.keys()
                     if k not in _DESCRIPTIVE_FIELDS and ours.get(k) != theirs.get(k)),
                    key=lambda k: (k != "peft_type", k))  # another method first: it explains the rest
    if fields:
        shown = ", ".join(f"{k}: {_short(ours.get(k))} in {CONFIG_NAME} but {_short(theirs.get(k))} with the weights"
                          for k in fields[:5])
        raise AdapterMismatchError(
            f"{CONFIG_NAME} and the weights in {where!r} were written by different saves ({shown}); refusing to "
            "guess which is right. Save the adapter again, or pass config=PeftConfig.from_pretrained(...) to load "
            "the weights with a config of your choice")


def local_directory(model_id: str | os.PathLike[str], subfolder: str | None) -> str | None:
    """The local adapter directory ``model_id[/subfolder]``, or None when ``model_id`` is not a local directory
    (a Hub repo id)."""
    subfolder = check_subfolder(subfolder)
    if not os.path.isdir(model_id):
        return None
    return os.path.join(model_id, subfolder) if subfolder else os.fspath(model_id)


def _load_weights(model_id: str | os.PathLike[str], device: str | torch.device | None, subfolder: str | None,
                  hub: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, safetensors metadata)`` of the adapter in ``model_id`` (metadata empty for ``.bin``)."""
    device = device or "cpu"
    path = resolve_file(model_id, SAFETENSORS_WEIGHTS_NAME, subfolder, **hub)
    if path is not None:
        return _read_safetensors(path, str(device))
    path = resolve_file(model_id, WEIGHTS_NAME, subfolder, **hub)
    if path is not None:
        return _read_bin(path, device), {}
    where = str(model_id) + (f"/{subfolder}" if subfolder else "")
    raise AdapterLoadError(f"no adapter weights in {where!r}: expected {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME}")


def _read_safetensors(path: str, device: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of the file; the tensors are owned by the caller: never views of a memory map of
    the file (which another writer could change), so a loader may adopt them as parameters without copying."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if torch.device(device).type == "cpu":
        read = _read_whole_file(path)
        if read is not None:
            return read
    try:
        loaded = load_file(path, device=device)
        with safe_open(path, framework="pt") as fh:
            metadata = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
        raise AdapterLoadError(f"cannot read adapter weights {path!r} (truncated or corrupt?): {exc}") from exc
    return ({k: v.clone() for k, v in loaded.items()} if torch.device(device).type == "cpu" else loaded), metadata


#: safetensors dtype names -> torch dtypes read by :func:`_read_whole_file` (others go through ``load_file``)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

#: bits per element of every dtype the ``safetensors`` library (0.8) knows; any other name is refused
_ST_DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
                  "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
                  "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}

#: the library's limit on the header length (``MAX_HEADER_SIZE``)
_MAX_HEADER = 100_000_000
#: the library's JSON parser (serde_json) refuses documents nested 128 arrays/objects deep or more
_MAX_DEPTH = 127
#: every size and offset in a header is a Rust ``usize``
_USIZE_END = 2**64
_FIELDS = ("dtype", "shape", "data_offsets")
_SURROGATE = re.compile("[\ud800-\udfff]")
_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist = 80, 80, 8


def _short(value: object) -> str:
    """``repr(value)``, cut short: header values in messages can be megabytes long."""
    return _REPR.repr(value)


class _Malformed(Exception):
    """A header the ``safetensors`` library refuses; the message says why."""


class _Object(list):  # type: ignore[type-arg]
    """A JSON object as its ``(key, value)`` pairs in file order, duplicates kept (``object_pairs_hook``)."""


def _read_whole_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """Read a little-endian safetensors file straight into one fresh tensor per entry (``readinto``: one copy, no
    memory map, no storage shared between tensors).

    The header is validated as the ``safetensors`` library validates it (:func:`_parse_header`); a file it refuses
    raises :class:`AdapterLoadError` naming the file and the problem. None when the file is valid but not plain
    (a dtype torch reads only through the library, a tensor torch cannot allocate, a short read, a big-endian
    host): ``load_file`` then reads it."""
    if sys.byteorder != "little":
        return None
    size = os.path.getsize(path)
    with open(path, "rb", buffering=0) as f:
        try:
            start, specs, metadata = _parse_header(f, size)
        except _Malformed as exc:
            raise AdapterLoadError(f"cannot read adapter weights {path!r} (truncated or corrupt?): {exc}") from None
        if any(dtype not in _ST_DTYPES for dtype, _, _ in specs.values()):
            return None
        try:
            tensors = {key: torch.empty(shape, dtype=_ST_DTYPES[dtype]) for key, (dtype, shape, _) in specs.items()}
        except (RuntimeError, ValueError, TypeError, OverflowError):  # e.g. (0, 2**32, 2**32): strides overflow
            return None
        if not _read_into(f, start, [(specs[key][2], tensor) for key, tensor in tensors.items()]):
            return None
    return tensors, metadata


def _parse_header(f: io.FileIO, size: int) -> tuple[int, dict[str, tuple[str, list[int], int]], dict[str, str]]:
    """``(data start, {name: (dtype name, shape, begin)}, metadata)`` of the file ``f`` of ``size`` bytes, checked as the
    library checks it: the header length is at most 100 MB and inside the file; the header is a UTF-8 JSON object
    (nesting below 128, no NaN, numbers in range, no lone surrogate); ``__metadata__`` is null or str -> str; each
    entry has a known dtype, a shape of non-negative ints and ``data_offsets`` ``[begin, end]``; sorted, the
    entries tile the data section from 0 to its end without gaps or overlaps, each ``end - begin`` being
    ``numel * itemsize``. Also refused (the library keeps the last): one tensor named twice."""
    head = f.read(8)
    if len(head) != 8:
        raise _Malformed(f"the file has {size} bytes, fewer than the 8-byte header length")
    length = int.from_bytes(head, "little")
    if length > _MAX_HEADER:
        raise _Malformed(f"header length {length} exceeds the limit of {_MAX_HEADER} bytes")
    if 8 + length > size:
        raise _Malformed(f"header length {length} runs past the end of the file ({size} bytes)")
    raw = f.read(length)
    while len(raw) < length:  # FileIO.read is one system call: it may stop short
        more = f.read(length - len(raw))
        if not more:
            raise _Malformed(f"the file ended inside its {length}-byte header")
        raw += more
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Malformed(f"the header is not UTF-8: {exc}") from None
    header = _parse_json(text)
    if not isinstance(header, _Object):
        raise _Malformed("the header is not a JSON object")
    specs: dict[str, tuple[str, list[int], int]] = {}
    spans: list[tuple[int, int, str]] = []
    seen_metadata = False
    metadata: dict[str, str] = {}
    for key, value in header:
        if key == "__metadata__":
            if seen_metadata:
                raise _Malformed("'__metadata__' appears more than once")
            seen_metadata = True
            if value is not None and not (isinstance(value, _Object) and all(isinstance(v, str) for _, v in value)):
                raise _Malformed(f"'__metadata__' must be null or an object of strings, not {_short(value)}")
            metadata = dict(value) if value is not None else {}
            continue
        if key in specs:
            raise _Malformed(f"tensor {_short(key)} appears more than once")
        dtype, shape, begin, end = _tensor_entry(key, value)
        specs[key] = (dtype, shape, begin)
        spans.append((begin, end, key))
    _check_spans(spans, specs, size - 8 - length)
    return 8 + length, specs, metadata


def _parse_json(text: str) -> object:
    """``text`` parsed as serde_json would accept it, objects as :class:`_Object`. Nesting is bounded by
    Python's recursion limit here (``RecursionError`` is refused) and checked exactly where a header can nest
    (:func:`_tensor_entry`)."""
    hooks: dict[str, Any] = {"object_pairs_hook": _Object, "parse_constant": _no_constant,
                             "parse_float": _finite_float}
    if "-0" in text:  # serde reads "-0" as a float, never as a size: keep negative literals negative
        hooks["parse_int"] = _unsigned_int
    try:
        value = json.loads(text, **hooks)
    except (ValueError, RecursionError) as exc:
        raise _Malformed(f"the header is not valid JSON: {exc}") from None
    if "\\u" in text and _has_lone_surrogate(value):
        raise _Malformed("the header's JSON holds a lone UTF-16 surrogate escape")
    return value


def _deeper_than(value: object, limit: int) -> bool:
    """Whether the JSON ``value`` nests arrays/objects more than ``limit`` levels (a scalar is 0 deep); stops
    descending at ``limit``."""
    if not isinstance(value, list):
        return False
    if limit <= 0:
        return True
    items = (v for _, v in value) if isinstance(value, _Object) else iter(value)
    return any(_deeper_than(v, limit - 1) for v in items)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise ValueError(f"number out of range: {literal}")
    return value


def _unsigned_int(literal: str) -> int:
    """serde_json reads ``-0`` as a float and other negatives as ``i64``: neither is a size, so -1 stands in."""
    return -1 if literal.startswith("-") else int(literal)


def _has_lone_surrogate(value: object) -> bool:
    """Whether a string anywhere in the parsed ``value`` holds an unpaired surrogate (paired escapes decode to one
    astral character; raw UTF-8 cannot encode surrogates). Iterative: ``value`` may nest deeply."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item) is not None:
                return True
        elif isinstance(item, _Object):
            stack.extend(k for pair in item for k in pair)
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _tensor_entry(key: str, info: object) -> tuple[str, list[int], int, int]:
    """``(dtype name, shape, begin, end)`` of the header entry ``key``: an object with ``dtype``, ``shape``,
    ``data_offsets`` (other fields ignored; each of these at most once) or, as serde also accepts, the list of
    those three values."""
    if isinstance(info, _Object):
        fields: dict[str, object] = {}
        for name, value in info:
            if name in _FIELDS:
                if name in fields:
                    raise _Malformed(f"tensor {_short(key)}: field {_short(name)} appears more than once")
                fields[name] = value
            elif _deeper_than(value, _MAX_DEPTH - 2):  # the header object and this entry hold the field
                raise _Malformed(f"tensor {_short(key)}: field {_short(name)} nests JSON more than {_MAX_DEPTH} levels deep")
        missing = [name for name in _FIELDS if name not in fields]
        if missing:
            raise _Malformed(f"tensor {_short(key)}: missing field {missing[0]!r}")
        dtype, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
    elif isinstance(info, list) and len(info) == 3:
        dtype, shape, offsets = info
    else:
        raise _Malformed(f"tensor {_short(key)}: entry must be an object with {list(_FIELDS)}, not {_short(info)}")
    if not isinstance(dtype, str) or dtype not in _ST_DTYPE_BITS:
        raise _Malformed(f"tensor {_short(key)}: dtype {_short(dtype)} is not one of {sorted(_ST_DTYPE_BITS)}")
    if not _is_usizes(shape):
        raise _Malformed(f"tensor {_short(key)}: shape {_short(shape)} must be a list of non-negative integers")
    if not _is_usizes(offsets) or len(offsets) != 2:  # type: ignore[arg-type]
        raise _Malformed(f"tensor {_short(key)}: data_offsets {_short(offsets)} must be [begin, end], non-negative integers")
    return dtype, shape, offsets[0], offsets[1]  # type: ignore[index,return-value]


def _is_usizes(value: object) -> bool:
    """Whether ``value`` is a JSON array of integers that fit a ``usize`` (``bool`` is not an integer here)."""
    if type(value) is not list:
        return False
    for v in value:
        if type(v) is not int or not 0 <= v < _USIZE_END:
            return False
    return True


def _check_spans(spans: list[tuple[int, int, str]], specs: dict[str, tuple[str, list[int], int]], data_len: int) -> None:
    """The ``(begin, end, name)`` spans, sorted, tile ``[0, data_len)`` exactly, and each spans ``numel`` elements
    of its dtype (products checked for ``usize`` overflow at every step, as the library does)."""
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position or end < begin:
            what = "a gap before it" if begin > position else "it overlaps another tensor"
            raise _Malformed(f"tensor {_short(key)}: invalid data_offsets [{begin}, {end}] ({what}; expected begin {position})")
        position = end
        dtype, shape, _ = specs[key]
        numel = 1
        for d in shape:
            numel *= d
            if numel >= _USIZE_END:
                raise _Malformed(f"tensor {_short(key)}: shape {_short(shape)} overflows a 64-bit element count")
        bits = numel * _ST_DTYPE_BITS[dtype]
        if bits >= _USIZE_END:
            raise _Malformed(f"tensor {_short(key)}: shape {_short(shape)} overflows a 64-bit bit count")
        if bits % 8:
            raise _Malformed(f"tensor {_short(key)}: {numel} elements of {dtype} do not fill whole bytes")
        if end - begin != bits // 8:
            raise _Malformed(f"tensor {_short(key)}: data_offsets [{begin}, {end}] span {end - begin} bytes, but shape "
                             f"{_short(shape)} of {dtype} needs {bits // 8}")
    if position != data_len:
        raise _Malformed(f"the tensors cover {position} bytes of the {data_len}-byte data section")


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


def _read_bin(path: str, device: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise AdapterLoadError(f"cannot read adapter weights {path!r} (truncated or corrupt?): {exc}") from exc
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{path!r} does not hold a dict of tensors")
    return data
