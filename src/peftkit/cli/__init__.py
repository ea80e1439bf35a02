"""The ``peftkit`` command line (``python -m peftkit`` or the ``peftkit`` entry point).

Imported only by the entry point: ``import peftkit`` does not load it (nor typer).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    """Run the ``peftkit`` command with ``argv`` (default: ``sys.argv[1:]``)."""
    from .common import quiet_library_noise

    quiet_library_noise()
    from .app import main as _main

    _main(argv)


__all__ = ["main"]
