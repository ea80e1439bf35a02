"""peftkit's own safetensors reader (``serialization.files._read_safetensors``) against the ``safetensors`` library.

The reader must accept exactly the files the library accepts (same tensors, byte for byte) and reject every other
file with :class:`AdapterLoadError`, never with another exception and never by returning shifted tensors. The one
deliberate difference: a header naming a tensor twice is rejected even where the library keeps the last entry.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from peftkit.errors import AdapterLoadError
from peftkit.serialization import files as files_module

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_ALL_DTYPE_NAMES = [*_DTYPES, "F8_E4M3", "F8_E5M2", "U16", "F4", "C64", "Q32", "f32", ""]


def _entry(begin: int, end: int, shape: Any = (1,), dtype: Any = "F32") -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape, "data_offsets": [begin, end]}


def _file(header: bytes | dict[str, Any], data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _write(directory: str, blob: bytes, name: str = "adapter_model.safetensors") -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(blob)
    return path


def _library(path: str) -> dict[str, torch.Tensor] | None:
    """The library's tensors, or None where it refuses the file (any exception: its own error, or torch's)."""
    try:
        return load_file(path)
    except Exception:  # noqa: BLE001 - any refusal counts, whatever its type
        return None


def _peftkit(path: str) -> dict[str, torch.Tensor] | None:
    """peftkit's tensors, or None for AdapterLoadError; any other exception escapes and fails the test."""
    try:
        return files_module._read_safetensors(path, "cpu")[0]
    except AdapterLoadError as exc:
        assert path in str(exc)  # the error names the file
        return None


def _bytes_of(t: torch.Tensor) -> bytes:
    """The tensor's bytes; for ``bool``, one 0/1 byte per element (a file byte 2 is "true", and torch may keep it
    as 2 or make it 1 when copying)."""
    raw = t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.zeros(0, dtype=torch.uint8)
    return (raw != 0).to(torch.uint8).numpy().tobytes() if t.dtype == torch.bool else raw.numpy().tobytes()


def _assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and ours[key].shape == tensor.shape
        assert _bytes_of(ours[key]) == _bytes_of(tensor)  # the same file bytes, read two ways: exact equality


def _deep(depth: int) -> bytes:
    """A header whose one tensor entry carries an extra field nested so that the document is ``depth`` deep."""
    inner = b"[" * (depth - 2) + b"]" * (depth - 2)
    return b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"z":' + inner + b"}}"


_D4, _D8 = b"\1\2\3\4", b"\1\2\3\4\5\6\7\x08"
_A = b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
_B = b'{"dtype":"F32","shape":[1],"data_offsets":[4,8]}'

#: files the library refuses: (name, file bytes)
MALFORMED: list[tuple[str, bytes]] = [
    ("gap_between_tensors", _file({"a": _entry(0, 4), "b": _entry(8, 12)}, b"\0" * 12)),
    ("gap_at_start", _file({"a": _entry(4, 8)}, _D8)),
    ("duplicate_tensor_name", _file(b'{"a":' + _A + b',"a":' + _B + b"}", _D8)),
    ("overlapping_tensors", _file({"a": _entry(0, 8, (2,)), "b": _entry(4, 8)}, _D8)),
    ("end_short_of_data_length", _file({"a": _entry(0, 4)}, _D8)),
    ("end_past_data_length", _file({"a": _entry(0, 8, (2,))}, _D4)),
    ("begin_after_end", _file({"a": _entry(4, 0, (0,)), "b": _entry(0, 4)}, _D4)),
    ("byte_count_differs_from_shape", _file({"a": _entry(0, 8, (1,))}, _D8)),
    ("byte_count_differs_from_dtype", _file({"a": _entry(0, 4, (1,), "F16")}, _D4)),
    ("unknown_dtype", _file({"a": _entry(0, 4, (1,), "Q32")}, _D4)),
    ("dtype_not_a_string", _file({"a": _entry(0, 4, (1,), 32)}, _D4)),
    ("negative_dim", _file({"a": _entry(0, 4, [-1])}, _D4)),
    ("negative_zero_dim", _file(b'{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}')),
    ("float_dim", _file({"a": _entry(0, 4, [1.0])}, _D4)),
    ("bool_dim", _file({"a": _entry(0, 4, [True])}, _D4)),
    ("dim_beyond_u64", _file({"a": _entry(0, 0, [2**64, 0])})),
    ("numel_overflows_u64", _file({"a": _entry(0, 0, [2**32, 2**32, 0])})),
    ("shape_not_a_list", _file({"a": _entry(0, 4, None)}, _D4)),
    ("missing_data_offsets", _file({"a": {"dtype": "F32", "shape": [1]}}, _D4)),
    ("three_data_offsets", _file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}}, _D4)),
    ("duplicate_dtype_field", _file(b'{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', _D4)),
    ("entry_not_an_object", _file({"a": 5})),
    ("header_length_over_100MB", _file(b"{}", length=100_000_001)),
    ("header_length_2_64_minus_1", _file(b"{}", length=2**64 - 1)),
    ("header_length_beyond_file", _file(b"{}", length=3)),
    ("file_shorter_than_8_bytes", b"\2\0\0"),
    ("header_not_utf8", _file(b'{"\xff":' + _A + b"}", _D4)),
    ("header_not_json", _file(b"{not json}")),
    ("header_trailing_characters", _file(b"{}x")),
    ("header_utf8_bom", _file(b"\xef\xbb\xbf{}")),
    ("header_top_level_array", _file(b"[]")),
    ("header_nan", _file(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"z":NaN}}', _D4)),
    ("header_number_out_of_range", _file(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"z":1e400}}', _D4)),
    ("header_lone_surrogate", _file(b'{"__metadata__":{"a":"\\ud800"}}')),
    ("metadata_value_not_str", _file({"__metadata__": {"format": 1}})),
    ("metadata_not_a_dict", _file({"__metadata__": [["format", "pt"]]})),
    ("metadata_twice", _file(b'{"__metadata__":{},"__metadata__":{}}')),
    ("json_nesting_128", _file(_deep(128), _D4)),
    ("json_nesting_5000", _file(_deep(5000), _D4)),  # deeper than Python's recursion limit
    ("json_nesting_100000_in_metadata", _file(b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}")),
]

