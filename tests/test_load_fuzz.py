"""Hostile adapter directories: every outcome of a load is a correct load or a typed peftkit error (issue 16).

A valid adapter directory is saved once per method (LoRA, IA3, LoHa on the tiny Llama). Hypothesis then mutates
``adapter_config.json`` (wrong types, absurd sizes, unknown methods, broken JSON, bad UTF-8, deep nesting) and
``adapter_model.safetensors`` (re-saved with dropped / renamed / re-typed / re-shaped / extra tensors, a different
rank, NaN values; or edited raw: header fields, offsets, dtypes, duplicate names, the header length field,
truncation, flipped bytes) and feeds each mutated directory to every loader:

- ``PeftConfig.from_pretrained`` and the method's own config class;
- ``load_peft_weights``;
- ``PeftModel.from_pretrained(base, dir, is_trainable=False/True)``;
- ``peft_model.load_adapter(dir, "other", is_trainable=False/True)``.

Properties checked for every example:

- an exception is a :class:`~peftkit.errors.PeftError` (any other type fails the example, and so does a typed
  error caused by ``MemoryError``, ``RecursionError`` or a failed allocation);
- a failed load leaves the model exactly as it was (module names and types, state-dict keys and values,
  ``requires_grad``; for ``load_adapter`` the adapter names too);
- a successful load is correct: the file is one the ``safetensors`` library reads as well, every adapter tensor
  that the file holds under the adapter's key equals the file's tensor (cast to the adapter's dtype, the cast the
  load does), adapter tensors keep their dtype, trainability is as asked, and a forward pass runs;
- ``load_peft_weights`` returns exactly the tensors ``safetensors.torch.load_file`` returns, and refuses exactly
  the files the library refuses;
- no hang (``signal.alarm``) and no allocation beyond a small headroom over what the process already maps
  (``RLIMIT_AS``, see :data:`HEADROOM`).

Examples are mutation *recipes* (plain tuples), applied to the valid adapter of each method, so failures print a
readable recipe and ``@example`` can pin one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import signal
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import tiny_llama
from safetensors.torch import load_file, save

from peftkit import IA3Config, LoHaConfig, LoraConfig, PeftConfig, PeftModel, get_peft_model
from peftkit.errors import PeftError, PeftWarning
from peftkit.serialization.files import load_peft_weights
from peftkit.serialization.state_dict import get_peft_model_state_dict

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
#: safetensors metadata key where peftkit's save keeps the config text beside the tensors (the pair check)
CONFIG_METADATA_KEY = "peftkit_adapter_config"

#: The adapters that get mutated: cheap, and between them they cover rank-shaped factors (LoRA, LoHa), per-layer
#: vectors (IA3), and three config classes with different fields.
METHODS: dict[str, Callable[[], PeftConfig]] = {
    "lora": lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "ia3": lambda: IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                             init_ia3_weights=False),
    "loha": lambda: LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False),
}
#: rank of the saved LoRA / LoHa adapters (IA3 has none)
RANK = 4

#: Address space a load may map beyond what the process maps when it starts (``RLIMIT_AS`` = VmSize + HEADROOM).
#: Calibrated on Linux x86-64, torch 2.x, one thread: every example of this file (inference and trainable loads,
#: ``from_pretrained`` and ``load_adapter``, all three methods) passes with 32 MiB of headroom, so 128 MiB leaves 4x
#: room for allocator and interpreter noise. The adapter files are ~5-15 KB; what the cap exists to catch needs far more:
#: ``r=10**6`` on the tiny model is ~0.5-1 GB of adapter tensors, ``r=10**9`` or a header dim of ``2**40`` is
#: gigabytes to terabytes. VmSize (not RSS) is what ``RLIMIT_AS`` limits: torch and glibc reserve address space
#: lazily (thread stacks, malloc arenas), which is why the headroom is measured against VmSize right before the
#: loads, with all threads already started (one intra-op thread in tests).
HEADROOM = 128 * 2**20
#: wall-clock seconds one example's loads may take together (a load takes ~10 ms here)
TIMEOUT_S = 20

HYPOTHESIS = settings(
    max_examples=int(os.environ.get("PEFTKIT_FUZZ_EXAMPLES", "150")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# ---------------------------------------------------------------------------------------------------------------
# the valid adapters and the models the loads go into


@dataclass
class Valid:
    """One method's valid adapter: the file bytes and what they hold."""

    method: str
    config_text: str
    config: dict[str, Any]
    weights: bytes
    tensors: dict[str, torch.Tensor]

    def __repr__(self) -> str:
        return f"<valid {self.method} adapter>"


@dataclass
class Bench:
    """The models each example loads into, reused across examples (a failed load must leave them unchanged, which
    every example checks, so reuse is itself part of the test); rebuilt after a successful load."""

    method: str
    base: torch.nn.Module
    holder: PeftModel
    base_state: tuple[Any, ...]
    holder_state: tuple[Any, ...]

    def __repr__(self) -> str:
        return f"<{self.method} models>"

    def rebuild_base(self) -> None:
        self.base = tiny_llama()
        self.base_state = snapshot(self.base)

    def rebuild_holder(self) -> None:
        self.holder = get_peft_model(tiny_llama(), METHODS[self.method]())
        self.holder_state = snapshot(self.holder)


def snapshot(model: torch.nn.Module) -> tuple[Any, ...]:
    """Everything a failed load must leave as it was: module names and types, state-dict keys and values
    (cloned), ``requires_grad`` of each parameter, and the adapter names of a ``PeftModel``."""
    modules = [(name, type(module).__name__) for name, module in model.named_modules()]
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    grads = [(name, p.requires_grad) for name, p in model.named_parameters()]
    adapters = list(model.peft_config) if isinstance(model, PeftModel) else None
    return modules, state, grads, adapters


