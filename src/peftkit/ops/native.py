"""peftkit's native CPU kernel for the decode-time LoRA update, built on first use, with its plain reference.

``add_lowrank(x, A, bts, out, rows, in, r, n_out)`` adds ``(x @ A.T) @ bts`` into ``out`` in one C call
(``_lowrank_native.c``): float32, row-major, contiguous, CPU; ``x: (rows, in)``, ``A: (r, in)``,
``bts: (r, n_out)`` (``scaling * B.T``), ``out: (rows, n_out)``; the tensors are passed by address, so callers
check all of that first (:func:`add_lowrank_native_` does, for anything but the hot path).

At decode shapes the update is three tiny torch ops whose dispatch, temporaries and cold-cache misses (the base
matmul has just streamed megabytes of weights) cost more than the arithmetic; one call made unmerged greedy
decoding of a 98M Llama ~3-4% faster. The kernel is compiled once per machine and Python build with the C
compiler Python was built with, into ``$PEFTKIT_CACHE`` (default ``~/.cache/peftkit``), then loaded from there.
Without a compiler or Python headers, on Windows, when the build or its self-check fails, or with
``PEFTKIT_NATIVE=0``, :func:`lowrank_kernel` returns None and callers use torch ops: the kernel is never required.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

Kernel = Callable[[int, int, int, int, int, int, int, int], None]

_SOURCE = Path(__file__).with_name("_lowrank_native.c")
_MODULE = "_peftkit_lowrank"  # the name PyInit_ in the source is built from
_UNSET: object = object()
_kernel: object = _UNSET  # Kernel | None once resolved (per process)
_lock = threading.Lock()


def add_lowrank_reference_(out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, bts: torch.Tensor) -> torch.Tensor:
    """Plain ``out += (x @ A.T) @ bts``; ``x: (rows, in)``, ``A: (r, in)``, ``bts: (r, n_out)``,
    ``out: (rows, n_out)``."""
    return out.add_((x @ A.t()) @ bts)


def lowrank_kernel() -> Kernel | None:
    """The native ``add_lowrank`` (see the module docstring), compiled and loaded on the first call of the process;
    None when it is disabled or unavailable (the reason is logged at debug level)."""
    global _kernel
    if _kernel is _UNSET:
        with _lock:
            if _kernel is _UNSET:
                _kernel = _resolve()
    return _kernel  # type: ignore[return-value]


def add_lowrank_native_(out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, bts: torch.Tensor) -> torch.Tensor:
    """``out += (x @ A.T) @ bts`` through the native kernel after checking every precondition, else through
    :func:`add_lowrank_reference_`. Shapes as there; returns ``out``."""
    kernel = lowrank_kernel()
    tensors = (out, x, A, bts)
    if (kernel is None or any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous()
                              or t.dim() != 2 for t in tensors)
            or x.shape[1] != A.shape[1] or A.shape[0] != bts.shape[0] or out.shape != (x.shape[0], bts.shape[1])):
        return add_lowrank_reference_(out, x, A, bts)
    kernel(x.data_ptr(), A.data_ptr(), bts.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], A.shape[0],
           bts.shape[1])
    return out


def cache_dir() -> Path:
    """Where built kernels live: ``$PEFTKIT_CACHE``, else ``$XDG_CACHE_HOME/peftkit``, else ``~/.cache/peftkit``."""
    root = os.environ.get("PEFTKIT_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "peftkit" if xdg else Path.home() / ".cache" / "peftkit"


def _resolve() -> Kernel | None:
    if os.environ.get("PEFTKIT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        logger.debug("native kernel disabled by PEFTKIT_NATIVE")
        return None
    try:
        kernel = _load(_build())
        _self_check(kernel)
    except Exception as exc:  # noqa: BLE001 - any failure means "use torch ops"; never break a forward
        logger.debug("native low-rank kernel unavailable (%s): using torch ops", exc)
        return None
    return kernel


def _compiler() -> list[str]:
    """The command that compiles and links an extension: Python's own ``LDSHARED`` (compiler and shared-library
    flags; honours ``$CC``)."""
    ldshared = os.environ.get("LDSHARED") or sysconfig.get_config_var("LDSHARED")
    if not ldshared:
        raise RuntimeError("Python reports no LDSHARED (no C toolchain configuration)")
    cmd = shlex.split(ldshared)
    cc = os.environ.get("CC")
    if cc and not os.environ.get("LDSHARED"):
        cmd = shlex.split(cc) + cmd[1:]
    return cmd


def _build() -> Path:
    """Compile the kernel unless this source, Python build and compiler already have one in the cache; return the
    library's path. Written to a temporary name and renamed, so concurrent processes never load a partial file."""
    if os.name == "nt":
        raise RuntimeError("not built on Windows")
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").is_file():
        raise RuntimeError(f"Python headers not found in {include}")
    source = _SOURCE.read_bytes()
    cmd = _compiler()
    flags = ["-O3", "-fPIC", "-fopenmp-simd", "-I", include]
    key = hashlib.sha256(b"\0".join([source, sys.version.encode(), platform.machine().encode(),
                                     " ".join(cmd + flags).encode()])).hexdigest()[:16]
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    folder = cache_dir() / "native"
    target = folder / f"{_MODULE}-{key}{suffix}"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{_MODULE}-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        run = subprocess.run([*cmd, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120,
                             check=False)
        if run.returncode != 0:
            raise RuntimeError(f"compiler exited with {run.returncode}: {run.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load(path: Path) -> Kernel:
    loader = importlib.machinery.ExtensionFileLoader(_MODULE, str(path))
    spec = importlib.util.spec_from_file_location(_MODULE, str(path), loader=loader)
    if spec is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module.add_lowrank  # type: ignore[no-any-return]


def _self_check(kernel: Kernel) -> None:
    """Run the kernel once against the reference on odd sizes (ranks above and below its blocks, a ragged output
    block): a miscompiled or mismatched library is rejected rather than trusted."""
    gen = torch.Generator().manual_seed(0)
    for rows, n_in, r, n_out in ((1, 37, 5, 70), (3, 16, 67, 129)):
        x, A = torch.randn(rows, n_in, generator=gen), torch.randn(r, n_in, generator=gen)
        bts, out = torch.randn(r, n_out, generator=gen), torch.randn(rows, n_out, generator=gen)
        expected = add_lowrank_reference_(out.clone(), x, A, bts)
        kernel(x.data_ptr(), A.data_ptr(), bts.data_ptr(), out.data_ptr(), rows, n_in, r, n_out)
        if not torch.allclose(out, expected, rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"self-check failed: max |diff| {float((out - expected).abs().max()):.3g}")
