"""Reading training data: JSON Lines or CSV files of rows, with errors that name the file, line and field."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import CliError, require_file


@dataclass(frozen=True)
class Row:
    """One example: its values by field name and the line of the file it came from (1-based)."""

    line: int
    values: dict[str, Any]


#: a field check: ``value -> error text or None``
Check = Callable[[Any], "str | None"]


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


def read_rows(path: str | Path, checks: dict[str, Check]) -> list[Row]:
    """The rows of a ``.jsonl`` / ``.json`` (one object per line) or ``.csv`` file (header row first).

    Every row must have the fields of ``checks`` and pass each check; the first failure is a :class:`CliError`
    like ``data.jsonl line 7: field 'label' is missing (fields present: text, lbl)``.
    """
    p = require_file(path, "data")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = _read_jsonl(p)
    elif suffix in (".csv", ".tsv"):
        rows = _read_csv(p, "\t" if suffix == ".tsv" else ",")
    else:
        raise CliError(f"data file {str(p)!r}: unknown format {suffix!r}; allowed: .jsonl, .csv, .tsv")
    if not rows:
        raise CliError(f"data file {str(p)!r} holds no rows")
    for row in rows:
        for field, check in checks.items():
            if field not in row.values:
                present = ", ".join(row.values) or "none"
                raise CliError(f"{p.name} line {row.line}: field {field!r} is missing (fields present: {present}); "
                               "choose the field with --text-field / --label-field")
            error = check(row.values[field])
            if error:
                raise CliError(f"{p.name} line {row.line}: field {field!r} {error}")
    return rows


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


def _read_csv(path: Path, delimiter: str) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        for record in reader:
            if None in record:
                raise CliError(f"{path.name} line {reader.line_num}: more values than header columns")
            missing = [k for k, v in record.items() if v is None]
            if missing:
                raise CliError(f"{path.name} line {reader.line_num}: field {missing[0]!r} is missing "
                               "(fewer values than header columns)")
            rows.append(Row(reader.line_num, {k: _csv_value(v) for k, v in record.items()}))
    return rows


def _csv_value(text: str) -> Any:
    """CSV cells are strings; integer labels and JSON lists (token labels) are decoded."""
    stripped = text.strip()
    if stripped.lstrip("-").isdigit():
        return int(stripped)
    if stripped.startswith("["):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return text
    return text


def label_vocabulary(values: Sequence[Any]) -> list[str]:
    """Sorted class names of ``values`` (labels or lists of labels): integer ids ``0..max`` keep their order."""
    flat: list[Any] = [v for value in values for v in (value if isinstance(value, list) else [value])]
    if all(isinstance(v, int) for v in flat):
        if min(flat) < 0:
            raise CliError(f"integer labels must be >= 0, got {min(flat)}")
        return [str(i) for i in range(max(flat) + 1)]
    return sorted({str(v) for v in flat})