def assert_unchanged(model: torch.nn.Module, before: tuple[Any, ...], what: str) -> None:
    modules, state, grads, adapters = snapshot(model)
    assert modules == before[0], f"{what}: modules changed"
    assert list(state) == list(before[1]), f"{what}: state-dict keys changed"
    for key, value in before[1].items():  # the very same tensors must still be there: exact comparison
        assert same_bits(state[key], value), f"{what}: {key} changed"
    assert grads == before[2], f"{what}: requires_grad changed"
    assert adapters == before[3], f"{what}: adapters changed"


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads included: a copy must not change them)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@functools.cache
def valid_adapter(method: str) -> Valid:
    """The saved adapter of ``method``, built once per test session (not a fixture: hypothesis would print it)."""
    with tempfile.TemporaryDirectory() as directory:
        get_peft_model(tiny_llama(), METHODS[method]()).save_pretrained(directory)
        with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as fh:
            text = fh.read()
        with open(os.path.join(directory, WEIGHTS_NAME), "rb") as fh:
            weights = fh.read()
        return Valid(method, text, json.loads(text), weights, load_file(os.path.join(directory, WEIGHTS_NAME)))


@functools.cache
def bench_for(method: str) -> Bench:
    """The models ``method``'s examples load into, built once and reused (see :class:`Bench`)."""
    base, holder = tiny_llama(), get_peft_model(tiny_llama(), METHODS[method]())
    return Bench(method, base, holder, snapshot(base), snapshot(holder))


# ---------------------------------------------------------------------------------------------------------------
# guards: no hang, no big allocation, only typed errors


class Hang(BaseException):
    """Raised by the alarm. A ``BaseException``, so no ``except Exception`` in a loader can turn it into a typed
    error."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise Hang(f"the loads of one example took more than {TIMEOUT_S} s")


def _vm_size() -> int | None:
    """The process's mapped address space in bytes (VmSize), or None where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _maxrss_bytes() -> int:
    """Peak resident set size: kilobytes on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Run the body with warnings ignored (peftkit warns about unexpected keys, NaN, ...; not a failure), an
    alarm after :data:`TIMEOUT_S`, and the address space capped at VmSize + :data:`HEADROOM`. Where there is no
    /proc (no VmSize to cap against), peak RSS growth is checked after the body instead."""
    vm = _vm_size()
    old_limit = resource.getrlimit(resource.RLIMIT_AS)
    rss_before = _maxrss_bytes()
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        if vm is not None:
            hard = old_limit[1]
            cap = vm + HEADROOM if hard == resource.RLIM_INFINITY else min(vm + HEADROOM, hard)
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        signal.alarm(TIMEOUT_S)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
        resource.setrlimit(resource.RLIMIT_AS, old_limit)
    if vm is None:
        grown = _maxrss_bytes() - rss_before
        assert grown <= HEADROOM, f"peak RSS grew by {grown} bytes during one example's loads"


def _allocation_failure(exc: BaseException) -> BaseException | None:
    """A ``MemoryError`` or failed torch allocation in ``exc``'s cause/context chain (suppressed contexts included:
    a loader must not turn hitting the memory cap into a typed error). A ``RecursionError`` there is accepted: the
    safetensors reader bounds JSON nesting by refusing what Python's parser cannot recurse into."""
    seen: set[int] = set()
    item: BaseException | None = exc
    while item is not None and id(item) not in seen:
        seen.add(id(item))
        if isinstance(item, MemoryError) or (isinstance(item, RuntimeError) and "allocate" in str(item)):
            return item
        item = item.__cause__ or item.__context__
    return None


def attempt(call: Callable[[], Any]) -> tuple[Any, PeftError | None]:
    """``(result, None)`` or ``(None, typed error)``; any other exception propagates (so hypothesis shrinks it), and
    a typed error hiding an allocation failure or a recursion overflow is turned into an ``AssertionError``."""
    try:
        return call(), None
    except PeftError as exc:
        hidden = _allocation_failure(exc)
        if hidden is not None:
            raise AssertionError(f"typed error {exc!r} hides {hidden!r}") from exc
        assert str(exc), f"{type(exc).__name__} has no message"
        return None, exc


# ---------------------------------------------------------------------------------------------------------------
# mutation recipes (plain data) and applying them

#: fields the config mutations pick from, beside the saved config's own keys and random names
FIELDS = ("peft_type", "task_type", "r", "lora_alpha", "alpha", "target_modules", "exclude_modules",
          "feedforward_modules", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform",
          "layers_pattern", "bias", "use_dora", "use_rslora", "lora_bias", "init_lora_weights", "init_weights",
          "init_ia3_weights", "lora_dropout", "rank_dropout", "module_dropout", "fan_in_fan_out",
          "inference_mode", "auto_mapping", "base_model_name_or_path", "revision", "peft_version",
          "runtime_config", "megatron_config", "loftq_config", "trainable_token_indices", "layer_replication",
          "target_parameters", "use_effective_conv2d", "alora_invocation_tokens", "use_qalora",
          "qalora_group_size", "ensure_weight_tying", "use_bdlora")
ABSURD_INTS = (0, -1, 1, 2, 3, 5, 8, 10**6, 10**9, 2**31, 2**63, 2**64 + 1, 10**30, -(10**9))
ODD_STRINGS = ("", "8", "q_proj", "v_proj", "all-linear", ".*", "(", "[", "*", "\\", "q_proj|(", "LORA", "IA3",
               "LOHA", "LOKR", "ADALORA", "PROMPT_TUNING", "PREFIX_TUNING", "lora", "NOPE", "CAUSAL_LM",
               "SEQ_CLS", "none", "all", "lora_only", "pissa", "olora", "gaussian", "loftq", "eva", "corda",
               "pissa_niter_2", "\x00", "\ud800", "é" * 3, "../../etc", "/abs")


def _deep(depth: int, kind: str) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


