"""The ``peftkit`` console script: answers ``peftkit --version`` without importing peftkit (whose ``__init__``
imports torch, ~2 s), and hands every other command line to :func:`peftkit.cli.main`.

It lives outside the ``peftkit`` package because importing anything under ``peftkit`` runs ``peftkit/__init__.py``.
"""

from __future__ import annotations

import sys


def installed_version() -> str | None:
    """The version of the installed ``peftkit`` distribution (its metadata; no import), or None when not installed."""
    from importlib import metadata

    try:
        return metadata.version("peftkit")
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``peftkit`` command: ``argv`` defaults to ``sys.argv[1:]``."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args == ["--version"]:
        version = installed_version()
        if version is not None:
            print(f"peftkit {version}")
            raise SystemExit(0)
    from peftkit.cli import main as cli_main

    cli_main(args)


__all__ = ["installed_version", "main"]
