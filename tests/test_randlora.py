"""RandLoRA: the layer against the formula written here, bases bit-exact with the reference's generator (dense,
sparse, very sparse), sharing of the bases (one object per model), the fast autograd path against the plain one,
merging, several adapters and their checks, config errors, and interop both ways with the reference (tiny Llama,
BERT, GPT-2 Conv1D, an MLP), with and without saved bases.

The generic properties (identity, merge, save/load, multi-adapter, errors) come from the conformance suite.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from method_interop import check_interop_both_ways, interop_case
from models import MLP
from numerics import fp_tol
from safetensors.torch import load_file

from peftkit import PeftModel, RandLoraConfig, get_peft_model
from peftkit.errors import AdapterConflictError, ConfigError
from peftkit.methods.randlora import RandLoraBases, RandLoraLayer
from peftkit.ops.randlora import add_randlora_, randlora_linear, randlora_update_reference

ATOL = 1e-5  # issue 22: interop outputs within 1e-5
MARKERS = ("randlora_lambda", "randlora_gamma")


def plain_delta(A: torch.Tensor, B: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor, in_f: int, out_f: int,
                scaling: float) -> torch.Tensor:
    """The RandLoRA update ``ΔW: (out, in)`` term by term: for ``m = min``, ``M = max`` of ``(in, out)`` and
    ``nb = ceil(m / r)``, ``Σ_j B[:M, j // r, j % r] ⊗ (lam[k, b] * A[k, 0, :m] * gamma[b])`` with
    ``(k, b) = divmod(j, nb)`` (the reference's pairing of the flattened bases), transposed when ``in > out``."""
    m, big = min(in_f, out_f), max(in_f, out_f)
    r, nb = lam.shape
    delta = torch.zeros(big, m, dtype=torch.float64)
    for j in range(r * nb):
        k, b = divmod(j, nb)
        column = B[:big, j // r, j % r].double()
        row = lam[k, b].double() * A[k, 0, :m].double() * gamma[b].double()
        delta += torch.outer(column, row)
    delta = delta * scaling
    return delta if in_f == m else delta.t()


def _mlp(**kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    config = RandLoraConfig(target_modules=["lin0", "lin1"], init_weights=False, **kwargs)
    return get_peft_model(MLP(), config).eval()


@pytest.mark.parametrize("rows", [5, 40], ids=["low-rank-path", "folded-path"])
@pytest.mark.parametrize("kwargs", [{"r": 4}, {"r": 3, "sparse": True}, {"r": 6, "very_sparse": True}])
def test_layer_matches_the_formula(kwargs: dict[str, Any], rows: int) -> None:
    """Each layer's output is ``base(x) + x ΔW^T`` with ``ΔW`` from the plain formula, for a wide (in < out) and a
    narrow (in > out) layer, with few rows (low-rank products) and many (one product with ``W + ΔW``);
    ``get_delta_weight`` is that ``ΔW``."""
    model = _mlp(randlora_alpha=10, **kwargs)
    x = torch.randn(rows, 10)
    for name, (in_f, out_f) in (("lin0", (10, 20)), ("lin1", (20, 2))):
        layer = model.base_model.model.get_submodule(name)
        bases = layer.randlora_bases["default"]
        lam, gamma = layer.randlora_lambda["default"], layer.randlora_gamma["default"]
        expected = plain_delta(bases.randlora_A, bases.randlora_B, lam, gamma, in_f, out_f, 10 / kwargs["r"])
        xin = x if name == "lin0" else torch.randn(rows, 20)
        with torch.no_grad():
            got = layer(xin)
            want = layer.get_base_layer()(xin).double() + xin.double() @ expected.t()
        # float32 against float64, reductions of at most r * nb + in terms
        torch.testing.assert_close(got.double(), want, **fp_tol(torch.float32, 64))
        torch.testing.assert_close(layer.get_delta_weight("default").double(), expected, **fp_tol(torch.float32, 64))


@pytest.mark.parametrize("kwargs", [{}, {"sparse": True}, {"very_sparse": True}])
def test_bases_are_bit_exact_with_the_reference(kwargs: dict[str, Any]) -> None:
    """Same seed, same bases as the reference's generator and init, stored once (one object for all layers)."""
    import peft

    case = interop_case("llama-causal")
    kw = {"r": 8, "target_modules": ["q_proj", "v_proj", "up_proj"], "projection_prng_key": 7, **kwargs}
    ours = get_peft_model(case.build(), RandLoraConfig(**kw))
    ref = peft.get_peft_model(case.build(), peft.RandLoraConfig(**kw))
    layers = [m for m in ours.modules() if isinstance(m, RandLoraLayer)]
    shared = {id(m.randlora_bases["default"]) for m in layers}
    assert len(layers) > 1 and len(shared) == 1
    bases = layers[0].randlora_bases["default"]
    assert torch.equal(bases.randlora_A, ref.base_model.randlora_A["default"])
    assert torch.equal(bases.randlora_B, ref.base_model.randlora_B["default"])
    assert sum(isinstance(m, RandLoraBases) for m in {id(m): m for m in ours.modules()}.values()) == 1


@pytest.mark.parametrize(("in_f", "out_f"), [(12, 20), (20, 12), (16, 16)])
def test_fast_path_matches_plain_path(in_f: int, out_f: int) -> None:
    """The in-place autograd function gives the plain path's output and gradients (x, lambda, gamma)."""
    torch.manual_seed(0)
    r, m, big = 3, min(in_f, out_f), max(in_f, out_f)
    nb, total_nb = math.ceil(m / r), math.ceil(m / r) + 2
    A = torch.randn(r, 1, m + 4)[:, 0, :m]
    B = torch.randn(big + 3, total_nb, r)
    b = B.view(B.shape[0], -1)[:big, : nb * r]  # the strided view the layer uses
    lam, gamma = torch.randn(r, nb), torch.randn(nb, m)
    x, w = torch.randn(2, 5, in_f), torch.randn(out_f, in_f)
    outs, grads = [], []
    for fast in (True, False):
        xs, ls, gs = (t.clone().requires_grad_(True) for t in (x, lam, gamma))
        base = xs @ w.t()
        fn = add_randlora_ if fast else randlora_update_reference
        out = fn(base, xs, A, b, ls, gs, 0.7, in_f == m)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([xs.grad, ls.grad, gs.grad])
    tol = fp_tol(torch.float32, big * nb * r)  # the same sums in another order
    torch.testing.assert_close(outs[0], outs[1], **tol)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("rows", [8, 40], ids=["few-rows", "many-rows"])
@pytest.mark.parametrize(("in_f", "out_f"), [(12, 20), (20, 12), (16, 16)])
def test_folded_path_matches_plain_path(in_f: int, out_f: int, rows: int) -> None:
    """``x (W + ΔW)^T + bias`` in one product gives the base output plus the plain update, with the same gradients
    (x, lambda, gamma, bias) by either backward route (fewer or more rows than ``max(in, out)``)."""
    torch.manual_seed(0)
    r, m, big = 3, min(in_f, out_f), max(in_f, out_f)
    nb = math.ceil(m / r)
    A = torch.randn(r, 1, m + 4)[:, 0, :m]
    B = torch.randn(big + 3, nb + 2, r)
    b = B.view(B.shape[0], -1)[:big, : nb * r]
    w_t = torch.randn(in_f, out_f)  # stored (in, out) as GPT-2 Conv1D: the op gets the transposed view
    lam, gamma, bias, x = torch.randn(r, nb), torch.randn(nb, m), torch.randn(out_f), torch.randn(rows, in_f)
    results = []
    for folded in (True, False):
        xs, ls, gs, bs = (t.clone().requires_grad_(True) for t in (x, lam, gamma, bias))
        if folded:
            out = randlora_linear(xs, w_t.t(), bs, A, b, ls, gs, 0.7, in_f == m)
        else:
            out = randlora_update_reference(xs @ w_t + bs, xs, A, b, ls, gs, 0.7, in_f == m)
        out.pow(2).sum().backward()
        results.append([out.detach(), xs.grad, ls.grad, gs.grad, bs.grad])
    tol = fp_tol(torch.float32, big * nb * r)  # the same sums in another order
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **tol)


def test_merge_unmerge_and_conv1d_layout() -> None:
    """Merging GPT-2 ``Conv1D`` layers (``fan_in_fan_out``) gives the unmerged outputs; unmerge restores the base."""
    case = interop_case("gpt2-causal")
    model = get_peft_model(case.build(), RandLoraConfig(r=4, target_modules=["c_attn", "c_proj"], init_weights=False,
                                                        randlora_alpha=16)).eval()
    inputs = case.make_inputs(2)
    with torch.no_grad():
        before = model(**inputs).logits
        weight = model.base_model.model.transformer.h[0].attn.c_attn.weight.detach().clone()
        model.merge_adapter()
        merged = model(**inputs).logits
        model.unmerge_adapter()
    torch.testing.assert_close(merged, before, **fp_tol(torch.float32, 256))  # merged vs two matmuls
    torch.testing.assert_close(model.base_model.model.transformer.h[0].attn.c_attn.weight, weight,
                               **fp_tol(torch.float32, 64))


def test_adapters_share_bases_and_must_agree() -> None:
    """A second adapter with the same spec reuses the bases object; another seed or save_projection is refused."""
    model = _mlp(r=4)
    model.add_adapter("other", RandLoraConfig(r=4, target_modules=["lin0", "lin1"]))
    layer = model.base_model.model.lin0
    assert layer.randlora_bases["other"] is layer.randlora_bases["default"]
    with pytest.raises(AdapterConflictError, match="projection_prng_key"):
        model.add_adapter("seed", RandLoraConfig(r=4, target_modules=["lin0"], projection_prng_key=1))
    config = RandLoraConfig(r=4, target_modules=["lin0"], save_projection=False)
    with pytest.raises(AdapterConflictError, match="save_projection"):
        model.add_adapter("proj", config)
    assert set(model.peft_config) == {"default", "other"}


@pytest.mark.parametrize("other", [{"r": 2}, {"r": 4, "sparse": True}], ids=["other-r", "other-sparsity"])
def test_each_adapter_gets_the_bases_of_its_own_config(other: dict[str, Any]) -> None:
    """A later adapter with another ``r`` or sparsity computes as it does alone (the reference reuses the first
    adapter's bases: another ``r`` fails in forward, another sparsity is ignored)."""
    model = _mlp(r=4)
    model.add_adapter("other", RandLoraConfig(target_modules=["lin0"], init_weights=False, **other))
    model.set_adapter("other")
    torch.manual_seed(0)
    alone = get_peft_model(MLP(), RandLoraConfig(target_modules=["lin0"], init_weights=False, **other)).eval()
    with torch.no_grad():
        alone.base_model.model.lin0.randlora_lambda["default"].copy_(model.base_model.model.lin0.randlora_lambda["other"])
    x = torch.randn(4, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(x), alone(x), **fp_tol(torch.float32, 32))


def test_a_later_reference_adapter_loads_alone(tmp_path: Path) -> None:
    """The reference saves a later adapter with the first adapter's bases (sized by the first adapter's layers)
    and cannot load that file alone; peftkit takes the file's bases and gives the reference's outputs."""
    import peft

    torch.manual_seed(0)
    ref = peft.get_peft_model(MLP(), peft.RandLoraConfig(r=4, target_modules=["lin0", "lin1"]))
    ref.add_adapter("other", peft.RandLoraConfig(r=4, target_modules=["lin0"], init_weights=False))
    ref.set_adapter("other")
    ref.eval().save_pretrained(str(tmp_path))
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(MLP(), str(tmp_path / "other"))
    torch.manual_seed(0)
    ours = PeftModel.from_pretrained(MLP(), str(tmp_path / "other")).eval()
    x = torch.randn(4, 10)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=ATOL)


def test_save_projection_false_regenerates(tmp_path: Path) -> None:
    """Without saved bases the file holds only lambda / gamma and the load regenerates the same bases."""
    model = _mlp(r=4, save_projection=False)
    model.save_pretrained(str(tmp_path))
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys and all(k.endswith(MARKERS) for k in keys)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete file: the load does not warn
        loaded = PeftModel.from_pretrained(MLP(), str(tmp_path)).eval()
    x = torch.randn(4, 10)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize(("field", "value"), [
    ("r", 0), ("r", 2.0), ("projection_prng_key", "a"), ("sparse", 1), ("save_projection", None),
    ("randlora_dropout", 1.0), ("randlora_alpha", "big"), ("bias", "lora_only"), ("init_weights", "yes"),
])
def test_config_errors_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        RandLoraConfig(**{field: value})


INTEROP = [
    pytest.param("llama-causal", {"r": 4}, id="llama"),
    pytest.param("llama-causal", {"r": 3, "sparse": True, "save_projection": False}, id="llama-sparse-noproj"),
    pytest.param("bert-feat", {"r": 5, "very_sparse": True}, id="bert-very-sparse"),
    pytest.param("gpt2-causal", {"r": 4, "target_modules": ["c_attn", "c_proj"]}, id="gpt2-conv1d"),
    pytest.param("custom-mlp", {"r": 3, "bias": "randlora_only"}, id="mlp"),
]
ESSENTIALS = ("peft_type", "r", "projection_prng_key", "save_projection", "sparse", "very_sparse", "randlora_alpha",
              "bias", "init_weights")  # fan_in_fan_out: the reference rewrites it for Conv1D, peftkit detects it


@pytest.mark.interop
@pytest.mark.parametrize(("case_name", "kwargs"), INTEROP)
def test_interop_both_ways(case_name: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    """Random (non-identity) adapters: the saved files have the same keys (bases once at model level and once per
    layer, as the reference), shapes, dtypes and config essentials, and each library loads the other's file with
    the saver's outputs (1e-5)."""
    case = interop_case(case_name)
    kw = {"target_modules": list(case.target_modules), "task_type": case.task_type, "init_weights": False,
          "randlora_alpha": 2 * kwargs["r"], **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference warns at construction with save_projection=False
        check_interop_both_ways(case, lambda lib: lib.RandLoraConfig(**kw), tmp_path, markers=MARKERS,
                                essentials=ESSENTIALS, tol={"atol": ATOL, "rtol": ATOL})


@pytest.mark.parametrize("save_projection", [True, False])
def test_inspect_measures_each_layer_once(save_projection: bool, tmp_path: Path) -> None:
    """``peftkit inspect`` lists the adapted layers only (the model-level bases are no layer) with the expected
    ``‖ΔW‖_F`` for a square layer: ``s sqrt(m) ‖Af‖_F`` from the saved bases, or its expectation without them."""
    from peftkit.cli.inspect_cmd import inspect_adapter

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(12, 12)), RandLoraConfig(
        r=4, randlora_alpha=8, target_modules=["0"], init_weights=False, save_projection=save_projection))
    model.save_pretrained(str(tmp_path))
    layers = inspect_adapter(str(tmp_path))["layers"]
    assert [layer["module"] for layer in layers] == ["0"]
    layer = model.base_model.model[0]
    lam, gamma = layer.randlora_lambda["default"].detach(), layer.randlora_gamma["default"].detach()
    if save_projection:
        a = layer.randlora_bases["default"].randlora_A[:, 0, :12]
        af2 = sum(float((lam[k, b] * a[k] * gamma[b]).pow(2).sum()) for k in range(4) for b in range(3))
    else:
        af2 = sum(float(lam[k, b] ** 2 * gamma[b].pow(2).sum()) for k in range(4) for b in range(3))
    assert layers[0]["norm"] == pytest.approx(2.0 * math.sqrt(12 * af2), rel=1e-6)


def _mlp_with_quantized_lin0(bits: int) -> torch.nn.Module:
    """The custom MLP with ``lin0`` as a bitsandbytes 8-bit or 4-bit (nf4) linear of the same weights, flagged as
    the reference's loaders flag quantized models."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model, dense = MLP(), MLP().lin0
    if bits == 8:
        layer = bnb.nn.Linear8bitLt(10, 20, bias=True, has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(10, 20, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         module=layer)
    layer.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    model.lin0 = layer.to("cpu")
    setattr(model, f"is_loaded_in_{bits}bit", True)
    return model.eval()


@pytest.mark.interop
@pytest.mark.parametrize("bits", [8])  # 4-bit: bitsandbytes' CPU kernels need wider layers than this MLP's
def test_interop_both_ways_on_bitsandbytes_linears(bits: int, tmp_path: Path) -> None:
    """A bitsandbytes-quantized linear takes the adapter as the reference's ``Linear8bitLt`` does: files move both
    ways with the same outputs (1e-5). (4-bit layers: ``test_quantized.py``'s layer test.)"""
    kw = {"target_modules": ["lin0", "lin1"], "r": 3, "randlora_alpha": 6, "init_weights": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes: casts to float16 inside its 8-bit matmul
        check_interop_both_ways("custom-mlp", lambda lib: lib.RandLoraConfig(**kw), tmp_path, markers=MARKERS,
                                build=lambda: _mlp_with_quantized_lin0(bits), tol={"atol": ATOL, "rtol": ATOL})
