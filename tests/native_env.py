"""The native decode kernel in tests, whatever ``PEFTKIT_NATIVE`` says.

``PEFTKIT_NATIVE=0`` tells peftkit's callers to use torch ops (``lowrank_kernel()`` returns None): the suite runs
with it too, to check that fallback. Tests *of the kernel* still check the kernel then, built as a process
without the variable would build it (:func:`built_kernel`), and additionally assert that the switch is honoured
(:func:`disabled_by_environment`)."""

from __future__ import annotations

import os

import pytest

from peftkit.ops import native


def disabled_by_environment() -> bool:
    """Whether this process runs with ``PEFTKIT_NATIVE`` set to a value that disables the kernel (as
    ``peftkit.ops.native._resolve`` reads it)."""
    return os.environ.get("PEFTKIT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def built_kernel(monkeypatch: pytest.MonkeyPatch) -> native.Kernel | None:
    """The native kernel as a process without ``PEFTKIT_NATIVE`` resolves it (built into, or loaded from, the
    usual cache and self-checked); None only where it cannot be built here. When the environment disables the
    kernel, first asserts that peftkit's own lookup honours that (``lowrank_kernel() is None``)."""
    if disabled_by_environment():
        assert native.lowrank_kernel() is None, "PEFTKIT_NATIVE disables the kernel, yet lowrank_kernel() has one"
        monkeypatch.delenv("PEFTKIT_NATIVE")
        return native._resolve()
    return native.lowrank_kernel()
