"""Helpers shared by the ``peftkit`` commands: the CLI's error type, loading models/tokenizers, method names.

Every failure a user can cause (missing file, malformed row, unknown model, a target matching nothing) ends up as
a :class:`CliError` or a peftkit typed error; :func:`guard` turns those into one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    """An existing local directory as an absolute path (recorded in the adapter config); a Hub id unchanged."""
    return str(Path(name).resolve()) if Path(name).is_dir() else name


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
        raise CliError(f"cannot load model {name!r}: {_where(name)} ({_one_line(exc)[:200]})") from None


def check_model(name: str) -> None:
    """A :class:`CliError` when ``name`` is neither a local model directory nor a reachable/cached Hub model (reads
    only its ``config.json``, so a typo fails before anything slow happens)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model_ref(name))
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot load model {name!r}: {_where(name)} ({_one_line(exc)[:200]})") from None


def _where(name: str) -> str:
    if Path(name).is_dir():
        return "the directory has no loadable model"
    return "not a local directory, and not found on the Hugging Face Hub or in its cache"


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
        except (OSError, ValueError) as exc:
            errors.append(f"{ref}: {_one_line(exc)[:160]}")
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
    values.update(extra)
    return spec.config_cls(task_type=task_type, **values)


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict; values are parsed as JSON when they are JSON (numbers, lists, booleans)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CliError(f"--option {item!r} is not of the form key=value")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict; a :class:`CliError` naming the file when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CliError(f"{str(path)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise CliError(f"{str(path)!r} is not valid JSON: {exc}") from None