SCALARS = st.one_of(
    st.none(), st.booleans(), st.sampled_from(ABSURD_INTS), st.integers(),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(ODD_STRINGS), st.text(max_size=12),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=4),
    st.lists(st.sampled_from(["q_proj", "v_proj", "k_proj", "lm_head", "embed_tokens", "model", "(", ".*"]),
             max_size=4),
    st.dictionaries(st.sampled_from(["q_proj", "v_proj", "k_proj", "(", ".*", "", "layers.0.self_attn.q_proj"]),
                    SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=6), SCALARS, max_size=3),
    st.lists(st.lists(st.sampled_from(ABSURD_INTS), max_size=3), max_size=3),
    st.builds(_deep, st.sampled_from([2, 10, 63, 64, 65, 200]), st.sampled_from(["list", "dict"])),  # json.dumps-able
)
CONFIG_EDITS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.one_of(st.sampled_from(FIELDS), st.text(max_size=10)), VALUES),
        st.tuples(st.just("del"), st.integers(0, 100)),
    ),
    min_size=1, max_size=4,
)
CONFIG_ENCODINGS = st.one_of(
    st.just(("json",)),
    st.just(("json",)),
    st.just(("json",)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("bad_utf8"), st.floats(0, 1), st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"])),
    st.tuples(st.just("non_object"), st.sampled_from(["[]", "3", '"LORA"', "null", "true", "[{}]", "1e999"])),
    st.tuples(st.just("deep"), st.sampled_from([63, 64, 65, 128, 1000, 100_000])),
    st.tuples(st.just("deep_field"), st.sampled_from(["r", "target_modules", "rank_pattern", "x"]),
              st.sampled_from([62, 63, 64, 1000, 100_000]), st.sampled_from(["[", '{"a":'])),
    st.tuples(st.just("dup_key"), st.sampled_from(["r", "peft_type", "target_modules"]), VALUES),
    st.just(("empty",)),
    st.just(("missing",)),
    st.just(("bom",)),
    st.just(("nan_literals",)),
)


def mutate_config(valid: Valid, edits: list[tuple[Any, ...]], encoding: tuple[Any, ...]) -> bytes | None:
    """The bytes of the mutated ``adapter_config.json`` (None: the file is removed)."""
    data = dict(valid.config)
    for edit in edits:
        if edit[0] == "set":
            data[edit[1]] = edit[2]
        elif data:
            data.pop(sorted(data)[edit[1] % len(data)])
    text = json.dumps(data, indent=2)  # NaN / Infinity literals as Python's json writes them
    kind = encoding[0]
    if kind == "truncate":
        return text.encode()[: int(encoding[1] * len(text))]
    if kind == "bad_utf8":
        raw = text.encode()
        cut = int(encoding[1] * len(raw))
        return raw[:cut] + encoding[2] + raw[cut:]
    if kind == "non_object":
        return encoding[1].encode()
    if kind == "deep":
        return ("[" * encoding[1] + "]" * encoding[1]).encode()
    if kind == "deep_field":
        close = "]" if encoding[3] == "[" else "}"
        nested = encoding[3] * encoding[2] + "1" + close * encoding[2]
        return (text.rstrip()[:-1].rstrip() + f",\n  {json.dumps(encoding[1])}: {nested}\n}}").encode()
    if kind == "dup_key":
        return (text.rstrip()[:-1].rstrip() + f",\n  {json.dumps(encoding[1])}: {json.dumps(encoding[2])}\n}}").encode()
    if kind == "empty":
        return b""
    if kind == "missing":
        return None
    if kind == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    if kind == "nan_literals":
        return text.replace('"r": 4', '"r": NaN').replace("false", "-Infinity").encode()
    return text.encode()


#: dtype names the raw header edits use: every name the library knows, and some it does not
ST_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64", "F8_E4M3",
             "F8_E5M2", "F4", "F6_E2M3", "C64", "f32", "F128", "", "FLOAT")
TORCH_DTYPES = ("float16", "bfloat16", "float64", "int8", "int32", "int64", "uint8", "bool", "float8_e4m3fn")
SHAPES = st.one_of(
    st.lists(st.integers(0, 9), max_size=4),
    st.lists(st.sampled_from([0, 1, 4, 16, 32, 2**31, 2**40, 2**63, 2**64 - 1, 2**64, -1]), max_size=4),
)
KEY_CHOICES = ("drop_prefix", "adapter_name", "unknown", "lm_head", "embed", "bias", "other_layer", "empty", "text")
SEMANTIC_OPS = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 100)),
    st.tuples(st.just("rename"), st.integers(0, 100), st.sampled_from(KEY_CHOICES), st.text(max_size=20)),
    st.tuples(st.just("dtype"), st.integers(0, 100), st.sampled_from(TORCH_DTYPES)),
    st.tuples(st.just("reshape"), st.integers(0, 100), st.lists(st.integers(0, 40), max_size=3)),
    st.tuples(st.just("transpose"), st.integers(0, 100)),
    st.tuples(st.just("extra"), st.sampled_from(KEY_CHOICES), st.text(max_size=20),
              st.lists(st.integers(0, 40), max_size=3)),
    st.tuples(st.just("fill"), st.integers(0, 100), st.sampled_from([float("nan"), float("inf"), 0.0, 1e30])),
    st.tuples(st.just("resize_r"), st.integers(1, 9)),
    st.tuples(st.just("metadata"), st.one_of(st.none(), st.dictionaries(st.text(max_size=8), st.text(max_size=8),
                                                                         max_size=3))),
    st.tuples(st.just("metadata"), st.fixed_dictionaries({CONFIG_METADATA_KEY: st.one_of(
        st.text(max_size=20),
        st.sampled_from(["{}", "[]", "null", "3", '{"peft_type": "NOPE"}', '{"r": 4}', '{"peft_type": "LORA", "r": "4"}',
                         "[" * 1000, '{"a":' * 70]),
        st.builds(lambda depth: "[" * depth, st.just(100_000)),  # built lazily: a long repr slows hypothesis
        st.builds(lambda v: json.dumps({"peft_type": "LORA", "r": v}), VALUES),
    )})),
)
HEADER_OPS = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 100), st.sampled_from(["dtype", "shape", "data_offsets", "extra"]),
              st.one_of(st.sampled_from(ST_DTYPES), SHAPES, SCALARS, st.lists(st.sampled_from(ABSURD_INTS),
                                                                               min_size=2, max_size=2))),
    st.tuples(st.just("shape"), st.integers(0, 100), SHAPES),
    st.tuples(st.just("dtype"), st.integers(0, 100), st.sampled_from(ST_DTYPES)),
    st.tuples(st.just("offsets"), st.integers(0, 100), st.integers(-3, 3), st.integers(-3, 3)),
    st.tuples(st.just("swap_offsets"), st.integers(0, 100), st.integers(0, 100)),
    st.tuples(st.just("del_field"), st.integers(0, 100), st.sampled_from(["dtype", "shape", "data_offsets"])),
    st.tuples(st.just("del_entry"), st.integers(0, 100)),
    st.tuples(st.just("dup_entry"), st.integers(0, 100)),
    st.tuples(st.just("rename"), st.integers(0, 100), st.sampled_from(KEY_CHOICES), st.text(max_size=20)),
    st.tuples(st.just("add_entry"), st.text(max_size=10), st.sampled_from(ST_DTYPES), SHAPES,
              st.lists(st.integers(0, 2**20), min_size=2, max_size=2)),
    st.tuples(st.just("metadata"), VALUES),
    st.tuples(st.just("pad"), st.integers(0, 64)),
    st.tuples(st.just("deep"), st.sampled_from([10, 126, 127, 128, 1000, 100_000])),
)
BYTE_OPS = st.one_of(
    st.tuples(st.just("length"), st.one_of(st.integers(-20, 20), st.sampled_from([0, 2**31, 2**63, 2**64 - 1]))),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("append"), st.binary(max_size=16)),
    st.just(("empty",)),
    st.just(("missing",)),
)
WEIGHT_RECIPES = st.tuples(
    st.lists(SEMANTIC_OPS, max_size=3), st.lists(HEADER_OPS, max_size=3), st.lists(BYTE_OPS, max_size=2),
).filter(lambda recipe: any(recipe))


