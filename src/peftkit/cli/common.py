"""Helpers shared by the ``peftkit`` commands: the CLI's error type, loading models/tokenizers, method names.

Every failure a user can cause (missing file, malformed row, unknown model, a target matching nothing) ends up as
a :class:`CliError` or a peftkit typed error; :func:`guard` turns those into one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from typer.core import TyperGroup

from ..errors import PeftError

#: exit code for a user error (same as click's usage errors)
EXIT_USAGE = 2
#: exit code after Ctrl-C (128 + SIGINT)
EXIT_INTERRUPTED = 130

#: CLI task names -> ``TaskType`` values
TASKS: dict[str, str] = {
    "causal-lm": "CAUSAL_LM",
    "seq-cls": "SEQ_CLS",
    "token-cls": "TOKEN_CLS",
    "seq2seq-lm": "SEQ_2_SEQ_LM",
    "question-ans": "QUESTION_ANS",
    "feature-extraction": "FEATURE_EXTRACTION",
}
TASK_NAMES: dict[str, str] = {v: k for k, v in TASKS.items()}

#: CLI method names that are variants of a registered method: ``name -> (peft_type, config overrides)``
METHOD_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dora": ("LORA", {"use_dora": True}),
}

#: generic CLI options -> config field names tried in order (the first one the method's config has is used)
OPTION_FIELDS: dict[str, tuple[str, ...]] = {
    "r": ("r", "init_r"),
    "alpha": ("lora_alpha", "alpha"),
    "dropout": ("lora_dropout", "module_dropout", "encoder_dropout"),
    "target_modules": ("target_modules",),
    "num_virtual_tokens": ("num_virtual_tokens",),
}

#: ``num_virtual_tokens`` used when a prompt method's config needs one and none was given
DEFAULT_VIRTUAL_TOKENS = 20


class CliError(Exception):
    """A user error reported as one line (no traceback) with exit code 2."""


class HelpGroup(TyperGroup):
    """The root command: ``peftkit --help`` lists each command with the whole first sentence of its help (wrapped
    at the terminal's width) instead of click's 45-odd characters cut with "..."."""

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """One row per visible command: its name and the first sentence of its help."""
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=10_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Turn user errors raised inside the block into ``error: <message>`` on stderr and exit code 2."""
    import typer

    try:
        yield
    except CliError as exc:
        _fail(str(exc))
        raise typer.Exit(EXIT_USAGE) from None
    except (PeftError, OSError) as exc:  # typed peftkit errors; unreadable/unwritable files
        _fail(f"{type(exc).__name__}: {_one_line(exc)}")
        raise typer.Exit(EXIT_USAGE) from None


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]
    return " ".join(text.split())


def require_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a ``Path``; a :class:`CliError` naming ``what`` when it is not an existing file."""
    p = Path(path)
    if not p.is_file():
        raise CliError(f"{what} file {str(p)!r} does not exist" + (" (it is a directory)" if p.is_dir() else ""))
    return p


def require_adapter_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` if it holds ``adapter_config.json``; otherwise a :class:`CliError` saying what is missing."""
    p = Path(path)
    if not p.is_dir():
        raise CliError(f"adapter directory {str(p)!r} does not exist")
    if not (p / "adapter_config.json").is_file():
        raise CliError(f"{str(p)!r} holds no adapter_config.json; pass the directory written by "
                       "`peftkit train` or `save_pretrained`")
    return p


def model_ref(name: str) -> str:
    """An existing local directory as an absolute path (recorded in the adapter config); a Hub id unchanged, once
    :func:`check_hub_id` found it (in the cache, or on the Hub with one short request).

    A name that is neither is a :class:`CliError`, before transformers spends ~30 s retrying downloads.
    """
    if Path(name).is_dir():
        return str(Path(name).resolve())
    check_hub_id(name)
    return name


#: seconds the Hub may take to answer whether a model id exists
HUB_CHECK_TIMEOUT = 5.0