#: unusual files the library accepts
VALID: list[tuple[str, bytes]] = [
    ("leading_and_trailing_whitespace", _file(b" \t" + json.dumps({"a": _entry(0, 4)}).encode() + b"   ", _D4)),
    ("null_metadata", _file({"__metadata__": None, "a": _entry(0, 4)}, _D4)),
    ("metadata_key_twice", _file(b'{"__metadata__":{"k":"1","k":"2"},"a":' + _A + b"}", _D4)),
    ("no_tensors", _file(b"{}")),
    ("empty_tensors_share_offsets", _file({"e": _entry(0, 0, (0, 3)), "f": _entry(4, 4, (2, 0)), "a": _entry(0, 4),
                                           "b": _entry(4, 8)}, _D8)),
    ("unknown_fields_and_nesting_127", _file(_deep(127), _D4)),
    ("entry_as_positional_list", _file(b'{"a":["F32",[1],[0,4]]}', _D4)),
    ("tensors_out_of_order", _file({"b": _entry(4, 8), "a": _entry(0, 4, (2,), "I16")}, _D8)),
    ("zero_dim_beside_huge_dims", _file({"a": _entry(0, 0, [0, 2**32, 2**32])})),
    ("dtype_peftkit_reads_through_the_library", _file({"a": _entry(0, 1, (1,), "F8_E4M3")}, b"\1")),
    ("negative_zero_and_floats_in_unknown_fields",
     _file(b'{"w-0":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"z":[-0,-1,2.5e3]}}', _D4)),
    ("surrogate_pair_escape", _file(b'{"__metadata__":{"k":"\\ud83d\\ude00"},"a":' + _A + b"}", _D4)),
]


@pytest.mark.parametrize("name,blob", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_file_is_refused_like_the_library(tmp_path, name, blob):
    path = _write(str(tmp_path), blob)
    assert _library(path) is None
    with pytest.raises(AdapterLoadError, match="adapter_model.safetensors"):
        files_module._read_safetensors(path, "cpu")


@pytest.mark.parametrize("name,blob", VALID, ids=[v[0] for v in VALID])
def test_unusual_valid_file_loads_like_the_library(tmp_path, name, blob):
    path = _write(str(tmp_path), blob)
    theirs = _library(path)
    assert theirs is not None
    _assert_same(files_module._read_safetensors(path, "cpu")[0], theirs)


def test_duplicate_tensor_name_is_refused_even_where_the_library_keeps_the_last(tmp_path):
    path = _write(str(tmp_path), _file(b'{"a":' + _A + b',"a":' + _A + b"}", _D4))
    assert _library(path) is not None  # serde's map: the last entry wins
    with pytest.raises(AdapterLoadError, match="more than once"):
        files_module._read_safetensors(path, "cpu")


# ---------------------------------------------------------------- property test: same accept/reject, same tensors


@st.composite
def _valid_files(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    """A consistent header (as a dict) and its data section: random names, dtypes, shapes, order and bytes."""
    names = draw(st.lists(st.text("abc._", min_size=1, max_size=4), max_size=5, unique=True))
    specs = [(n, draw(st.sampled_from(list(_DTYPES))), draw(st.lists(st.integers(0, 3), max_size=3))) for n in names]
    order = draw(st.permutations(range(len(specs))))
    header: dict[str, Any] = {}
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    data, offset = b"", 0
    for i in order:
        name, dtype, shape = specs[i]
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * _DTYPES[dtype].itemsize
        data += draw(st.binary(min_size=nbytes, max_size=nbytes))
        header[name] = _entry(offset, offset + nbytes, shape, dtype)
        offset += nbytes
    return dict(sorted(header.items())), data


_header_mutation = st.one_of(
    st.tuples(st.just("offset"), st.integers(0, 1), st.integers(-8, 8)),
    st.tuples(st.just("dtype"), st.sampled_from(_ALL_DTYPE_NAMES)),
    st.tuples(st.just("shape"), st.lists(st.one_of(st.integers(-1, 4), st.just(1.0), st.just(True)), max_size=3)),
    st.tuples(st.just("drop"), st.sampled_from(["dtype", "shape", "data_offsets"])),
    st.tuples(st.just("gap"), st.integers(1, 8)),
    st.tuples(st.just("twice"), st.integers(-8, 8), st.booleans()),
)
_byte_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=9)),
    st.tuples(st.just("length"), st.integers(-9, 9)),
    st.tuples(st.just("length_to"), st.sampled_from([0, 1, 2, 100_000_000, 100_000_001, 2**63, 2**64 - 1])),
)