def _new_key(key: str, choice: str, text: str, index: int) -> str:
    """A replacement name for the checkpoint key ``key``."""
    if choice == "drop_prefix":
        return key.removeprefix(PREFIX)
    if choice == "adapter_name":
        return key.replace(".weight", ".default.weight")
    if choice == "lm_head":
        return PREFIX + "lm_head.weight"
    if choice == "embed":
        return PREFIX + "model.embed_tokens.weight"
    if choice == "bias":
        return key.rsplit(".", 2)[0] + ".base_layer.bias"
    if choice == "other_layer":
        return key.replace("layers.0.", "layers.1.") if "layers.0." in key else key.replace("layers.1.", "layers.0.")
    if choice == "empty":
        return ""
    if choice == "unknown":
        return f"{PREFIX}model.layers.{index}.nope.weight"
    return text


def _apply_semantic(tensors: dict[str, torch.Tensor], op: tuple[Any, ...]) -> dict[str, torch.Tensor]:
    keys = list(tensors)
    kind = op[0]
    if kind == "extra":
        tensors[_new_key(keys[0] if keys else "x.weight", op[1], op[2], 7)] = torch.ones(op[3])
        return tensors
    if kind == "resize_r":
        return {key: _resize_rank(value, op[1]) for key, value in tensors.items()}
    if kind == "metadata" or not keys:
        return tensors
    key = keys[op[1] % len(keys)]
    if kind == "drop":
        del tensors[key]
    elif kind == "rename":
        tensors = {(_new_key(k, op[2], op[3], op[1]) if k == key else k): v for k, v in tensors.items()}
    elif kind == "dtype":
        tensors[key] = tensors[key].to(getattr(torch, op[2]))
    elif kind == "reshape":
        value = tensors[key].reshape(-1)
        numel = 1
        for d in op[2]:
            numel *= d
        tensors[key] = value[:numel].reshape(op[2]) if numel <= value.numel() else torch.zeros(op[2])
    elif kind == "transpose":
        tensors[key] = tensors[key].T.contiguous() if tensors[key].dim() == 2 else tensors[key]
    elif kind == "fill":
        value = tensors[key]  # filled in float32 and cast: 1e30 becomes inf in float16, NaN in float8_e4m3fn
        tensors[key] = torch.full(value.shape, op[2]).to(value.dtype) if value.is_floating_point() else value
    return tensors


def _resize_rank(value: torch.Tensor, rank: int) -> torch.Tensor:
    """``value`` with every dimension of size :data:`RANK` cut or zero-padded to ``rank``."""
    for dim, size in enumerate(value.shape):
        if size == RANK:
            if rank <= RANK:
                value = value.narrow(dim, 0, rank)
            else:
                pad_shape = list(value.shape)
                pad_shape[dim] = rank - RANK
                value = torch.cat([value, torch.zeros(pad_shape, dtype=value.dtype)], dim)
    return value.contiguous()


def _split(raw: bytes) -> tuple[list[list[Any]], bytes] | None:
    """``(header as [key, value] pairs, data)`` of a file the header edits can work on; None otherwise."""
    if len(raw) < 8:
        return None
    (length,) = struct.unpack("<Q", raw[:8])
    try:
        pairs = json.loads(raw[8:8 + length], object_pairs_hook=lambda p: [list(item) for item in p])
    except (ValueError, RecursionError):
        return None
    return pairs, raw[8 + length:]