@functools.lru_cache(maxsize=64)
def check_hub_id(name: str) -> None:
    """Nothing when ``name`` is a Hub model id in the local cache or on the Hub (one ``model_info`` request with a
    :data:`HUB_CHECK_TIMEOUT`); otherwise a one-line :class:`CliError` saying which of: not a valid id (a path that
    does not exist), offline and not cached, unknown (or private), gated, or the Hub could not be reached."""
    import huggingface_hub
    from huggingface_hub import constants, errors
    from huggingface_hub.utils import validate_repo_id

    head = f"cannot load model {name!r}: not a local directory"
    try:
        validate_repo_id(name)
    except errors.HFValidationError:
        raise CliError(f"{head} (no such directory), and not a Hugging Face Hub id (owner/name)") from None
    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):  # downloaded before: transformers finds its files there
        return
    if constants.HF_HUB_OFFLINE:
        raise CliError(f"{head}, and not in the Hugging Face cache (HF_HUB_OFFLINE is set)")
    try:
        huggingface_hub.model_info(name, timeout=HUB_CHECK_TIMEOUT)
    except errors.GatedRepoError:
        raise CliError(f"cannot load model {name!r}: a gated repo on the Hugging Face Hub: accept its conditions on "
                       f"https://huggingface.co/{name} and log in with `hf auth login`") from None
    except errors.RepositoryNotFoundError:
        raise CliError(f"{head}, and not found on the Hugging Face Hub (unknown id, or a private repo: log in with "
                       "`hf auth login`)") from None
    except errors.HfHubHTTPError as exc:
        raise CliError(f"{head}, and the Hugging Face Hub answered: {_brief(exc)}") from None
    except Exception:  # noqa: BLE001 - the HTTP library's errors (DNS, refused, timeout) vary by hub version
        raise CliError(f"{head}, not in the Hugging Face cache, and the Hub could not be reached (offline?)") from None


def _brief(exc: BaseException, limit: int = 200) -> str:
    """``exc`` as one line of at most about ``limit`` characters, cut after a sentence or between words (a URL in
    it stays whole)."""
    text = _one_line(exc)
    if len(text) <= limit:
        return text
    end = text.rfind(". ", 0, limit)
    if end > 0:
        return text[:end + 1]
    space = text.rfind(" ", 0, limit)
    return (text[:space] if space > 0 else text) + " ..."


def load_base_model(name: str, task_type: str | None, auto_mapping: dict[str, str] | None = None,
                    **kwargs: Any) -> Any:
    """The transformers model for ``task_type`` (``AutoModelFor...``; without a task type the class named in
    ``auto_mapping``, else ``AutoModel``) from a directory or a Hub id.

    A model that cannot be found (no such directory, not in the offline cache) is a :class:`CliError`.
    """
    import transformers

    from ..auto import TASK_TO_AUTO_CLASS

    quiet_transformers()
    if task_type is not None:
        auto_cls = getattr(transformers, TASK_TO_AUTO_CLASS[task_type])
    elif auto_mapping and str(auto_mapping.get("parent_library", "")).startswith("transformers"):
        auto_cls = getattr(transformers, auto_mapping["base_model_class"])
    else:
        auto_cls = transformers.AutoModel
    ref = model_ref(name)
    if "num_labels" in kwargs:  # a new head: a checkpoint's head of another size is replaced, not an error
        kwargs.setdefault("ignore_mismatched_sizes", True)
    try:
        return auto_cls.from_pretrained(ref, **kwargs)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValueError) and "Unrecognized" not in str(exc):
            raise
        raise CliError(f"cannot load model {name!r}: {_where(name)} ({_brief(exc)})") from None


