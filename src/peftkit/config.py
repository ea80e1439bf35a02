"""``PeftConfig``: the base config dataclass, its JSON round trip and the validation helpers.

A config is validated once, in ``__post_init__``. After that peftkit never writes to a user's config object:
facts peftkit derives for a model (resolved targets, per-layer ranks, ``fan_in_fan_out``) live in the injection
plan or in the private copy a ``PeftModel`` keeps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from typing_extensions import Self

from .errors import AdapterLoadError, ConfigError, ConfigTypeError, MissingPeftTypeError, PeftWarning
from .fileio import resolve_file
from .transaction import replace_files
from .types import PeftType, TaskType

CONFIG_NAME = "adapter_config.json"
#: The reference release whose file format peftkit writes; recorded in ``peft_version`` as ``<format>@peftkit-<v>``.
FORMAT_VERSION = "0.21.2"
PEFTKIT_VERSION = "0.1.0"
_PROMPT_LEARNING_TYPES = {
    PeftType.PROMPT_TUNING,
    PeftType.MULTITASK_PROMPT_TUNING,
    PeftType.P_TUNING,
    PeftType.PREFIX_TUNING,
}
#: Keys that are never read from a saved config (the reference drops them too).
_DROPPED_KEYS = ("runtime_config",)
#: Fields holding module names: None, a regex str, or a collection of names (whichever config class has them).
_MODULE_NAME_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules")
#: Fields holding ``{module-name regex: value}`` overrides; their values are checked by each method.
_PATTERN_FIELDS = ("rank_pattern", "alpha_pattern")
#: ``adapter_config.json`` nested deeper than this is refused before parsing (``json`` would hit RecursionError).
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')

C = TypeVar("C", bound="PeftConfig")


def check(ok: bool, name: str, value: object, allowed: str) -> None:
    """Raise :class:`ConfigError` naming ``name``, ``value`` and ``allowed`` unless ``ok``."""
    if not ok:
        raise ConfigError(name, value, allowed)


def is_int(value: object) -> bool:
    """True for ints that are not bools."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """True for ints and floats that are not bools."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_name_collection(value: object) -> bool:
    """True for a list, tuple, set or frozenset whose items are all str."""
    return isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value)


def check_shared_fields(config: object) -> None:
    """Type checks of the fields several methods share, run by :meth:`PeftConfig.__post_init__` before any
    subclass converts them: module-name fields, ``modules_to_save`` and the pattern dicts. A wrong type raises
    :class:`ConfigTypeError` (a ``ConfigError`` and a ``TypeError``) naming the field and what is allowed."""
    for name in _MODULE_NAME_FIELDS:
        value = getattr(config, name, None)
        if not (value is None or isinstance(value, str) or _is_name_collection(value)):
            raise ConfigTypeError(name, value, "allowed: None, a regex str, 'all-linear' or a list of module names")
    value = getattr(config, "modules_to_save", None)
    if not (value is None or _is_name_collection(value)):
        raise ConfigTypeError("modules_to_save", value, "allowed: None or a list of module names (not a str)")
    for name in _PATTERN_FIELDS:
        value = getattr(config, name, None)
        if not (value is None or (isinstance(value, dict) and all(isinstance(k, str) for k in value))):
            raise ConfigTypeError(name, value, "allowed: None or a dict {module-name regex: value}")
    _check_regexes(config)


def _check_regexes(config: object) -> None:
    """The regexes a config holds compile, as the injection will use them: a str module-name field (``re.fullmatch``
    of the module name), each ``rank_pattern`` / ``alpha_pattern`` key (``(.*\\.)?(<key>)$``) and ``layers_pattern``
    (a str or a list of them). Otherwise :class:`ConfigError` naming the field, the value and the regex error,
    instead of an ``re.error`` from deep inside the injection (e.g. for a hand-edited ``adapter_config.json``)."""
    checks: list[tuple[str, object, str]] = []
    for name in _MODULE_NAME_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, str):
            checks.append((name, value, value))
    for name in _PATTERN_FIELDS:
        for key in getattr(config, name, None) or {}:
            checks.append((f"{name}[{key!r}]", key, rf"(.*\.)?({key})$"))
    layers_pattern = getattr(config, "layers_pattern", None)
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else (
            layers_pattern if isinstance(layers_pattern, (list, tuple)) else []):
        if isinstance(pattern, str):
            checks.append(("layers_pattern", pattern, pattern))
    for name, value, regex in checks:
        try:
            re.compile(regex)
        except (re.error, RecursionError, OverflowError) as exc:
            raise ConfigError(name, value, f"allowed: a valid Python regex (re.error: {exc})") from None