def _dumps(value: Any) -> str:
    """JSON where an object given as ``[[key, value], ...]`` pairs (the header's own objects) keeps its pairs,
    duplicates included."""
    if isinstance(value, list) and value and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                                                 for p in value):
        return "{" + ",".join(f"{json.dumps(k)}:{_dumps(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dumps(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{_dumps(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def _join(pairs: list[list[Any]] | str, data: bytes, pad: int = 0) -> bytes:
    text = (pairs if isinstance(pairs, str) else _dumps(pairs)).encode("utf-8", "surrogatepass") + b" " * pad
    return struct.pack("<Q", len(text)) + text + data


def _apply_header(raw: bytes, op: tuple[Any, ...]) -> bytes:
    try:
        return _edit_header(raw, op)
    except RecursionError:  # a header made deep by an earlier op: leave it as it is
        return raw


def _edit_header(raw: bytes, op: tuple[Any, ...]) -> bytes:
    split = _split(raw)
    if split is None:
        return raw
    pairs, data = split
    entries = [p for p in pairs if p[0] != "__metadata__"]
    kind = op[0]
    if kind == "pad":
        return _join(pairs, data, op[1])
    if kind == "deep":
        return _join(_dumps(pairs)[:-1] + ',"__x__":{"a":' + "[" * op[1] + "]" * op[1] + "}}", data)
    if kind == "metadata":
        pairs = [p for p in pairs if p[0] != "__metadata__"] + [["__metadata__", op[1]]]
        return _join(pairs, data)
    if kind == "add_entry":
        pairs.append([op[1], [["dtype", op[2]], ["shape", op[3]], ["data_offsets", op[4]]]])
        return _join(pairs, data)
    if not entries:
        return raw
    entry = entries[op[1] % len(entries)]
    fields = entry[1] if isinstance(entry[1], list) else []
    if kind in ("set", "shape", "dtype", "offsets", "del_field"):
        name = {"shape": "shape", "dtype": "dtype", "offsets": "data_offsets"}.get(kind) or op[2]
        field = next((f for f in fields if isinstance(f, list) and f and f[0] == name), None)
        if field is None:
            if kind == "set":
                fields.append([name, op[3]])
        elif kind == "set":
            field[1] = op[3]
        elif kind in ("shape", "dtype"):
            field[1] = op[2]
        elif kind == "offsets" and isinstance(field[1], list) and len(field[1]) == 2:
            field[1] = [field[1][0] + op[2], field[1][1] + op[3]]
        elif kind == "del_field":
            fields.remove(field)
    elif kind == "swap_offsets":
        other = entries[op[2] % len(entries)]
        a = next((f for f in fields if f[0] == "data_offsets"), None)
        b = next((f for f in other[1] if isinstance(other[1], list) and f[0] == "data_offsets"), None)
        if a is not None and b is not None:
            a[1], b[1] = b[1], a[1]
    elif kind == "del_entry":
        pairs.remove(entry)
    elif kind == "dup_entry":
        pairs.append([entry[0], json.loads(_dumps(entry[1]), object_pairs_hook=lambda p: [list(i) for i in p])])
    elif kind == "rename":
        entry[0] = _new_key(entry[0], op[2], op[3], op[1])
    return _join(pairs, data)


def _apply_bytes(raw: bytes | None, op: tuple[Any, ...]) -> bytes | None:
    kind = op[0]
    if kind == "missing" or raw is None:
        return None
    if kind == "empty":
        return b""
    if kind == "length" and len(raw) >= 8:
        (length,) = struct.unpack("<Q", raw[:8])
        value = op[1] if op[1] > 20 or op[1] == 0 else (length + op[1]) % 2**64
        return struct.pack("<Q", value) + raw[8:]
    if kind == "truncate":
        return raw[: int(op[1] * len(raw))]
    if kind == "flip" and raw:
        pos = min(int(op[1] * len(raw)), len(raw) - 1)
        return raw[:pos] + bytes([raw[pos] ^ op[2]]) + raw[pos + 1:]
    if kind == "append":
        return raw + op[1]
    return raw


def mutate_weights(valid: Valid, recipe: tuple[list[Any], list[Any], list[Any]]) -> bytes | None:
    """The bytes of the mutated ``adapter_model.safetensors`` (None: the file is removed)."""
    semantic, header, byte_ops = recipe
    tensors = {key: value.clone() for key, value in valid.tensors.items()}
    metadata: dict[str, str] | None = {"format": "pt"}
    for op in semantic:
        if op[0] == "metadata":
            metadata = op[1]
        tensors = _apply_semantic(tensors, op)
    raw: bytes | None = save(tensors, metadata=metadata) if semantic else valid.weights
    for op in header:
        raw = _apply_header(raw, op)  # type: ignore[arg-type]
    for op in byte_ops:
        raw = _apply_bytes(raw, op)
    return raw


#: what the weights file beside a mutated config carries: the saved config ("saved": the valid file as written),
#: none ("none": as the reference writes files), or the mutated config's text ("same")
PAIRINGS = ("saved", "none", "same")


def paired_weights(valid: Valid, config: bytes | None, pairing: str) -> bytes | str:
    """The weights file for ``config`` under ``pairing`` (see :data:`PAIRINGS`); "valid" for the saved file."""
    if pairing == "saved":
        return "valid"
    metadata = {"format": "pt"}
    if pairing == "same" and config is not None:
        metadata[CONFIG_METADATA_KEY] = config.decode("utf-8", "replace")
    return save(valid.tensors, metadata=metadata)


# ---------------------------------------------------------------------------------------------------------------
# running the loaders


def write_adapter(directory: str, valid: Valid, config: bytes | None | str, weights: bytes | None | str) -> None:
    """Write the adapter files into ``directory`` ("valid" keeps that file as saved, None leaves it out)."""
    for name, content, good in ((CONFIG_NAME, config, valid.config_text.encode()), (WEIGHTS_NAME, weights,
                                                                                    valid.weights)):
        if content is None:
            continue
        with open(os.path.join(directory, name), "wb") as fh:
            fh.write(good if content == "valid" else content)  # type: ignore[arg-type]


def library_tensors(directory: str) -> dict[str, torch.Tensor] | None:
    """The file's tensors as the ``safetensors`` library reads them; None when it refuses the file."""
    path = os.path.join(directory, WEIGHTS_NAME)
    try:
        return load_file(path)
    except Exception:  # noqa: BLE001 - the library's own error types (SafetensorError, ...) and a missing file
        return None


def check_weights(directory: str, reference: dict[str, torch.Tensor] | None) -> None:
    """``load_peft_weights`` reads what the library reads, and refuses what it refuses."""
    tensors, error = attempt(lambda: load_peft_weights(directory))
    if reference is None:
        assert error is not None, "load_peft_weights accepted a file the safetensors library refuses"
        return
    if error is not None and _names_a_tensor_twice(os.path.join(directory, WEIGHTS_NAME)):
        return  # on purpose: the library keeps the last of two entries of one name, peftkit refuses the file
    assert error is None, f"load_peft_weights refused a file the safetensors library reads: {error}"
    assert list(tensors) == list(reference) or sorted(tensors) == sorted(reference)
    for key, value in reference.items():
        assert same_bits(tensors[key], value), f"load_peft_weights: tensor {key!r} differs from the library's"


def _names_a_tensor_twice(path: str) -> bool:
    """Whether the header of the safetensors file ``path`` names one tensor twice."""
    with open(path, "rb") as fh:
        raw = fh.read()
    (length,) = struct.unpack("<Q", raw[:8])
    top = json.loads(raw[8:8 + length], object_pairs_hook=lambda pairs: [k for k, _ in pairs])
    return len(top) != len(set(top))


def check_loaded(model: PeftModel, name: str, reference: dict[str, torch.Tensor] | None, trainable: bool,
                 valid: Valid) -> None:
    """A successful load of adapter ``name`` is correct (see the module docstring)."""
    assert reference is not None, "a load succeeded from a file the safetensors library refuses"
    loaded = get_peft_model_state_dict(model, adapter_name=name)
    loaded_norm = {key.removeprefix(PREFIX): value for key, value in loaded.items()}
    expected_dtypes = {value.dtype for value in valid.tensors.values()}
    holders: dict[str, list[str]] = {}
    for key in reference:
        holders.setdefault(key.removeprefix(PREFIX), []).append(key)
    for norm, value in loaded_norm.items():
        assert value.dtype in expected_dtypes, f"adapter tensor {norm!r} has dtype {value.dtype}"
        keys = holders.get(norm, [])
        if keys:
            candidates = [reference[k].to(value.dtype) for k in keys]
            assert any(same_bits(value, c) for c in candidates), f"adapter tensor {norm!r} differs from the file's"
    if name not in model.active_adapters:  # peftkit keeps inactive adapters frozen; activation applies is_trainable
        model.set_adapter(name)
    params = [p for n, p in model.named_parameters() if f".{name}." in f".{n}."]
    assert params and all(p.requires_grad == trainable for p in params), "adapter trainability is not as asked"
    assert not any(p.is_meta for p in model.parameters()), "a meta tensor survived the load"
    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[3, 4, 5]])).logits
    assert out.shape == (1, 3, 128)