def check_model(name: str) -> None:
    """A :class:`CliError` when ``name`` is neither a local model directory nor a reachable/cached Hub model (reads
    only its ``config.json``, so a typo fails before anything slow happens)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model_ref(name))
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot load model {name!r}: {_where(name)} ({_brief(exc)})") from None


def _where(name: str) -> str:
    if Path(name).is_dir():
        return "the directory has no loadable model"
    return "not a local directory, and not found on the Hugging Face Hub or in its cache"


#: ``(logger name, start of a message)`` of log records the CLI drops: library noise printed at import that says
#: nothing to a user (torchao's optional kernels that fail to load when torch and torchao builds differ; torch
#: deprecating a call that torchao makes; bitsandbytes' optional CPU kernel package not installed). Records of these
#: loggers with other messages are kept.
NOISE_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    ("torchao", "Failed to load "),
    ("torch.utils._pytree", "%s is an Enum subclass and is now natively supported"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)


class _DropMessages:
    """A ``logging`` filter dropping the records whose format string starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self.prefixes = prefixes

    def filter(self, record: Any) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_library_noise() -> None:
    """Install the filters of :data:`NOISE_LOG_RECORDS` (once; before or after the libraries are imported: a filter
    is attached to the named logger, which logging creates on first mention)."""
    import logging

    for name in {name for name, _ in NOISE_LOG_RECORDS}:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(tuple(p for n, p in NOISE_LOG_RECORDS if n == name)))