def _mutate_header(
    header: dict[str, Any], data: bytes, extra: list[tuple[str, Any, bool]], mutation: tuple[Any, ...], target: int
) -> bytes:
    """Apply one mutation to ``header`` (in place) and return the data section; a ``twice`` mutation adds to
    ``extra`` a second entry for a tensor name, written before (True) or after the first."""
    names = [k for k in header if k != "__metadata__"]
    if not names:
        return data
    name = names[target % len(names)]
    entry = header[name]
    kind = mutation[0]
    offsets = entry.get("data_offsets")
    if kind == "offset" and offsets is not None:
        offsets[mutation[1]] += mutation[2]
    elif kind == "dtype":
        entry["dtype"] = mutation[1]
    elif kind == "shape":
        entry["shape"] = mutation[1]
    elif kind == "drop":
        entry.pop(mutation[1], None)
    elif kind == "gap" and offsets is not None and 0 <= offsets[0] <= len(data):
        begin, width = offsets[0], mutation[1]  # a hole before this tensor; it and every later tensor move
        for other in header.values():
            if isinstance(other, dict) and isinstance(other.get("data_offsets"), list) and other["data_offsets"][0] >= begin:
                other["data_offsets"] = [o + width for o in other["data_offsets"]]
        return data[:begin] + b"\0" * width + data[begin:]
    elif kind == "twice" and offsets is not None:
        extra.append((name, {**entry, "data_offsets": [o + mutation[1] for o in offsets]}, mutation[2]))
    return data


def _header_text(header: dict[str, Any], extra: list[tuple[str, Any, bool]]) -> bytes:
    pairs = [(k, v) for k, v, before in extra if before] + list(header.items())
    pairs += [(k, v) for k, v, before in extra if not before]
    return ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}").encode()


def _mutate_bytes(blob: bytes, mutation: tuple[Any, ...]) -> bytes:
    kind = mutation[0]
    if kind == "flip" and blob:
        i = mutation[1] % len(blob)
        return blob[:i] + bytes([blob[i] ^ mutation[2]]) + blob[i + 1:]
    if kind == "truncate":
        return blob[:mutation[1] % (len(blob) + 1)]
    if kind == "append":
        return blob + mutation[1]
    if kind == "length":
        return struct.pack("<Q", min(max(0, int.from_bytes(blob[:8], "little") + mutation[1]), 2**64 - 1)) + blob[8:]
    if kind == "length_to":
        return struct.pack("<Q", mutation[1]) + blob[8:]
    return blob


def _names_a_tensor_twice(blob: bytes) -> bool:
    """Whether the header is a JSON object naming one key twice (the library keeps the last; peftkit refuses)."""
    try:
        n = int.from_bytes(blob[:8], "little")
        seen: list[list[str]] = []
        json.loads(blob[8:8 + n].decode(), object_pairs_hook=lambda pairs: seen.append([k for k, _ in pairs]) or {})
    except (ValueError, RecursionError):
        return False
    return bool(seen) and len(set(seen[-1])) != len(seen[-1])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    valid=_valid_files(),
    header_mutations=st.lists(st.tuples(_header_mutation, st.integers(0, 10)), max_size=2),
    byte_mutations=st.lists(_byte_mutation, max_size=2),
    pad=st.integers(0, 3),
)
def test_reader_agrees_with_the_library_on_mutated_files(valid, header_mutations, byte_mutations, pad):
    header, data = valid
    extra: list[tuple[str, Any, bool]] = []
    for mutation, target in header_mutations:
        data = _mutate_header(header, data, extra, mutation, target)
    blob = _file(_header_text(header, extra) + b" " * pad, data)
    for mutation in byte_mutations:
        blob = _mutate_bytes(blob, mutation)
    with tempfile.TemporaryDirectory() as directory:
        path = _write(directory, blob)
        theirs, ours = _library(path), _peftkit(path)
    if theirs is None or ours is None:
        if ours is not None or not _names_a_tensor_twice(blob):
            assert (theirs is None) == (ours is None), (theirs is None, ours is None, blob[:300])
        return
    _assert_same(ours, theirs)