def run_loaders(valid: Valid, bench: Bench, config: bytes | None | str, weights: bytes | None | str) -> None:
    """Write the mutated adapter and run every loader on it, checking the properties of the module docstring. After
    a failed check the models are rebuilt, so that hypothesis replays the example on clean models."""
    try:
        _run_loaders(valid, bench, config, weights)
    except BaseException:
        bench.rebuild_base()
        bench.rebuild_holder()
        raise


def _run_loaders(valid: Valid, bench: Bench, config: bytes | None | str, weights: bytes | None | str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        write_adapter(directory, valid, config, weights)
        reference = library_tensors(directory)
        with guarded():
            loaded_config, _ = attempt(lambda: PeftConfig.from_pretrained(directory))
            if loaded_config is not None:
                text = loaded_config.to_json_string()
                assert PeftConfig.from_dict(json.loads(text)).to_json_string() == text, "config JSON round trip"
            attempt(lambda: type(METHODS[valid.method]()).from_pretrained(directory))
            if weights is not None and weights != "valid" or reference is None:
                check_weights(directory, reference)
            for trainable in (False, True):
                model, error = attempt(lambda t=trainable: PeftModel.from_pretrained(bench.base, directory,
                                                                                     is_trainable=t))
                if error is not None:
                    assert_unchanged(bench.base, bench.base_state, f"from_pretrained(is_trainable={trainable})")
                else:
                    check_loaded(model, "default", reference, trainable, valid)
                    bench.rebuild_base()
                _, error = attempt(lambda t=trainable: bench.holder.load_adapter(directory, "other", is_trainable=t))
                if error is not None:
                    assert_unchanged(bench.holder, bench.holder_state, f"load_adapter(is_trainable={trainable})")
                else:
                    check_loaded(bench.holder, "other", reference, trainable, valid)
                    bench.rebuild_holder()


# ---------------------------------------------------------------------------------------------------------------
# the property tests


@pytest.mark.parametrize("method", list(METHODS))
@HYPOTHESIS
@given(edits=CONFIG_EDITS, encoding=CONFIG_ENCODINGS, pairing=st.sampled_from(PAIRINGS))
def test_mutated_adapter_config_loads_or_raises_typed(
    method: str, edits: list[Any], encoding: tuple[Any, ...], pairing: str
) -> None:
    """A mutated ``adapter_config.json`` beside the valid tensors, whose file carries the saved config (a
    mismatch), no config (as the reference writes it, so the mutated config is what the loads use) or the mutated
    config text (as if one save had written both)."""
    valid = valid_adapter(method)
    config = mutate_config(valid, edits, encoding)
    run_loaders(valid, bench_for(method), config, paired_weights(valid, config, pairing))


@pytest.mark.parametrize("method", list(METHODS))
@HYPOTHESIS
@given(recipe=WEIGHT_RECIPES)
def test_mutated_safetensors_loads_or_raises_typed(
    method: str, recipe: tuple[list[Any], list[Any], list[Any]]
) -> None:
    """A mutated ``adapter_model.safetensors`` beside the valid config."""
    valid = valid_adapter(method)
    run_loaders(valid, bench_for(method), "valid", mutate_weights(valid, recipe))


@pytest.mark.parametrize("method", ["lora", "loha"])
@HYPOTHESIS
@given(rank=st.integers(1, 9), extra=st.lists(SEMANTIC_OPS, max_size=2))
def test_consistent_rank_change_loads_the_files_tensors(
    method: str, rank: int, extra: list[Any]
) -> None:
    """Config and weights changed together to another rank (plus optional weight edits): without extra edits the
    pair is valid and compatible, so every loader must succeed; with them, the usual properties hold."""
    valid = valid_adapter(method)
    config = dict(valid.config, r=rank)
    weights = mutate_weights(valid, ([("resize_r", rank), *extra], [], []))
    if not extra:
        with tempfile.TemporaryDirectory() as directory:
            write_adapter(directory, valid, json.dumps(config).encode(), weights)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = PeftModel.from_pretrained(tiny_llama(), directory, is_trainable=True)
                check_loaded(model, "default", library_tensors(directory), True, valid)
    run_loaders(valid, bench_for(method), json.dumps(config).encode(), weights)


# ---------------------------------------------------------------------------------------------------------------
# regressions found by the properties above (deterministic)


def _lora_dir_with(directory: str, change: Callable[[dict[str, torch.Tensor]], None],
                   config: dict[str, Any] | None = None) -> Valid:
    """Write the valid LoRA adapter into ``directory`` with its tensors changed by ``change`` (and its config
    replaced by ``config``)."""
    valid = valid_adapter("lora")
    tensors = {key: value.clone() for key, value in valid.tensors.items()}
    change(tensors)
    write_adapter(directory, valid, "valid" if config is None else json.dumps(config).encode(),
                  save(tensors, metadata={"format": "pt"}))
    return valid


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("trainable", [False, True])
def test_float8_checkpoint_tensors_load_cast_to_the_adapter_dtype(tmp_path: Any, dtype: torch.dtype,
                                                                  trainable: bool) -> None:
    """A float8 tensor in the file (which the reference loads, casting) loads; the NaN/inf check used to crash with
    ``NotImplementedError: "isfinite" not implemented for 'Float8_e4m3fn'``."""
    key = next(iter(valid_adapter("lora").tensors))
    valid = _lora_dir_with(str(tmp_path), lambda t: t.update({key: t[key].to(dtype)}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # finite values: no NaN warning either
        model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=trainable)
    check_loaded(model, "default", library_tensors(str(tmp_path)), trainable, valid)


def test_nan_in_a_float8_checkpoint_tensor_warns(tmp_path: Any) -> None:
    """The NaN/inf warning also covers float8 tensors (``float8_e4m3fn`` has NaN)."""
    key = next(iter(valid_adapter("lora").tensors))

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = tensors[key].clone().fill_(float("nan")).to(torch.float8_e4m3fn)

    _lora_dir_with(str(tmp_path), poison)
    with pytest.warns(PeftWarning, match="NaN or inf"):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path))


