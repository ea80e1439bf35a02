"""``ops.lowrank``: the in-place fast path ``add_lowrank_`` equals ``lowrank_update_reference`` in values and
gradients, and falls back to the reference when writing in place is not allowed; the no-grad form with a pre-scaled,
pre-transposed B equals the reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import fp_tol

from peftkit.ops.lowrank import (
    add_lowrank_,
    add_lowrank_pretransposed_,
    can_update_inplace,
    lowrank_update_reference,
    scaled_transpose,
)

SETTINGS = settings(max_examples=25, deadline=None)

shapes = st.fixed_dictionaries({
    "lead": st.lists(st.integers(1, 4), min_size=1, max_size=2),  # (N,) for 2-D inputs, (B, T) for 3-D
    "d_in": st.integers(1, 9),
    "d_out": st.integers(1, 9),
    "r": st.integers(1, 5),
    "bias": st.booleans(),
    "scaling": st.floats(-4.0, 4.0, allow_nan=False, allow_infinity=False),
    "seed": st.integers(0, 2**16),
})


def _tensors(spec, dtype=torch.float32):
    g = torch.Generator().manual_seed(spec["seed"])
    lead, d_in, d_out, r = spec["lead"], spec["d_in"], spec["d_out"], spec["r"]
    x = torch.randn(*lead, d_in, generator=g, dtype=dtype)
    W = torch.randn(d_out, d_in, generator=g, dtype=dtype)  # frozen base weight
    A = torch.randn(r, d_in, generator=g, dtype=dtype)
    B = torch.randn(d_out, r, generator=g, dtype=dtype)
    bias = torch.randn(d_out, generator=g, dtype=dtype) if spec["bias"] else None
    return x, W, A, B, bias


def _run(fn, spec, dtype=torch.float32):
    """Base linear output plus the low-rank update via ``fn``; returns output and grads of x, A, B, bias."""
    x, W, A, B, bias = _tensors(spec, dtype)
    leaves = [t.requires_grad_() for t in (x, A, B)] + ([bias.requires_grad_()] if bias is not None else [])
    result = torch.nn.functional.linear(x, W)  # non-leaf output no autograd node saved
    out = fn(result, x, A, B, spec["scaling"], bias)
    weight = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * weight).sum().backward()
    return out.detach(), [t.grad for t in leaves], result


@SETTINGS
@given(spec=shapes)
def test_values_and_gradients_match_reference(spec):
    out_fast, grads_fast, _ = _run(add_lowrank_, spec)
    out_ref, grads_ref, _ = _run(lowrank_update_reference, spec)
    assert out_fast.shape == (*spec["lead"], spec["d_out"])
    torch.testing.assert_close(out_fast, out_ref, atol=1e-5, rtol=1e-5)
    for g_fast, g_ref in zip(grads_fast, grads_ref):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(spec=shapes)
def test_fast_path_writes_in_place(spec):
    x, W, A, B, bias = _tensors(spec)
    result = torch.nn.functional.linear(x, W)
    expected = lowrank_update_reference(result.clone(), x, A, B, spec["scaling"], bias)
    ptr = result.data_ptr()
    out = add_lowrank_(result, x, A, B, spec["scaling"], bias)
    assert out is result and out.data_ptr() == ptr
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(spec=shapes)
def test_leaf_result_requiring_grad_falls_back(spec):
    x, _, A, B, bias = _tensors(spec)
    result = torch.randn(*spec["lead"], spec["d_out"], requires_grad=True)
    assert not can_update_inplace(result, A)
    out = add_lowrank_(result, x, A, B, spec["scaling"], bias)
    assert out is not result
    torch.testing.assert_close(out, lowrank_update_reference(result, x, A, B, spec["scaling"], bias))
    out.sum().backward()
    torch.testing.assert_close(result.grad, torch.ones_like(result))  # result itself is untouched and in the graph


@SETTINGS
@given(spec=shapes)
def test_dtype_mismatch_falls_back(spec):
    x, W, A, B, bias = _tensors(spec)
    result = torch.nn.functional.linear(x, W).double()  # base in float64, adapter in float32
    snapshot = result.clone()
    assert not can_update_inplace(result, A)
    out = add_lowrank_(result, x, A, B, spec["scaling"], bias)
    assert out.dtype == torch.float64
    assert torch.equal(result, snapshot)  # not written
    torch.testing.assert_close(out, lowrank_update_reference(snapshot, x, A, B, spec["scaling"], bias))
    out_fast, grads_fast, _ = _run(lambda r, *a: add_lowrank_(r.double(), *a), spec)
    out_ref, grads_ref, _ = _run(lambda r, *a: lowrank_update_reference(r.double(), *a), spec)
    torch.testing.assert_close(out_fast, out_ref)
    for g_fast, g_ref in zip(grads_fast, grads_ref):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=1e-5)


def test_non_contiguous_result_falls_back():
    g = torch.Generator().manual_seed(0)
    x, A, B = torch.randn(5, 3, generator=g), torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g)
    result = torch.randn(4, 5, generator=g).t()  # (5, 4), not contiguous
    snapshot = result.clone()
    out = add_lowrank_(result, x, A, B, 0.5)
    assert out is not result and torch.equal(result, snapshot)
    torch.testing.assert_close(out, snapshot + 0.5 * x @ A.t() @ B.t())


def test_view_of_leaf_requiring_grad_falls_back():
    base = torch.zeros(2, 4, requires_grad=True)
    A, B = torch.ones(1, 3), torch.ones(4, 1)
    view = base[:]
    assert not can_update_inplace(view, A)
    out = add_lowrank_(view, torch.ones(2, 3), A, B, 2.0)
    torch.testing.assert_close(out, torch.full((2, 4), 6.0))


def test_reference_formula_with_bias():
    x = torch.tensor([[1.0, 2.0]])
    A = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    B = torch.tensor([[1.0, 1.0]])
    bias = torch.tensor([0.5])
    out = lowrank_update_reference(torch.tensor([[10.0]]), x, A, B, 2.0, bias)
    torch.testing.assert_close(out, torch.tensor([[10.0 + 2.0 * (3.0 + 0.5)]]))


@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pretransposed_update_equals_reference(rows, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 12, generator=g, dtype=dtype)
    A = torch.randn(4, 12, generator=g, dtype=dtype)
    B = torch.randn(10, 4, generator=g, dtype=dtype)
    result = torch.randn(rows, 10, generator=g, dtype=dtype)
    expected = lowrank_update_reference(result.clone(), x, A, B, 1.7)
    Bt = scaled_transpose(B, 1.7)
    assert Bt.shape == (4, 10) and Bt.is_contiguous()
    out = add_lowrank_pretransposed_(result, x, A, Bt)
    assert out is result  # in place
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------- grouped matmul (MoE)
@pytest.mark.parametrize("counts", [(3, 0, 5, 1), (0, 0, 4, 0), (2, 2, 2, 2)])
def test_grouped_matmul_matches_the_plain_loop(counts: tuple[int, ...]) -> None:
    """torch's grouped_mm path equals one matmul per group, in value and in the gradients of both inputs (also
    for a strided weight view and empty groups); the reduction is ``in`` long."""
    from peftkit.ops import grouped

    assert grouped._GROUPED_MM is not None, "this torch has no grouped_mm: the fast path is never taken"
    generator = torch.Generator().manual_seed(0)
    offsets = torch.cumsum(torch.tensor(counts), 0, dtype=torch.int32)
    results = []
    for fn in (grouped.grouped_matmul, grouped.grouped_matmul_reference):
        x = torch.randn(sum(counts), 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        stored = torch.randn(len(counts), 12, 8, generator=generator.manual_seed(2), requires_grad=True)
        weight = stored.transpose(1, 2)  # (E, in, out) as a strided view, as the experts pass it
        assert grouped._fits_grouped_mm(x, weight)  # in = 8, out = 12 floats: multiples of 16 bytes
        out = fn(x, weight, offsets)
        (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append((out.detach(), x.grad, stored.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **fp_tol(torch.float32, 8))


def test_grouped_matmul_takes_the_loop_where_grouped_mm_refuses() -> None:
    """A rank-2 factor (8-byte rows) or float64 goes through the plain loop, with the same results."""
    from peftkit.ops import grouped

    offsets = torch.tensor([2, 5], dtype=torch.int32)
    for x, weight in ((torch.randn(5, 8), torch.randn(2, 8, 2)), (torch.randn(5, 8).double(), torch.randn(2, 8, 4).double())):
        assert not grouped._fits_grouped_mm(x, weight)
        expected = torch.cat([x[:2] @ weight[0], x[2:] @ weight[1]])
        torch.testing.assert_close(grouped.grouped_matmul(x, weight, offsets), expected, **fp_tol(x.dtype, 8))