def quiet_transformers() -> None:
    """Silence transformers' load reports and progress bars (a new classification head is expected here; the
    CLI prints its own progress)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_tokenizer(*candidates: str | None) -> Any:
    """The tokenizer of the first candidate (directory or Hub id) that has one; a pad token is ensured."""
    from transformers import AutoTokenizer

    errors = []
    for ref in candidates:
        if not ref:
            continue
        if Path(ref).is_dir() and not any((Path(ref) / f).is_file() for f in (
                "tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "tokenizer.model")):
            errors.append(f"{ref}: no tokenizer files")
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_ref(ref))
        except CliError as exc:
            errors.append(str(exc))
            continue
        except (OSError, ValueError) as exc:
            errors.append(f"{ref}: {_brief(exc, 160)}")
            continue
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        return tokenizer
    raise CliError("no tokenizer found (" + "; ".join(errors) + "); pass --tokenizer <dir or hub id>")


def method_names() -> list[str]:
    """Every method the CLI accepts: the registered methods (``prompt-tuning`` for ``PROMPT_TUNING``) + variants."""
    from ..registry import all_methods

    names = [str(spec.peft_type).lower().replace("_", "-") for spec in all_methods()]
    return sorted({*names, *METHOD_VARIANTS})


def resolve_method(name: str) -> tuple[Any, dict[str, Any]]:
    """``(MethodSpec, config overrides)`` for a CLI method name (``lora``, ``dora``, ``prompt-tuning``, ...)."""
    from ..registry import get_method

    key = name.lower()
    if key in METHOD_VARIANTS:
        peft_type, overrides = METHOD_VARIANTS[key]
        return get_method(peft_type), dict(overrides)
    allowed = method_names()
    if key not in allowed:
        raise CliError(f"--method {name!r} is not known; allowed: {', '.join(allowed)}")
    return get_method(key.replace("-", "_").upper()), {}


def build_config(method: str, task_type: str, options: dict[str, Any], extra: dict[str, Any],
                 run_facts: dict[str, Any] | None = None) -> Any:
    """The method's config for ``task_type``: generic CLI ``options`` (``r``, ``alpha``, ...; None = the method's
    default) are mapped to the method's field names, then ``extra`` (``--option key=value``) is applied as is.

    ``run_facts`` (e.g. ``{"total_step": 120}``) fill the config fields of those names that the method has (AdaLoRA's
    schedule needs the run's length) unless ``extra`` sets them.
    """
    spec, values = resolve_method(method)
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    values.update({k: v for k, v in (run_facts or {}).items() if k in fields})
    for option, value in options.items():
        if value is None:
            continue
        field = next((f for f in OPTION_FIELDS[option] if f in fields), None)
        if field is None:
            raise CliError(f"--{option.replace('_', '-')} does not apply to --method {method} "
                           f"({spec.config_cls.__name__} has none of the fields {list(OPTION_FIELDS[option])})")
        values[field] = value
    if "num_virtual_tokens" in fields and values.get("num_virtual_tokens") is None:
        values["num_virtual_tokens"] = DEFAULT_VIRTUAL_TOKENS
    unknown = sorted(set(extra) - fields)
    if unknown:
        raise CliError(f"--option {unknown[0]!r} is not a field of {spec.config_cls.__name__}; "
                       f"fields: {', '.join(sorted(fields))}")
    values.update(_coerce_bools(spec.config_cls, extra))
    return spec.config_cls(task_type=task_type, **values)


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict. A value is read as JSON (``true``, ``null``, ``[1, 2]``), else as a Python
    literal (``True``, ``None``, ``['q_proj', 'v_proj']``), else kept as the string it is (``pissa``).

    A value that opens a list, dict or quoted string (``[``, ``{``, ``(``, a quote) but parses as neither is a
    :class:`CliError` naming the key. Words meaning a boolean (``yes``, ``on``, ...) are resolved by
    :func:`build_config`, which knows which fields are booleans.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CliError(f"--option {item!r} is not of the form key=value")
        out[key] = _option_value(key, raw)
    return out


#: ``-o key=word`` words that mean a boolean, accepted for fields whose type is ``bool`` (or ``bool | None``)
BOOL_WORDS: dict[str, bool] = {"true": True, "yes": True, "y": True, "on": True, "1": True,
                               "false": False, "no": False, "n": False, "off": False, "0": False}


def _option_value(key: str, raw: str) -> Any:
    """One ``--option`` value: JSON, else a Python literal, else the raw string (see :func:`parse_options`)."""
    import ast

    text = raw.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        if text[:1] in ("[", "{", "(", "'", '"'):
            kind = {"[": "list", "{": "dict", "(": "tuple"}.get(text[:1], "quoted string")
            raise CliError(f"--option {key}={raw} is not a valid value: it opens a {kind} but is not a JSON or "
                           f"Python literal ({type(exc).__name__}); e.g. {key}=\"['q_proj', 'v_proj']\"") from None
    return raw


def _bool_fields(config_cls: type) -> set[str]:
    """Names of the dataclass fields of ``config_cls`` typed ``bool`` or ``bool | None`` (nothing else)."""
    import typing

    try:
        hints = typing.get_type_hints(config_cls)
    except (NameError, TypeError, AttributeError):  # an unresolvable annotation: use the annotation strings
        hints = {f.name: f.type for f in dataclasses.fields(config_cls)}
    out = set()
    for f in dataclasses.fields(config_cls):
        hint = hints.get(f.name, f.type)
        if isinstance(hint, str):
            plain = hint.replace(" ", "") in ("bool", "bool|None", "Optional[bool]")
        else:
            plain = hint is bool or set(typing.get_args(hint)) == {bool, type(None)}
        if plain:
            out.add(f.name)
    return out


def _coerce_bools(config_cls: type, extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` with the obvious spellings of a boolean (``yes``, ``on``, ``1``, ...) turned into ``bool`` for the
    fields of ``config_cls`` typed ``bool``; any other value of such a field is a :class:`CliError` naming it."""
    bool_fields = _bool_fields(config_cls)
    out = dict(extra)
    for key, value in extra.items():
        if key not in bool_fields or isinstance(value, bool) or value is None:
            continue
        word = str(value).strip().lower()
        if word not in BOOL_WORDS:
            raise CliError(f"--option {key}={value!r}: {config_cls.__name__}.{key} is a boolean; allowed: "
                           "true/false, yes/no, on/off, 1/0")
        out[key] = BOOL_WORDS[word]
    return out


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict; a :class:`CliError` naming the file when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CliError(f"{str(path)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise CliError(f"{str(path)!r} is not valid JSON: {exc}") from None