#: ``(config class, fields)`` whose regex, as saved in an ``adapter_config.json``, does not compile
BAD_REGEX_CONFIGS = [
    (LoraConfig, {"target_modules": "("}, "target_modules"),
    (LoraConfig, {"target_modules": ["q_proj"], "exclude_modules": "["}, "exclude_modules"),
    (LoraConfig, {"target_modules": ["q_proj"], "rank_pattern": {"(": 2}}, "rank_pattern"),
    (LoraConfig, {"target_modules": ["q_proj"], "alpha_pattern": {"*": 2}}, "alpha_pattern"),
    (LoraConfig, {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "("}, "layers_pattern"),
    (LoraConfig, {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": ["layers", "*"]},
     "layers_pattern"),
    (IA3Config, {"target_modules": "*", "feedforward_modules": None}, "target_modules"),
    (IA3Config, {"target_modules": ["q_proj"], "feedforward_modules": "q_proj|("}, "feedforward_modules"),
    (LoHaConfig, {"target_modules": "[", "init_weights": False}, "target_modules"),
]


@pytest.mark.parametrize(("cls", "fields", "name"), BAD_REGEX_CONFIGS,
                         ids=[f"{c.__name__}-{n}-{i}" for i, (c, _, n) in enumerate(BAD_REGEX_CONFIGS)])
def test_a_regex_that_does_not_compile_is_a_config_error_naming_the_field(
    tmp_path: Any, cls: type[PeftConfig], fields: dict[str, Any], name: str
) -> None:
    """Found by the config property: ``target_modules="("`` (or a bad ``rank_pattern`` key, ...) used to escape
    as ``re.error`` from the injection; it is a :class:`ConfigError` naming the field, the value and the rule, both
    when the config is built and when it is loaded (and the model is left as it was)."""
    from peftkit.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"{name}.*not allowed.*regex") as info:
        cls(**fields)
    assert info.value.field.startswith(name)
    config = {**json.loads(cls().to_json_string()), **fields}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=name):
        PeftConfig.from_pretrained(str(tmp_path))
    base = tiny_llama()
    before = snapshot(base)
    save_dir = tmp_path / "weights"
    save_dir.mkdir()
    (save_dir / CONFIG_NAME).write_text(json.dumps(config))
    (save_dir / WEIGHTS_NAME).write_bytes(save({"x": torch.zeros(1)}))
    with pytest.raises(ConfigError, match=name):
        PeftModel.from_pretrained(base, str(save_dir))
    assert_unchanged(base, before, "from_pretrained")


def test_ia3_all_linear_with_feedforward_modules_injects_saves_and_loads(tmp_path: Any) -> None:
    """Found by the config property: IA3 with ``target_modules="all-linear"`` and ``feedforward_modules=
    ["down_proj"]`` (valid in the reference) failed after the layers were swapped in (the stored copy, holding the
    resolved full module names, no longer passed the subset check), leaving the model modified. It injects (the
    ``down_proj`` layers scale their input: ``ia3_l`` is ``(1, in)``), saves and loads back the same tensors."""
    config = IA3Config(target_modules="all-linear", feedforward_modules=["down_proj"], init_ia3_weights=False)
    model = get_peft_model(tiny_llama(), config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if "ia3_l" in name}
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.ia3_l.default"] == (1, 64)
    assert shapes["base_model.model.model.layers.0.mlp.up_proj.ia3_l.default"] == (64, 1)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    expected, got = get_peft_model_state_dict(model), get_peft_model_state_dict(loaded)
    assert list(got) == list(expected)
    assert all(same_bits(got[k], v) for k, v in expected.items())  # the file's tensors, copied: exact


