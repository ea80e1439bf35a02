"""Reading training data: files (JSON Lines, JSON, CSV/TSV, Parquet) and ``datasets`` datasets (a ``save_to_disk``
directory or a Hub id), as rows whose errors name the source, line (or row) and field.

A data *source* is one string:

* a file: ``data.jsonl`` / ``.ndjson`` (one object per line), ``.json`` (JSON Lines or one list of objects),
  ``.csv`` / ``.tsv`` (header row first), ``.parquet``;
* a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, optionally ``dir:split``;
* a Hugging Face Hub dataset id, loaded with ``datasets.load_dataset``: ``id``, ``id:split`` or
  ``id:config:split`` (the split may be sliced: ``tatsu-lab/alpaca:train[:1000]``; default split ``train``).

This module imports only the standard library at import time (``--help`` reads :data:`DATA_HELP` from it).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import CliError, require_file

#: what a row of each task holds (the ``--data`` help and the README table say the same)
ROW_FORMATS: dict[str, str] = {
    "causal-lm": "text; or instruction, input (optional), output (alpaca); or messages (role/content turns; "
                 "sharegpt conversations with from/value); or prompt, completion",
    "seq-cls": "text, label",
    "token-cls": "tokens (words or a string), tags (one label per word)",
    "seq2seq-lm": "text, target",
    "question-ans": "question, context, answer (a span of the context)",
    "feature-extraction": "text, pair (a related text)",
}

#: ``peftkit train --data`` help text
DATA_HELP = (
    "Training data: a .jsonl, .json, .csv, .tsv or .parquet file, a datasets directory (save_to_disk; DIR:SPLIT), "
    "or a Hub dataset id (ID, ID:SPLIT or ID:CONFIG:SPLIT; default split train). Fields of a row per --task: "
    + "; ".join(f"{task}: {fields}" for task, fields in ROW_FORMATS.items()) + "."
)

#: file suffixes read here -> reader kind
FILE_KINDS: dict[str, str] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
                              ".tsv": "tsv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Row:
    """One example: its values by field name and where it came from (1-based ``line`` of a text file, or ``row``
    number of a JSON list, Parquet file or dataset: ``unit`` says which)."""

    line: int
    values: dict[str, Any]
    unit: str = "line"

    @property
    def where(self) -> str:
        """``"line 7"`` / ``"row 7"``: how error messages point at this row."""
        return f"{self.unit} {self.line}"


#: a field check: ``value -> error text or None``
Check = Callable[[Any], "str | None"]
#: checks for :func:`read_rows`: ``{field: check}``, or a function of the first row returning them (for data whose
#: fields depend on its format, e.g. causal-LM rows in alpaca or chat form)
Checks = dict[str, Check] | Callable[[Row], dict[str, Check]]


#: what a "field is missing" error suggests, unless the check carries its own ``hint`` (:func:`hinted`)
FIELD_HINT = "choose the field with --text-field / --label-field"


def optional(check: Check) -> Check:
    """``check`` for a field a row may leave out (or set to null / empty)."""

    def run(value: Any) -> str | None:
        return None if value is None or value == "" else check(value)

    run.optional = True  # type: ignore[attr-defined]
    run.hint = getattr(check, "hint", FIELD_HINT)  # type: ignore[attr-defined]
    return run


def hinted(check: Check, hint: str) -> Check:
    """``check`` whose "field is missing" error ends with ``hint`` instead of :data:`FIELD_HINT`."""

    def run(value: Any) -> str | None:
        return check(value)

    run.optional = getattr(check, "optional", False)  # type: ignore[attr-defined]
    run.hint = hint  # type: ignore[attr-defined]
    return run


def is_text(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__} {value!r:.40}"
    if not value.strip():
        return "must not be empty"
    return None


def is_label(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        return f"must be a class name (string) or an integer id, got {type(value).__name__} {value!r:.40}"
    return None


def is_token_labels(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return f"must be a non-empty list of per-word labels, got {type(value).__name__}"
    return next((f"item {i}: {err}" for i, v in enumerate(value) if (err := is_label(v))), None)


def is_words(value: Any) -> str | None:
    if isinstance(value, str):
        return is_text(value)
    if not isinstance(value, list) or not value or not all(isinstance(w, str) for w in value):
        return f"must be a list of words (strings) or a string, got {type(value).__name__}"
    return None


# ---------------------------------------------------------------------------------------------------- reading
def read_rows(path: str | Path, checks: Checks) -> list[Row]:
    """The rows of a data source (see the module docstring), each checked.

    ``checks`` is ``{field: check}`` (or a function of the first row returning that dict): every row must have the
    fields (unless the check is :func:`optional`) and pass each check. The first failure is a :class:`CliError`
    like ``data.jsonl line 7: field 'label' is missing (fields present: text, lbl)``.
    """
    name, rows = load_source(str(path))
    if not rows:
        raise CliError(f"data {name!r} holds no rows")
    if callable(checks):
        try:
            field_checks = checks(rows[0])
        except CliError as exc:
            raise CliError(f"{name} {exc}") from None
    else:
        field_checks = checks
    for row in rows:
        _check_row(name, row, field_checks)
    return rows


def _check_row(name: str, row: Row, checks: dict[str, Check]) -> None:
    for field, check in checks.items():
        if field not in row.values:
            if getattr(check, "optional", False):
                continue
            present = ", ".join(row.values) or "none"
            raise CliError(f"{name} {row.where}: field {field!r} is missing (fields present: {present}); "
                           f"{getattr(check, 'hint', FIELD_HINT)}")
        error = check(row.values[field])
        if error:
            raise CliError(f"{name} {row.where}: field {field!r} {error}")


def load_source(source: str) -> tuple[str, list[Row]]:
    """``(name for messages, rows)`` of a file, a ``save_to_disk`` directory or a Hub dataset id (unchecked)."""
    p = Path(source)
    if p.is_file():
        return p.name, _read_file(p)
    if p.is_dir():
        return source, _read_disk_dataset(p, None, source)
    base, config, split = _split_spec(source)
    if Path(base).is_dir() and config is None:
        return source, _read_disk_dataset(Path(base), split, source)
    if Path(base).is_file():
        raise CliError(f"data file {base!r} has no splits; drop ':{source[len(base) + 1:]}'")
    if Path(base).suffix.lower() in FILE_KINDS or not _HUB_ID.match(base):
        require_file(source, "data")  # raises: the file does not exist
    return source, _read_hub_dataset(base, config, split, source)


#: a Hub dataset id: ``name`` or ``owner/name``
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
#: ``base[:a[:b]]`` where a split may carry a slice in brackets (``train[:10%]``)
_SPEC = re.compile(r"^(?P<base>[^:\[\]]+)(?::(?P<a>[^:\[\]]+(?:\[[^\]]*\])?))?(?::(?P<b>[^:\[\]]+(?:\[[^\]]*\])?))?$")


def _split_spec(source: str) -> tuple[str, str | None, str | None]:
    """``"id"`` -> (id, None, None); ``"id:split"`` -> (id, None, split); ``"id:config:split"`` -> (id, config,
    split). A string of another shape is returned whole as the base."""
    m = _SPEC.match(source)
    if not m:
        return source, None, None
    if m["b"] is not None:
        return m["base"], m["a"], m["b"]
    return m["base"], None, m["a"]


def _read_file(path: Path) -> list[Row]:
    kind = FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise CliError(f"data file {str(path)!r}: unknown format {path.suffix!r}; allowed: "
                       f"{', '.join(FILE_KINDS)} files, a save_to_disk directory or a Hub dataset id")
    if kind == "jsonl":
        return _read_jsonl(path)
    if kind == "json":
        return _read_json(path)
    if kind == "parquet":
        return _read_parquet(path)
    return _read_csv(path, "\t" if kind == "tsv" else ",")


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip())
            except json.JSONDecodeError as exc:
                raise CliError(f"{path.name} line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(value, dict):
                raise CliError(f"{path.name} line {number}: expected a JSON object, got {type(value).__name__}")
            rows.append(Row(number, value))
    return rows


def _read_json(path: Path) -> list[Row]:
    """A ``.json`` file holding one list of objects, or JSON Lines."""
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        return _read_jsonl(path)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{path.name} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    bad = next((i for i, item in enumerate(items, start=1) if not isinstance(item, dict)), None)
    if bad is not None:
        raise CliError(f"{path.name} row {bad}: expected a JSON object, got {type(items[bad - 1]).__name__}")
    return [Row(i, item, "row") for i, item in enumerate(items, start=1)]


def _read_csv(path: Path, delimiter: str) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        try:
            for record in reader:
                if None in record:
                    raise CliError(f"{path.name} line {reader.line_num}: more values than header columns")
                missing = [k for k, v in record.items() if v is None]
                if missing:
                    raise CliError(f"{path.name} line {reader.line_num}: field {missing[0]!r} is missing "
                                   "(fewer values than header columns)")
                rows.append(Row(reader.line_num, {k: _csv_value(v) for k, v in record.items()}))
        except csv.Error as exc:
            raise CliError(f"{path.name} line {reader.line_num}: not valid CSV ({exc})") from None
    return rows


def _csv_value(text: str) -> Any:
    """CSV cells are strings; integer labels and JSON lists (token labels, chat turns) are decoded."""
    stripped = text.strip()
    if stripped.lstrip("-").isdigit():
        return int(stripped)
    if stripped.startswith("["):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return text
    return text


def _read_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise CliError(f"{path.name}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        records = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as exc:  # ArrowInvalid for a file that is not Parquet
        raise CliError(f"{path.name}: not a readable Parquet file ({_first_line(exc)})") from None
    return [Row(i, record, "row") for i, record in enumerate(records, start=1)]


# ---------------------------------------------------------------------------------------------------- datasets
def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise CliError("reading a datasets directory or a Hub dataset needs the datasets package "
                       "(pip install datasets)") from None
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def _read_disk_dataset(path: Path, split: str | None, name: str) -> list[Row]:
    """A ``save_to_disk`` directory: a ``Dataset``, or one split of a ``DatasetDict`` (``train`` or the only one by
    default)."""
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(f"data directory {str(path)!r} is not a dataset saved with save_to_disk "
                       f"({_first_line(exc)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded[_pick_split(list(loaded), split, name)]
    elif split is not None:
        raise CliError(f"data {name!r}: the directory holds one dataset, not splits; drop ':{split}'")
    return _dataset_rows(loaded)


def _pick_split(splits: list[str], split: str | None, name: str) -> str:
    if split is None:
        if "train" in splits or len(splits) == 1:
            return "train" if "train" in splits else splits[0]
        raise CliError(f"data {name!r} has splits {', '.join(splits)}; choose one with {name}:<split>")
    if split not in splits:
        raise CliError(f"data {name!r} has no split {split!r}; splits: {', '.join(splits)}")
    return split


def _read_hub_dataset(dataset_id: str, config: str | None, split: str | None, name: str) -> list[Row]:
    datasets = _datasets()
    try:
        loaded = datasets.load_dataset(dataset_id, config, split=split or "train")
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:  # not found, offline, bad split/config
        where = ("not a local file or directory, and not loadable from the Hugging Face Hub or its cache "
                 if isinstance(exc, (FileNotFoundError, ConnectionError)) else "")
        raise CliError(f"cannot load dataset {name!r}: {where}({type(exc).__name__}: "
                       f"{_first_line(exc)[:200]})") from None
    return _dataset_rows(loaded)


def _dataset_rows(dataset: Any) -> list[Row]:
    return [Row(i, dict(values), "row") for i, values in enumerate(dataset, start=1)]


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def label_vocabulary(values: Sequence[Any]) -> list[str]:
    """Sorted class names of ``values`` (labels or lists of labels): integer ids ``0..max`` keep their order."""
    flat: list[Any] = [v for value in values for v in (value if isinstance(value, list) else [value])]
    if all(isinstance(v, int) for v in flat):
        if min(flat) < 0:
            raise CliError(f"integer labels must be >= 0, got {min(flat)}")
        return [str(i) for i in range(max(flat) + 1)]
    return sorted({str(v) for v in flat})


def source_name(source: str) -> str:
    """How messages name a data source: a file's name, otherwise the source as given."""
    return Path(source).name if Path(source).is_file() else source
