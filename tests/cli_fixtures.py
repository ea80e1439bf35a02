"""Shared helpers of the command-line tests: running ``peftkit`` in-process and writing data files (the tiny saved
models they train on are module-scoped fixtures in ``conftest.py``: ``work``, ``llama_dir``, ``bert_dir``,
``lm_data``, ``cls_data``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from peftkit.cli.app import app


def cli(*args: str | Path, code: int = 0, stdout_only: bool = False, input: str | None = None) -> str:
    """Run ``peftkit args`` in-process; assert the exit code; return stdout + stderr (or stdout only)."""
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    if result.exit_code != code:
        raise AssertionError(f"exit {result.exit_code} != {code}\n{result.output}\n{result.exception!r}")
    return result.stdout if stdout_only else result.output


def error_line(out: str) -> str:
    """The single ``error:`` line of a command's output (and no traceback)."""
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in out, out
    return lines[0]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