def test_an_error_after_the_layers_are_swapped_in_leaves_the_model_unchanged(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``inject_adapter`` promises an unchanged model when it raises: the stored config copy (where a config error
    can still surface) is now made before the layers are swapped in, so ``from_pretrained`` cannot leave adapter
    layers in the user's model."""
    from peftkit import tuner
    from peftkit.errors import ConfigError

    get_peft_model(tiny_llama(), METHODS["lora"]()).save_pretrained(str(tmp_path))

    def refuse(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise ConfigError("target_modules", "x", "allowed: nothing (test)")

    monkeypatch.setattr(tuner, "_resolved_fields", refuse)
    base = tiny_llama()
    before = snapshot(base)
    for trainable in (False, True):
        with pytest.raises(ConfigError):
            PeftModel.from_pretrained(base, str(tmp_path), is_trainable=trainable)
        assert_unchanged(base, before, f"from_pretrained(is_trainable={trainable})")


#: Reproducers the config property finds that are NOT fixed yet (their cause is in ``peft_model.py``'s load path and
#: the layers' init, outside this test's scope): a config beside weights written without peftkit's pairing metadata
#: (as the reference writes them) asks for an absurd rank where no checkpoint shape is compared before the adapter
#: tensors are allocated. Each allocates 64 MB to 128 GB; under the cap it fails with an untyped ``RuntimeError``
#: ("DefaultCPUAllocator: can't allocate memory"). Remove an entry when its load raises a typed error instead.
ABSURD_RANK = {
    # targeted modules that have no tensor in the checkpoint: nothing to compare shapes with; the load refuses to
    # invent more bytes of missing tensors than the checkpoint holds (state_dict._check_missing_size)
    "lora-rank_pattern-on-a-module-missing-from-the-checkpoint": (
        "lora", [("set", "target_modules", ["q_proj", "v_proj", "k_proj"]), ("set", "rank_pattern", {"k_proj": 10**9})]),
    "loha-rank_pattern-on-a-module-missing-from-the-checkpoint": (
        "loha", [("set", "target_modules", ["q_proj", "v_proj", "k_proj"]), ("set", "rank_pattern", {"k_proj": 10**9})]),
    "lora-target_modules-all-linear-with-rank_pattern": (
        "lora", [("set", "target_modules", "all-linear"), ("set", "rank_pattern", {"o_proj": 10**9})]),
    # PiSSA/OLoRA change the base weights and DoRA computes its magnitude at injection, also for inference loads: a
    # meta probe (injection.apply.probing, no init at all) checks the checkpoint first
    "lora-pissa-absurd-r": ("lora", [("set", "init_lora_weights", "pissa"), ("set", "r", 10**9)]),
    "lora-olora-absurd-r": ("lora", [("set", "init_lora_weights", "olora"), ("set", "r", 10**6)]),
    "lora-dora-absurd-r": ("lora", [("set", "use_dora", True), ("set", "r", 10**9)]),
}


@pytest.mark.parametrize("case", list(ABSURD_RANK))
def test_absurd_rank_fails_typed_before_allocating(case: str) -> None:
    """The config property on the recipes of :data:`ABSURD_RANK` (pairing "none": weights as the reference writes
    them), found by the fuzz: each allocated up to 128 GB before any check; now a typed error within the cap."""
    method, edits = ABSURD_RANK[case]
    valid = valid_adapter(method)
    config = mutate_config(valid, edits, ("json",))
    run_loaders(valid, bench_for(method), config, paired_weights(valid, config, "none"))


def test_the_guards_catch_a_big_allocation_and_a_hang() -> None:
    """The property's guards are live: inside :func:`guarded`, an allocation of 4 x HEADROOM fails, and a sleep past
    the alarm raises :class:`Hang` (with the alarm shortened); afterwards the old limits are back."""
    before, handler = resource.getrlimit(resource.RLIMIT_AS), signal.getsignal(signal.SIGALRM)
    if _vm_size() is not None:
        with pytest.raises((RuntimeError, MemoryError)), guarded():
            torch.empty(4 * HEADROOM, dtype=torch.uint8).fill_(1)
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    global TIMEOUT_S
    saved, TIMEOUT_S = TIMEOUT_S, 1
    try:
        with pytest.raises(Hang), guarded():
            import time

            time.sleep(3)
    finally:
        TIMEOUT_S = saved
    assert signal.getsignal(signal.SIGALRM) == handler


@pytest.mark.parametrize("entry", ["from_pretrained", "load_adapter"])
def test_two_checkpoint_keys_for_one_tensor_are_refused(tmp_path: Any, entry: str) -> None:
    """Found by the weights property: a file holding one adapter tensor under two keys, with and without the
    ``base_model.model.`` prefix (and different values), loaded whichever came last in the file (the unprefixed one:
    safetensors sorts keys), where the reference loads the prefixed one. Ambiguous: refused with
    :class:`AdapterLoadError` naming both keys, and the model is left as it was."""
    from peftkit.errors import AdapterLoadError

    key = next(iter(valid_adapter("lora").tensors))
    _lora_dir_with(str(tmp_path), lambda t: t.update({key.removeprefix(PREFIX): torch.ones_like(t[key])}))
    model = tiny_llama() if entry == "from_pretrained" else get_peft_model(tiny_llama(), METHODS["lora"]())
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PeftWarning)
        with pytest.raises(AdapterLoadError, match="same adapter tensor") as info:
            if entry == "from_pretrained":
                PeftModel.from_pretrained(model, str(tmp_path))
            else:
                model.load_adapter(str(tmp_path), "other")
    assert key in str(info.value) and repr(key.removeprefix(PREFIX)) in str(info.value)
    assert_unchanged(model, before, entry)