def json_depth_exceeds(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when the JSON ``text`` nests arrays/objects more than ``limit`` deep (brackets in strings ignored).

    Linear in ``len(text)`` and non-recursive, so it is safe on hostile input; it does not validate the JSON."""
    depth = 0
    for char in _JSON_STRING.sub("", text):
        if char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _jsonable(value: Any) -> Any:
    """Sets become sorted lists (deterministic files, unlike the reference), enums their values."""
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (PeftType, TaskType)):
        return value.value
    return value


@dataclass
class PeftConfig:
    """Fields shared by every method's config (the reference's ``PeftConfig``).

    Args:
        task_type: one of :class:`TaskType` (or its string), or None for a plain model.
        peft_type: the method; set by each subclass.
        auto_mapping: ``{"base_model_class", "parent_library"}``, recorded when ``task_type`` is None.
        base_model_name_or_path: where ``AutoPeftModel`` loads the base from; recorded by ``get_peft_model``.
        revision: revision of the base model.
        inference_mode: True freezes the adapter. ``PeftConfig.save_pretrained`` writes this value;
            ``PeftModel.save_pretrained`` writes true (both as the reference does).
        peft_version: the format version and the writer, filled in automatically.
    """

    task_type: TaskType | str | None = field(default=None, metadata={"help": "Task type"})
    peft_type: PeftType | str | None = field(default=None, metadata={"help": "PEFT method"})
    auto_mapping: dict[str, Any] | None = field(default=None)
    base_model_name_or_path: str | None = field(default=None)
    revision: str | None = field(default=None)
    inference_mode: bool = field(default=False)
    peft_version: str | None = field(default=None)

    def __post_init__(self) -> None:
        if self.task_type is not None:
            allowed = [t.value for t in TaskType]
            check(str(self.task_type) in allowed, "task_type", self.task_type, f"allowed: {allowed} or None")
            self.task_type = TaskType(str(self.task_type))
        if self.peft_type is not None:
            allowed_types = [t.value for t in PeftType]
            check(str(self.peft_type) in allowed_types, "peft_type", self.peft_type, "allowed: a PeftType value")
            self.peft_type = PeftType(str(self.peft_type))
        check(isinstance(self.inference_mode, bool), "inference_mode", self.inference_mode, "allowed: True or False")
        check_shared_fields(self)
        if self.peft_version is None:
            self.peft_version = f"{FORMAT_VERSION}@peftkit-{PEFTKIT_VERSION}"

    # ------------------------------------------------------------------ properties
    @property
    def is_prompt_learning(self) -> bool:
        """True for prompt tuning, P-tuning and prefix tuning."""
        return self.peft_type in _PROMPT_LEARNING_TYPES

    @property
    def is_adaption_prompt(self) -> bool:
        """True for adaption prompt (not implemented by peftkit)."""
        return self.peft_type == PeftType.ADAPTION_PROMPT

    # ------------------------------------------------------------------ dict / JSON
    def to_dict(self) -> dict[str, Any]:
        """All fields as a dict (``runtime_config`` excluded: it is never serialized)."""
        data = asdict(self)
        for key in _DROPPED_KEYS:
            data.pop(key, None)
        return data

    def to_json_string(self) -> str:
        """The JSON written to ``adapter_config.json``: sorted keys, indent 2, sets as sorted lists."""
        return json.dumps(_jsonable(self.to_dict()), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (atomically). The object is not modified.

        The file holds the config's own values, ``inference_mode`` included (as the reference); an
        ``auto_mapping_dict`` keyword replaces ``auto_mapping`` in the file, as the reference's does."""
        if os.path.isfile(save_directory):
            raise ConfigError("save_directory", str(save_directory), "allowed: a directory path, not a file")
        os.makedirs(save_directory, exist_ok=True)
        auto_mapping = kwargs.pop("auto_mapping_dict", None)
        config = self if auto_mapping is None else self.copy(auto_mapping=auto_mapping)
        text = config.to_json_string()
        replace_files(save_directory, {CONFIG_NAME: lambda tmp: Path(tmp).write_text(text, encoding="utf-8")})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build the config of ``data["peft_type"]`` (or ``cls``) from a dict, dropping unknown keys with a warning."""
        data = dict(data)
        target = _config_class_for(cls, data.get("peft_type"))
        for key in _DROPPED_KEYS:
            if data.pop(key, None) is not None:
                warnings.warn(f"the saved config contains {key!r}, which is never loaded; ignoring it", PeftWarning)
        known = {f.name for f in dataclasses.fields(target) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"Unexpected keyword arguments {unknown} for {target.__name__}, ignoring them. They were probably "
                f"saved using a higher version of the library (or another PEFT implementation).",
                PeftWarning,
                stacklevel=2,
            )
        return target(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike[str], **kwargs: Any) -> dict[str, Any]:
        """The dict stored in a JSON file; a broken file raises :class:`AdapterLoadError` naming it. ``kwargs`` are
        accepted for the reference's signature and ignored (as there)."""
        path = path_json_file
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            if json_depth_exceeds(text):
                raise AdapterLoadError(f"cannot read the adapter config {str(path)!r}: its JSON nests more than "
                                       f"{MAX_JSON_DEPTH} levels deep; allowed: at most {MAX_JSON_DEPTH}")
            data = json.loads(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterLoadError(f"cannot read the adapter config {str(path)!r}: {exc}") from exc
        if not isinstance(data, dict):
            raise AdapterLoadError(f"{str(path)!r} is not an adapter config: it holds a {type(data).__name__}, "
                                   "not a JSON object")
        return data

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike[str], subfolder: str | None = None, **kwargs: Any
    ) -> Self:
        """Load ``adapter_config.json`` from a local directory or a Hub repo (``subfolder``, ``revision``, ...).

        Keyword arguments that are config fields override the saved values.
        """
        path = resolve_file(pretrained_model_name_or_path, CONFIG_NAME, subfolder, **kwargs)
        if path is None:
            where = f"{pretrained_model_name_or_path}" + (f"/{subfolder}" if subfolder else "")
            raise AdapterLoadError(f"no {CONFIG_NAME} found in {where!r}")
        data = cls.from_json_file(path)
        overrides = {k: v for k, v in kwargs.items() if k not in ("revision", "cache_dir", "token")}
        target = _config_class_for(cls, data.get("peft_type"), where=repr(str(path)))
        field_names = {f.name for f in dataclasses.fields(target)}
        data.update({k: v for k, v in overrides.items() if k in field_names})
        return cls.from_dict(target.check_kwargs(**data))

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """Check (and possibly adjust) the fields read by :meth:`from_pretrained` before the config is built; a hook
        for subclasses, as in the reference. The base returns ``kwargs`` unchanged."""
        return kwargs

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ) -> Any:
        """Upload ``adapter_config.json`` (as :meth:`save_pretrained` writes it) and a model card header with
        ``tags`` to the Hub repo ``repo_id`` in one commit; returns ``huggingface_hub``'s ``CommitInfo``.
        ``max_shard_size`` is accepted for the reference's signature and ignored."""
        from .serialization.hub import push_to_hub

        return push_to_hub(self.save_pretrained, repo_id, commit_message=commit_message,
                           commit_description=commit_description, private=private, token=token, revision=revision,
                           create_pr=create_pr, tags=tags)

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> PeftConfig:
        """Build the config class registered for ``kwargs["peft_type"]``."""
        return cls.from_dict(kwargs)

    def copy(self, **changes: Any) -> Self:
        """A new config with ``changes`` applied (the original is untouched)."""
        return dataclasses.replace(self, **changes)


