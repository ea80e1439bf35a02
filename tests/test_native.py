"""The native decode kernel (``peftkit.ops.native``): equal to its plain reference on every shape class it meets,
built once per cache and reused, and never required: disabled, without a compiler or headers, or failing its
self-check, it resolves to None and callers use torch ops."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
from native_env import built_kernel, disabled_by_environment

from peftkit.ops import native


def _toolchain_present() -> bool:
    include = sysconfig.get_paths()["include"]
    compiler = (sysconfig.get_config_var("LDSHARED") or "").split()
    return bool(compiler) and shutil.which(compiler[0]) is not None and Path(include, "Python.h").is_file()


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process state in which the kernel is not resolved yet, with its cache in ``tmp_path``."""
    monkeypatch.setattr(native, "_kernel", native._UNSET)
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    monkeypatch.delenv("PEFTKIT_NATIVE", raising=False)
    return tmp_path


def _problem(rows: int, n_in: int, r: int, n_out: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, n_out, generator=g), torch.randn(rows, n_in, generator=g),
            torch.randn(r, n_in, generator=g), torch.randn(r, n_out, generator=g))


def test_kernel_is_available_exactly_when_a_toolchain_is(monkeypatch):
    disabled, available = disabled_by_environment(), native.lowrank_kernel() is not None  # before built_kernel
    assert (built_kernel(monkeypatch) is not None) is _toolchain_present()  # unsets PEFTKIT_NATIVE
    assert available is (_toolchain_present() and not disabled)  # PEFTKIT_NATIVE=0: callers use torch ops


# decode row, a few rows, rank above one block (64) and not a multiple of 4, ragged output block, tiny sizes
@pytest.mark.parametrize("rows,n_in,r,n_out", [(1, 12, 4, 10), (1, 768, 16, 768), (3, 37, 67, 129), (5, 8, 1, 3),
                                               (20, 64, 64, 200), (2, 2048, 130, 65)])
def test_kernel_equals_reference(monkeypatch, rows, n_in, r, n_out):
    kernel = built_kernel(monkeypatch)  # with PEFTKIT_NATIVE=0 too: this tests the kernel itself
    if kernel is None:
        pytest.fail("no native kernel although the toolchain is present" if _toolchain_present()
                    else "no toolchain on this machine: the kernel cannot be checked")
    out, x, A, bts = _problem(rows, n_in, r, n_out)
    expected = native.add_lowrank_reference_(out.double(), x.double(), A.double(), bts.double())
    monkeypatch.setattr(native, "_kernel", kernel)
    got = native.add_lowrank_native_(out, x, A, bts)
    assert got is out
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * (1 + expected.abs().max().item()))


@pytest.mark.parametrize("case", ["float64", "x_transposed", "bts_transposed", "wrong_out_shape", "3d"])
def test_wrapper_checks_inputs_and_falls_back_to_the_reference(monkeypatch, case):
    def refuse(*args):
        raise AssertionError("the kernel must not see these inputs")

    monkeypatch.setattr(native, "_kernel", refuse)
    out, x, A, bts = _problem(4, 6, 3, 5)
    if case == "float64":
        out, x, A, bts = (t.double() for t in (out, x, A, bts))
    elif case == "x_transposed":
        x = x.t().contiguous().t()
    elif case == "bts_transposed":
        bts = bts.t().contiguous().t()
    elif case == "3d":
        out, x = out.unsqueeze(0), x.unsqueeze(0)
    expected = (x @ A.t()) @ bts + out
    if case == "wrong_out_shape":
        with pytest.raises(RuntimeError):  # the reference's own shape error, not a write out of bounds
            native.add_lowrank_native_(out[:, :4], x, A, bts)
        return
    torch.testing.assert_close(native.add_lowrank_native_(out, x, A, bts), expected)


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_disabled_by_environment(fresh, monkeypatch, value):
    monkeypatch.setenv("PEFTKIT_NATIVE", value)
    assert native.lowrank_kernel() is None
    assert not (fresh / "native").exists()  # nothing was built


def test_built_once_then_loaded_from_the_cache(fresh, monkeypatch):
    if not _toolchain_present():
        assert native.lowrank_kernel() is None
        return
    assert native.lowrank_kernel() is not None
    built = sorted((fresh / "native").iterdir())
    assert len(built) == 1 and built[0].name.startswith("_peftkit_lowrank-")  # no temporary file left behind

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again although the cache holds the kernel")

    monkeypatch.setattr(native.subprocess, "run", no_compiler)
    monkeypatch.setattr(native, "_kernel", native._UNSET)  # a new process
    kernel = native.lowrank_kernel()
    assert kernel is not None
    out, x, A, bts = _problem(1, 9, 2, 7)
    expected = native.add_lowrank_reference_(out.clone(), x, A, bts)
    kernel(x.data_ptr(), A.data_ptr(), bts.data_ptr(), out.data_ptr(), 1, 9, 2, 7)
    torch.testing.assert_close(out, expected)


def test_compiler_failure_falls_back_and_leaves_no_partial_file(fresh, monkeypatch):
    monkeypatch.setenv("LDSHARED", "false")  # a "compiler" that exits 1
    assert native.lowrank_kernel() is None
    assert list((fresh / "native").iterdir()) == []


def test_missing_python_headers_fall_back(fresh, monkeypatch, tmp_path):
    paths = dict(sysconfig.get_paths(), include=str(tmp_path / "no-headers"))
    monkeypatch.setattr(native.sysconfig, "get_paths", lambda: paths)
    assert native.lowrank_kernel() is None


def test_a_kernel_failing_its_self_check_is_rejected(fresh, monkeypatch):
    monkeypatch.setattr(native, "_build", lambda: Path("unused"))
    monkeypatch.setattr(native, "_load", lambda path: lambda *args: None)  # "adds" nothing
    assert native.lowrank_kernel() is None


def test_kernel_rejects_bad_arguments_with_typed_errors(monkeypatch):
    kernel = built_kernel(monkeypatch)
    if kernel is None:
        assert not _toolchain_present()
        return
    with pytest.raises(TypeError, match="8 arguments"):
        kernel(1, 2, 3)
    with pytest.raises(ValueError, match=">= 0"):
        kernel(0, 0, 0, 0, 1, -1, 1, 1)
    with pytest.raises(ValueError, match="null address"):
        kernel(0, 0, 0, 0, 1, 4, 2, 3)


def test_the_kernel_source_ships_in_the_wheel(tmp_path):
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(root)], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    (wheel,) = tmp_path.glob("peftkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "peftkit/ops/_lowrank_native.c" in names and "peftkit/ops/native.py" in names
