"""Fast LoRA paths (``peftkit.ops.lora_fused``) against their plain reference: outputs and gradients within 1e-6,
with and without dropout (same mask), in place and out of place, under bf16 autocast, with several active adapters
and in mixed batches; and what the dropout path keeps for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit.ops.lora_fused as fused
from peftkit import LoraConfig, get_peft_model
from peftkit.methods.lora.layers import LoraLayer
from tests.models import CASES_BY_NAME
from tests.native_env import built_kernel
from tests.numerics import fp_tol

TOL = {"atol": 1e-6, "rtol": 1e-6}
# float32 outputs of the two-layer 12 -> 10 -> 8 models by two code paths (lean no-grad path, native kernel,
# batched mixed-adapter matmul vs the general/grad path): another summation order over 12 + 4 + 10 + 4 terms
F32_TOL = fp_tol(torch.float32, 12 + 4 + 10 + 4)


def _leaves(n: int = 6, t: int = 5, d_in: int = 12, r: int = 4, d_out: int = 10, bias: bool = False):
    g = torch.Generator().manual_seed(0)
    f64 = {"generator": g, "dtype": torch.float64}  # float64: the 1e-6 bound checks the algebra, not fp32 rounding
    x = torch.randn(n, t, d_in, **f64, requires_grad=True)
    A = torch.randn(r, d_in, **f64, requires_grad=True)
    B = torch.randn(d_out, r, **f64, requires_grad=True)
    b = torch.randn(d_out, **f64, requires_grad=True) if bias else None
    W = torch.randn(d_out, d_in, **f64)
    mask = torch.rand(n, t, d_in, generator=g) >= 0.3
    return x, A, B, b, W, mask


def _grads(loss: torch.Tensor, tensors: list[torch.Tensor | None]) -> list[torch.Tensor]:
    leaves = [t for t in tensors if t is not None]
    return list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tensor_scaling", [False, True])
def test_add_lora_matches_reference(p, inplace, bias, tensor_scaling):
    x, A, B, b, W, mask = _leaves(bias=bias)
    scaling = torch.tensor(1.7) if tensor_scaling else 1.7
    cot = torch.randn(6, 5, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outs, grads = [], []
    for fast in (True, False):
        base = F.linear(x, W)  # a fresh base output: the in-place path writes into it
        if fast:
            out = fused.add_lora_(base, x, A, B, scaling, b, p, inplace, mask=mask)
            assert (out is base) == inplace
            assert "CopySlices" not in type(out.grad_fn).__name__  # no full-size gradient clone in backward
        else:
            out = fused.lora_update_reference(base, x, A, B, scaling, b, p, mask=mask)
        outs.append(out)
        grads.append(_grads((out * cot).sum(), [x, A, B, b]))
    torch.testing.assert_close(outs[0], outs[1], **TOL)
    for g_fast, g_ref in zip(*grads):
        assert g_ref.abs().sum() > 0
        torch.testing.assert_close(g_fast, g_ref, **TOL)


def test_fused_dropout_equals_torch_dropout_with_its_mask():
    x, A, _, _, _, _ = _leaves()
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.25, training=True)
    mask = dropped.detach() != 0  # x has no zeros: the keep-mask F.dropout drew
    hidden = fused.lora_hidden(x.reshape(-1, 12), A, 0.25, mask.reshape(-1, 12))
    ref = dropped.reshape(-1, 12) @ A.t()
    torch.testing.assert_close(hidden, ref, **TOL)
    cot = torch.randn_like(ref)
    for g_fast, g_ref in zip(_grads((hidden * cot).sum(), [x, A]), _grads((ref * cot).sum(), [x, A])):
        torch.testing.assert_close(g_fast, g_ref, **TOL)


def test_drawn_mask_keeps_one_minus_p_and_differs_per_call():
    (first, keep), (second, _) = (fused.dropout_mask((200, 100), 0.1, torch.device("cpu")) for _ in range(2))
    assert first.dtype == torch.bool and first.shape == (200, 100)
    assert abs(keep - 0.9) <= 1 / fused.MASK_LEVELS
    assert abs(first.float().mean().item() - 0.9) < 0.01
    assert not torch.equal(first, second)
    odd, _ = fused.dropout_mask((7, 3), 0.5, torch.device("cpu"))  # not a multiple of 4 elements
    assert odd.shape == (7, 3)


def test_drawn_mask_survives_later_draws_and_its_uint8_view_matches_a_float_mask():
    """The random words are drawn into a reused scratch buffer: a returned mask must not alias it, and the
    ``uint8`` view the fused multiply uses must equal multiplying by the mask as 0/1 floats."""
    first, _ = fused.dropout_mask((64, 48), 0.3, torch.device("cpu"))
    kept = first.clone()
    fused.dropout_mask((64, 48), 0.3, torch.device("cpu"))
    assert torch.equal(first, kept)
    x = torch.randn(64, 48)
    assert torch.equal(fused._masked(x, first).clone(), x * first.float())
    strided = first.t()  # a non-contiguous mask
    assert torch.equal(fused._masked(x.t().contiguous(), strided).clone(), x.t() * strided.float())


def test_dropout_keeps_only_a_bool_mask_for_backward():
    """Beyond the no-dropout path, the fused dropout saves one byte per input element (no float noise, no dropped
    copy of x)."""
    x, A, B, _, W, mask = _leaves()

    def saved_bytes(p: float) -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fused.add_lora_(F.linear(x, W), x, A, B, 2.0, None, p, True, mask=mask)
        return sum(storages.values())

    assert saved_bytes(0.3) - saved_bytes(0.0) == x.numel()


# ---------------------------------------------------------------- through the layers


def _fixed_masks(monkeypatch) -> list[torch.Tensor]:
    """Make every drawn dropout mask come from a seeded generator and record it."""
    drawn: list[torch.Tensor] = []
    g = torch.Generator().manual_seed(7)

    def draw(shape, p, device):
        drawn.append(torch.rand(shape, generator=g, device=device) >= p)
        return drawn[-1], 1 - p

    monkeypatch.setattr(fused, "dropout_mask", draw)
    return drawn


def _plain_update(layer: LoraLayer, x: torch.Tensor, names: list[str], masks: list[torch.Tensor], p: float
                  ) -> torch.Tensor:
    """The reference formula written out: base + sum_a s_a * B_a(A_a(x * mask_a / (1 - p)))."""
    out = layer.base_layer(x)
    for name, mask in zip(names, masks):
        dropped = x * mask.reshape(x.shape) / (1 - p) if p > 0 else x
        delta = F.linear(F.linear(dropped, layer.lora_A[name].weight), layer.lora_B[name].weight)
        out = out + delta * layer.scaling[name]
    return out


@pytest.mark.parametrize("case", ["custom-mlp", "gpt2-causal"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_layer_matches_plain_formula_with_several_adapters(monkeypatch, case, p):
    tc = CASES_BY_NAME[case]
    torch.manual_seed(0)
    model = get_peft_model(tc.build(), LoraConfig(target_modules=tc.target_modules, r=4, lora_dropout=p,
                                                  init_lora_weights=False))
    model.add_adapter("other", LoraConfig(target_modules=tc.target_modules, r=2, lora_alpha=3, lora_dropout=p,
                                          init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer)).double()  # float64: see _leaves
    layer.train()
    assert layer.fan_in_fan_out == (case == "gpt2-causal")
    x = torch.randn(3, 4, layer.in_features, dtype=torch.float64, requires_grad=True)
    drawn = _fixed_masks(monkeypatch)
    out = layer(x)
    assert len(drawn) == (2 if p > 0 else 0)
    ref = _plain_update(layer, x, ["default", "other"], drawn or [None, None], p)
    torch.testing.assert_close(out, ref, **TOL)
    params = [x] + [t for n in ("default", "other") for t in (layer.lora_A[n].weight, layer.lora_B[n].weight)]
    cot = torch.randn_like(out)
    for g_fast, g_ref in zip(_grads((out * cot).sum(), params), _grads((ref * cot).sum(), params)):
        assert g_ref.abs().sum() > 0
        torch.testing.assert_close(g_fast, g_ref, **TOL)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_bf16_autocast_matches_reference(monkeypatch, p):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 24))
    model = get_peft_model(base, LoraConfig(target_modules=["0"], r=4, lora_dropout=p, init_lora_weights=False))
    layer = model.base_model.model[0]
    x = torch.randn(2, 5, 16, requires_grad=True)
    drawn = _fixed_masks(monkeypatch)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        ref = fused.lora_update_reference(layer.base_layer(x), x, A, B, layer.scaling["default"], None, p,
                                          mask=drawn[0].reshape(x.shape) if p > 0 else None)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=1e-2)
    cot = torch.randn_like(out)
    g_fast = _grads((out.float() * cot).sum(), [x, A, B])
    g_ref = _grads((ref.float() * cot).sum(), [x, A, B])
    for a, b in zip(g_fast, g_ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=5e-2, rtol=2e-2)


def test_eval_mode_draws_no_mask_and_is_deterministic(monkeypatch):
    tc = CASES_BY_NAME["custom-mlp"]
    model = get_peft_model(tc.build(), LoraConfig(target_modules=tc.target_modules, lora_dropout=0.5,
                                                  init_lora_weights=False)).eval()
    drawn = _fixed_masks(monkeypatch)
    inputs = tc.make_inputs(2)
    with torch.no_grad():
        first, second = model(**inputs), model(**inputs)
    assert drawn == []
    torch.testing.assert_close(first, second, atol=0, rtol=0)


def test_mixed_batch_rows_equal_single_adapter_rows():
    tc = CASES_BY_NAME["custom-mlp"]
    torch.manual_seed(0)
    model = get_peft_model(tc.build(), LoraConfig(target_modules=tc.target_modules, init_lora_weights=False))
    model.add_adapter("b", LoraConfig(target_modules=tc.target_modules, r=2, init_lora_weights=False))
    model.eval()
    inputs = tc.make_inputs(4)
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=["default", "b", "__base__", "b"])
        model.set_adapter("b")
        only_b = model(**inputs)
        with model.disable_adapter():
            plain = model(**inputs)
    tol = fp_tol(torch.float32, 10 + 8 + 20 + 8)  # batched gather/bmm vs one adapter: the MLP's 10 -> 20 -> 2, r=8
    torch.testing.assert_close(mixed[[1, 3]], only_b[[1, 3]], **tol)
    torch.testing.assert_close(mixed[2], plain[2], **tol)


@pytest.mark.parametrize("bias", [True, False])
def test_dora_linear_in_place_matches_plain_formula(monkeypatch, bias):
    from peftkit.methods.lora import layers as lora_layers
    from peftkit.methods.lora.dora import dora_update

    calls = []
    real = lora_layers.dora_add_
    monkeypatch.setattr(lora_layers, "dora_add_", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(12, 10, bias=bias)),
                           LoraConfig(target_modules=["0"], r=4, use_dora=True, init_lora_weights=False))
    layer = model.base_model.model[0].double()
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.5)  # m != n: the factor matters
    x = torch.randn(3, 4, 12, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert calls == [1]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    base = layer.base_layer(x)
    base_no_bias = base - layer.base_layer.bias if bias else base
    lora_out = F.linear(F.linear(x, A), B) * layer.scaling["default"]
    ref = dora_update(base, base_no_bias, lora_out, m, layer.dora_weight_norm("default"))
    torch.testing.assert_close(out, ref, **TOL)
    cot = torch.randn_like(out)
    for g_fast, g_ref in zip(_grads((out * cot).sum(), [x, A, B, m]), _grads((ref * cot).sum(), [x, A, B, m])):
        assert g_ref.abs().sum() > 0
        torch.testing.assert_close(g_fast, g_ref, **TOL)


def test_inference_path_matches_grad_path_and_honours_base_hooks():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 8))
    config = LoraConfig(target_modules=["0", "1"], r=4, lora_dropout=0.3, init_lora_weights=False)
    model = get_peft_model(base, config)
    model.add_adapter("b", LoraConfig(target_modules=["0"], r=2, lora_bias=True, init_lora_weights=False))
    model.base_model.set_adapter(["default", "b"])
    model.eval()
    layer = model.base_model.model[0]
    layer.lora_A["b"].double()  # a float64 adapter on a float32 base: added out of place, then cast back
    layer.lora_B["b"].double()
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        fast = model(x)
    slow = model(x)  # grad mode: the general path
    assert slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), **F32_TOL)
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    with torch.inference_mode():
        hooked = model(x)
    handle.remove()
    assert seen == [torch.Size([3, 5, 10])]
    torch.testing.assert_close(hooked, fast, **F32_TOL)  # the hook sends it down the general path


def _lean_model(r: int = 4) -> tuple[nn.Module, LoraLayer]:
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 8)),
                           LoraConfig(target_modules=["0", "1"], r=r, init_lora_weights=False)).eval()
    return model, model.base_model.model[0]


def _grad_path(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).detach()  # grad mode: the general path, no cache


@pytest.mark.parametrize("shape", [(1, 1, 12), (2, 3, 12), (40, 50, 12)])  # decoding, few rows, many rows
@pytest.mark.parametrize("contiguous", [True, False])
def test_no_grad_path_matches_grad_path_for_every_input_size(shape, contiguous):
    model, layer = _lean_model()
    x = torch.randn(*shape) if contiguous else torch.randn(shape[1], shape[0], shape[2]).transpose(0, 1)
    assert x.is_contiguous() is (contiguous or shape[0] == shape[1] == 1)
    with torch.no_grad():
        fast = model(x)
    assert "default" in layer._bt_cache  # the lean path ran
    torch.testing.assert_close(fast, _grad_path(model, x), **F32_TOL)


@pytest.mark.parametrize("change", ["inplace_B", "data_B", "replace_B", "inplace_A", "set_scale", "scaling_dict"])
def test_no_grad_cache_follows_every_change_of_the_adapter(change):
    model, layer = _lean_model()
    x = torch.randn(1, 1, 12)
    with torch.no_grad():
        before = model(x)
        B = layer.lora_B["default"].weight
        if change == "inplace_B":
            B.mul_(2.0)
        elif change == "data_B":
            B.data = B.data * 2.0
        elif change == "replace_B":
            layer.lora_B["default"].weight = nn.Parameter(B.detach() * 2.0)
        elif change == "inplace_A":
            layer.lora_A["default"].weight.mul_(2.0)
        elif change == "set_scale":
            layer.set_scale("default", 2.0)
        else:
            layer.scaling["default"] = layer.scaling["default"] * 2.0
        after = model(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, _grad_path(model, x), **F32_TOL)


def test_no_grad_cache_is_dropped_by_train_and_delete_and_skipped_with_dropout():
    model, layer = _lean_model()
    x = torch.randn(1, 1, 12)
    with torch.no_grad():
        model(x)
    assert set(layer._bt_cache) == {"default"}
    model.train()
    assert layer._bt_cache == {}
    model.eval()
    with torch.no_grad():
        model(x)
    model.add_adapter("other", LoraConfig(target_modules=["0"], r=2, lora_dropout=0.5, init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    model.train()  # dropout active: the no-grad forward takes the general path and caches nothing for it
    with torch.no_grad():
        model(x)
    assert "other" not in layer._bt_cache
    model.eval()
    with torch.no_grad():
        both = model(x)
    assert set(layer._bt_cache) == {"default", "other"}
    torch.testing.assert_close(both, _grad_path(model, x), **F32_TOL)
    model.base_model.set_adapter("default")
    model.delete_adapter("other")
    assert "other" not in layer._bt_cache


def test_no_grad_path_with_inference_tensor_weights_never_caches():
    with torch.inference_mode():  # adapters built here hold inference tensors (no version counter)
        _model, layer = _lean_model()
        x = torch.randn(1, 1, 12)
        first = layer(x)
        B = layer.lora_B["default"].weight
        assert B.is_inference()
        B.mul_(2.0)  # an in-place change no version counter records
        second = layer(x)
        A, W, b = layer.lora_A["default"].weight, layer.base_layer.weight, layer.base_layer.bias
        expected = F.linear(x, W, b) + F.linear(F.linear(x, A), B) * layer.scaling["default"]
    assert layer._bt_cache == {}
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, expected, **F32_TOL)


@pytest.mark.parametrize("block", [12, 24, 36, 1 << 16])  # one row per block, two, three (a short last block), all
@pytest.mark.parametrize("need", ["both", "x_only", "A_only"])
def test_blocked_dropout_projection_equals_full_size_passes(monkeypatch, block, need):
    x, A, _, _, _, mask = _leaves(n=4, t=5)  # x: (4, 5, 12) float64: 20 rows of 12
    x2d, mask2d = x.detach().reshape(-1, 12).requires_grad_(need != "A_only"), mask.reshape(-1, 12)
    A = A.detach().requires_grad_(need != "x_only")
    cot = torch.randn(20, A.shape[0], dtype=torch.float64)
    monkeypatch.setattr(fused, "BLOCK_ELEMENTS", block)
    assert len(fused.row_blocks(20, 12)) == -(-20 // max(1, block // 12))
    blocked = fused._DropoutProject.apply(x2d, A, mask2d, 1.7)
    leaves = [t for t in (x2d, A) if t.requires_grad]
    g_blocked = torch.autograd.grad((blocked * cot).sum(), leaves)
    monkeypatch.setattr(fused, "_blocked", lambda t: False)
    full = fused._DropoutProject.apply(x2d, A, mask2d, 1.7)
    g_full = torch.autograd.grad((full * cot).sum(), leaves)
    plain = (x2d * mask2d) @ A.t() * 1.7
    g_plain = torch.autograd.grad((plain * cot).sum(), leaves)
    torch.testing.assert_close(blocked, plain, **TOL)
    torch.testing.assert_close(full, plain, **TOL)
    for a, b, c in zip(g_blocked, g_full, g_plain):
        torch.testing.assert_close(a, c, **TOL)
        torch.testing.assert_close(b, c, **TOL)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("block", [24, 1 << 16])  # several row blocks, one
@pytest.mark.parametrize("need", ["all", "adapter_only", "input_only"])
def test_fused_linear_lora_equals_reference(monkeypatch, p, bias, block, need):
    x, A, B, b, W, mask = _leaves(bias=bias)
    x.requires_grad_(need != "adapter_only")
    A.requires_grad_(need != "input_only")
    B.requires_grad_(need != "input_only")
    monkeypatch.setattr(fused, "BLOCK_ELEMENTS", block)
    out = fused.linear_lora(x, W, b, A, B, 1.7, p, mask if p > 0 else None)
    ref = fused.lora_update_reference(F.linear(x, W, b), x, A, B, 1.7, None, p, mask if p > 0 else None)
    torch.testing.assert_close(out, ref, **TOL)
    cot = torch.randn_like(out)
    leaves = [t for t in (x, A, B, b) if t is not None and t.requires_grad]
    for g_fast, g_ref in zip(_grads((out * cot).sum(), leaves), _grads((ref * cot).sum(), leaves)):
        assert g_ref.abs().sum() > 0
        torch.testing.assert_close(g_fast, g_ref, **TOL)


def test_training_layer_runs_base_and_adapter_as_one_node_and_keeps_only_the_mask():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(12, 10)),
                           LoraConfig(target_modules=["0"], r=4, lora_dropout=0.5, init_lora_weights=False)).train()
    x = torch.randn(3, 5, 12, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(x)
    assert type(out.grad_fn).__name__ == "ViewBackward0"
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "_LinearLoRABackward"
    big = [t for t in saved if t.numel() >= x.numel()]
    assert sorted(str(t.dtype) for t in big) == ["torch.bool", "torch.float32"]  # x itself and the mask
    assert any(t.data_ptr() == x.data_ptr() for t in big)  # x itself, not a dropped copy


# ------------------------------------------------------------------ the no-grad plan (decoding)
PLAN_TOL = F32_TOL  # float32: the kernel sums in another order than BLAS


@pytest.fixture(params=["kernel", "torch"])
def plan_backend(request, monkeypatch):
    """Run the no-grad plan with the native kernel (each call recorded; the test must have used it) or with torch
    ops only. Yields ``(backend, calls)``."""
    import peftkit.methods.lora.fastpath as lora_fastpath
    calls = []
    if request.param == "torch":
        monkeypatch.setattr(lora_fastpath, "lowrank_kernel", lambda: None)
        yield request.param, calls
        return
    kernel = built_kernel(monkeypatch)  # with PEFTKIT_NATIVE=0 too (asserting that it is honoured)
    if kernel is None:
        pytest.fail("the native kernel is unavailable (no C compiler or Python headers?): its variant cannot run")

    def counted(*args):
        calls.append(args[4:])
        kernel(*args)

    monkeypatch.setattr(lora_fastpath, "lowrank_kernel", lambda: counted)
    yield request.param, calls
    assert calls, "the native kernel never ran"


def _plan_model() -> tuple[nn.Module, LoraLayer]:
    model, layer = _lean_model()
    with torch.no_grad():
        for layer_ in (model.base_model.model[0], model.base_model.model[1]):
            layer_.lora_B["default"].weight.normal_()  # a visible update
    return model, layer


def test_plan_runs_from_the_first_call_with_identical_bits(plan_backend):
    backend, calls = plan_backend
    model, layer = _plan_model()
    x = torch.randn(1, 1, 12)
    with torch.no_grad():
        first, second, third = model(x), model(x), model(x)
    assert layer._lean_plan is not None
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    torch.testing.assert_close(second, third, atol=0, rtol=0)
    torch.testing.assert_close(first, _grad_path(model, x), **PLAN_TOL)
    if backend == "kernel":
        assert calls[0] == (1, 12, 4, 10)  # rows, in, r, out of the first layer


@pytest.mark.parametrize("change", ["inplace_B", "data_B", "replace_B", "inplace_A", "data_A_noncontiguous",
                                    "replace_A_module", "replace_base", "scaling", "set_adapter", "disable",
                                    "merge", "dropout_train"])
def test_plan_follows_every_change(plan_backend, change):
    model, layer = _plan_model()
    x = torch.randn(1, 1, 12)
    with torch.no_grad():
        before = model(x)
        assert layer._lean_plan is not None
        if change == "inplace_B":
            layer.lora_B["default"].weight.mul_(2.0)
        elif change == "data_B":
            layer.lora_B["default"].weight.data = layer.lora_B["default"].weight.data * 2.0
        elif change == "replace_B":
            layer.lora_B["default"].weight = nn.Parameter(layer.lora_B["default"].weight.detach() * 2.0)
        elif change == "inplace_A":
            layer.lora_A["default"].weight.mul_(2.0)
        elif change == "data_A_noncontiguous":  # same values, then doubled, stored transposed: not for the kernel
            A = layer.lora_A["default"].weight
            A.data = (A.data * 2.0).t().contiguous().t()
            assert not A.is_contiguous()
        elif change == "replace_A_module":
            old = layer.lora_A["default"]
            layer.lora_A["default"] = nn.Linear(12, 4, bias=False)
            layer.lora_A["default"].weight.data = old.weight.data * 2.0
        elif change == "replace_base":
            old = layer.base_layer
            layer.base_layer = nn.Linear(12, 10)
            layer.base_layer.weight.data, layer.base_layer.bias.data = old.weight.data * 2.0, old.bias.data.clone()
        elif change == "scaling":
            layer.scaling["default"] = layer.scaling["default"] * 2.0
        elif change == "set_adapter":
            model.add_adapter("other", LoraConfig(target_modules=["0", "1"], r=2, init_lora_weights=False))
            model.set_adapter("other")
        elif change == "disable":
            layer.enable_adapters(False)
        elif change == "merge":
            model.base_model.merge_adapter()
        else:  # a dropout module switched to training on its own: the plan must not skip it
            model.add_adapter("drop", LoraConfig(target_modules=["0"], r=2, lora_dropout=0.5,
                                                  init_lora_weights=False))
            model.set_adapter("drop")
            model(x)
            assert layer._lean_plan is not None
            before = model(x)
            layer.lora_dropout["drop"].train()
            after, again = model(x), model(x)
            assert not torch.allclose(before, after) and not torch.allclose(after, again)  # masks are drawn
            return
        after = model(x)
    reference = _grad_path(model, x)
    if change != "merge":
        assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference, **PLAN_TOL)


@pytest.mark.parametrize("hook", ["forward_hook", "pre_hook", "global_hook", "instance_forward"])
def test_plan_respects_hooks_added_after_it_was_built(plan_backend, hook):
    from torch.nn.modules import module as torch_module

    model, layer = _plan_model()
    x = torch.randn(1, 1, 12)
    seen = []
    base = layer.base_layer
    with torch.no_grad():
        plain = model(x)
        assert layer._lean_plan is not None
        if hook == "forward_hook":
            handle = base.register_forward_hook(lambda mod, inp, out: seen.append(1) or out * 2)
        elif hook == "pre_hook":
            handle = base.register_forward_pre_hook(lambda mod, inp: seen.append(1) or (inp[0] * 2,))
        elif hook == "global_hook":
            handle = torch_module.register_module_forward_hook(
                lambda mod, inp, out: (seen.append(1) or out * 2) if mod is base else None)
        else:  # what accelerate's add_hook_to_module does: an instance attribute replacing forward
            original = base.forward
            base.forward = lambda inp: seen.append(1) or original(inp) * 2
        try:
            hooked = model(x)
        finally:
            if hook == "instance_forward":
                del base.forward
            else:
                handle.remove()
        assert seen
        assert not torch.allclose(hooked, plain)
        torch.testing.assert_close(model(x), plain, atol=0, rtol=0)  # hooks gone: the plan again, same bits


def test_plan_under_autocast_takes_the_general_path(plan_backend):
    model, _ = _plan_model()
    x = torch.randn(1, 1, 12)
    with torch.no_grad():
        model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(x)
    assert auto.dtype == torch.bfloat16  # the base ran under autocast, not the float32 plan
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(x).detach()
    torch.testing.assert_close(auto, reference, atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(1, 1, 12), (2, 3, 12), (3, 12)])
def test_plan_with_non_contiguous_or_batched_inputs(plan_backend, shape):
    model, _ = _plan_model()
    x = torch.randn(*shape)
    x_nc = x.transpose(0, -2).contiguous().transpose(0, -2) if len(shape) == 3 and shape[0] > 1 else x
    with torch.no_grad():
        model(torch.randn(1, 1, 12))  # plan built
        fast, fast_nc = model(x), model(x_nc)
    torch.testing.assert_close(fast, _grad_path(model, x), **PLAN_TOL)
    torch.testing.assert_close(fast_nc, fast, **PLAN_TOL)


def test_training_fast_path_calls_an_instance_forward_of_the_base():
    model, layer = _plan_model()
    model.train()
    seen = []
    original = layer.base_layer.forward
    layer.base_layer.forward = lambda inp: seen.append(1) or original(inp)
    x = torch.randn(2, 3, 12, requires_grad=True)
    model(x).sum().backward()
    assert seen == [1]


def test_jit_trace_records_the_adapter_update(plan_backend):
    model, _ = _plan_model()
    net = model.base_model.model
    x, other = torch.randn(1, 1, 12), torch.randn(1, 1, 12)
    with torch.no_grad():
        net(x)  # a plan exists before tracing
        traced = torch.jit.trace(net, (x,), check_trace=False)
        expected = _grad_path(model, other)
        torch.testing.assert_close(traced(other), expected, **PLAN_TOL)
        model.base_model.disable_adapter_layers()
        assert not torch.allclose(net(other), expected)  # the update is visible: the trace did record it