def _config_class_for(cls: type[PeftConfig], peft_type: object, where: str = "the config") -> type[PeftConfig]:
    """The registered config class of ``peft_type``; ``cls`` itself when it is already specific (a ``LoraConfig``
    loads a config without ``peft_type``, as in the reference). Raises :class:`MissingPeftTypeError` (``TypeError``
    and ``KeyError``, the reference's builtins) when neither says the method."""
    if peft_type is None:
        if cls is PeftConfig:
            raise MissingPeftTypeError(f"{where} has no 'peft_type' key, so its method is unknown; allowed: a config "
                                       "with peft_type (e.g. 'LORA'), or loading it with the method's config class "
                                       "(LoraConfig.from_pretrained)")
        return cls
    from .registry import get_method

    target = get_method(str(peft_type)).config_cls
    if cls is not PeftConfig and not issubclass(target, cls) and not issubclass(cls, target):
        raise ConfigError("peft_type", str(peft_type), f"allowed for {cls.__name__}: its own peft_type")
    return cls if cls is not PeftConfig and issubclass(cls, target) else target


_Sub = TypeVar("_Sub")


def as_subconfig(field_name: str, value: object, cls: type[_Sub]) -> _Sub | None:
    """A nested config field (``LoraConfig.corda_config``, ...) as an instance of the dataclass ``cls``: a dict (as
    loaded from ``adapter_config.json``) is converted, None and instances pass through.

    Raises:
        ConfigError: the dict has keys that are not fields of ``cls`` (named, with the allowed ones).
        ConfigTypeError: any other type.
    """
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        fields = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ConfigError(field_name, value, f"unknown keys {unknown}; allowed: {sorted(fields)}")
        return cls(**value)
    raise ConfigTypeError(field_name, value, f"allowed: None, a {cls.__name__} or a dict of its fields")


def as_set(value: Iterable[str] | str | None) -> set[str] | str | None:
    """Lists of module names are stored as sets (the reference does the same); strings stay regexes."""
    if value is None or isinstance(value, str):
        return value
    return set(value)
