"""TinyLoRA (``TinyLoraConfig``): the layer update against a plain SVD/projection implementation, interop with the
reference both ways (tiny Llama, BERT, GPT-2 ``Conv1D``, a custom MLP and embedding; saved and regenerated
projections, weight tying), the vectors held once per group, identity at init, merge/unmerge, mixed batches and
typed config errors."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from method_interop import (
    case_model,
    case_output,
    check_interop_both_ways,
    check_mixed_batch_rows,
    interop_case,
)
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.errors import ConfigError, UnsupportedModuleError
from peftkit.methods.tinylora import TinyLoraLayer
from tests.numerics import TINY_MODEL_REDUCTION, fp_tol

#: same float32 math through other kernels and summation orders: a few ulp over the tiny models' reductions
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)
LLAMA = "llama-causal"
ESSENTIALS = ("r", "u", "weight_tying", "projection_seed", "save_projection", "init_v_bound", "init_weights")


def _layers(model: nn.Module) -> list[TinyLoraLayer]:
    return [m for m in model.modules() if isinstance(m, TinyLoraLayer)]


def _perturb_v(model: nn.Module, seed: int = 3) -> None:
    """Random ``v`` (the trained tensors) so the adapter is not identity; A, B, P keep their construction."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "tinylora_v" in name:
                param.copy_(torch.randn(param.shape, generator=gen))


def _config(lib: Any, case_name: str, **kwargs: Any) -> Any:
    case = interop_case(case_name)
    return lib.TinyLoraConfig(target_modules=list(case.target_modules), task_type=case.task_type, **kwargs)


# ------------------------------------------------------------------------------------------------ plain reference


def plain_tinylora(weight: torch.Tensor, v: torch.Tensor, r: int, u: int, seed: int) -> torch.Tensor:
    """``W + U_r S_r^(1/2) (Σ_i v_i P_i) S_r^(1/2) V_r^T`` for ``W: (out, in)``, ``P ~ N(0, 1/r)`` from ``seed``."""
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    P = torch.normal(0.0, 1.0 / r**0.5, size=(u, r, r), generator=torch.Generator().manual_seed(seed)).double()
    R = sum(v[i].double() * P[i] for i in range(u))
    root = torch.diag(S[:r].sqrt())
    return weight.double() + U[:, :r] @ root @ R @ root @ Vh[:r]


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_layer_output_matches_plain_formula(kind: str) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10) if kind == "linear" else nn.Embedding(10, 12))
    model = peftkit.get_peft_model(base, peftkit.TinyLoraConfig(r=3, u=5, projection_seed=7, target_modules=["0"]))
    _perturb_v(model)
    layer = _layers(model)[0]
    v = layer.vector("default").detach()
    weight = layer.get_base_layer().weight.detach()
    dense = plain_tinylora(weight, v, 3, 5, seed=7)  # the first (only) target: layer index 0
    if kind == "linear":
        x = torch.randn(4, 12)
        expected = x.double() @ dense.t() + layer.get_base_layer().bias.double()
    else:
        x = torch.tensor([[1, 4, 9], [0, 2, 2]])
        expected = dense[x]
    with torch.no_grad():
        out = model(x)
    # float32 against float64 with a reduction over 12 inputs (and an SVD): a few float32 ulp
    torch.testing.assert_close(out.double(), expected, **fp_tol(torch.float32, 12, factor=16))


def test_identity_at_init_and_uniform_init_bounds() -> None:
    case = interop_case(LLAMA)
    base_out = case_output(case_model(LLAMA), case)
    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA)).eval()
    torch.testing.assert_close(case_output(model, case), base_out, rtol=0, atol=0)  # v = 0: the update is exactly 0
    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA, init_weights="uniform",
                                                                init_v_bound=0.1))
    vs = [p for n, p in model.named_parameters() if "tinylora_v" in n]
    assert vs and all(bool((p.abs() <= 0.1).all()) and bool((p != 0).any()) for p in vs)


@pytest.mark.parametrize(("tying", "groups"), [(0.0, 4), (0.5, 2), (1.0, 1)])
def test_vectors_are_held_once_per_tying_group(tying: float, groups: int) -> None:
    """4 adapted layers (2 Llama layers x q/v): ``weight_tying`` sets how many ``v`` exist; each is one tensor
    shared by its layers, and the only trainable parameters are those vectors (as many as in the reference)."""
    import peft

    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA, weight_tying=tying, u=6))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == groups and all(p.shape == (6,) for _, p in trainable)
    assert len({id(layer.vector("default")) for layer in _layers(model)}) == groups
    reference = peft.get_peft_model(case_model(LLAMA), _config(peft, LLAMA, weight_tying=tying, u=6))
    assert len([p for p in reference.parameters() if p.requires_grad]) == groups


@pytest.mark.parametrize(("case_name", "kwargs"), [
    (LLAMA, {}),
    (LLAMA, {"save_projection": False, "weight_tying": 0.5, "r": 3, "u": 8}),
    ("bert-feat", {"weight_tying": 1.0}),
    ("gpt2-causal", {}),
    ("custom-mlp", {"r": 4, "u": 3}),
    ("custom-emb", {"weight_tying": 1.0}),
])
def test_interop_both_ways(case_name: str, kwargs: dict[str, Any], tmp_path) -> None:
    """Random ``v``: both files have the same keys (``base_model.tinylora_v.<group>``, per layer ``tinylora_A`` /
    ``tinylora_B`` and, with ``save_projection``, ``tinylora_P``), shapes and dtypes, and each library loads the
    other's with the saver's outputs; without saved projections both regenerate them from the seed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_projection=False warns in both libraries, by design
        check_interop_both_ways(case_name, lambda lib: _config(lib, case_name, **kwargs), tmp_path,
                                markers=None, perturb=lambda model, seed: _perturb_v(model, seed),
                                essentials=ESSENTIALS, tol=TOL)


def test_embedding_without_saved_projection_loads_silently_both_ways(tmp_path) -> None:
    """``save_projection=False`` on an embedding: neither library saves ``tinylora_P``; the reference's embedding
    layer still keeps it persistent, so loading any such file warns about a missing ``tinylora_P`` key there (its
    outputs are right: the seed regenerates P). peftkit loads both files without that warning, with the saver's
    outputs."""
    import peft

    case = interop_case("custom-emb")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = peftkit.get_peft_model(case_model("custom-emb"), _config(peftkit, "custom-emb", save_projection=False))
        theirs = peft.get_peft_model(case_model("custom-emb"), _config(peft, "custom-emb", save_projection=False))
    for index, model in enumerate((ours, theirs)):
        _perturb_v(model, seed=index)
        model.save_pretrained(str(tmp_path / str(index)))
    for index, model in enumerate((ours, theirs)):
        assert not any("tinylora_P" in key for key in load_file(str(tmp_path / str(index) / "adapter_model.safetensors")))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = peftkit.PeftModel.from_pretrained(case_model("custom-emb"), str(tmp_path / str(index)))
        assert not [w for w in caught if "missing" in str(w.message).lower()]
        torch.testing.assert_close(case_output(loaded, case), case_output(model.eval(), case), **TOL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reference's spurious missing-key warning
            reloaded = peft.PeftModel.from_pretrained(case_model("custom-emb"), str(tmp_path / str(index)))
        torch.testing.assert_close(case_output(reloaded, case), case_output(model, case), **TOL)


@pytest.mark.parametrize("case_name", [LLAMA, "gpt2-causal", "custom-emb"])
def test_merge_unmerge_and_unload(case_name: str) -> None:
    case = interop_case(case_name)
    model = peftkit.get_peft_model(case_model(case_name), _config(peftkit, case_name)).eval()
    _perturb_v(model)
    base_out, out = case_output(case_model(case_name), case), case_output(model, case)
    model.merge_adapter()
    # merged W + B R A as one matmul against the factored path: a few ulp over the model's reductions
    torch.testing.assert_close(case_output(model, case), out, **TOL)
    model.unmerge_adapter()
    torch.testing.assert_close(case_output(model, case), out, **TOL)
    torch.testing.assert_close(case_output(model.merge_and_unload(), case), out, **TOL)
    assert not torch.allclose(out, base_out, atol=1e-3)


def test_v_trains_and_gets_gradients_from_every_tied_layer() -> None:
    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA, weight_tying=1.0, init_weights="uniform"))
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids).logits.sum().backward()
    (v,) = [p for p in model.parameters() if p.requires_grad]
    assert v.grad is not None and bool((v.grad != 0).any())
    assert all(layer.tinylora_A["default"].grad is None for layer in _layers(model))


def test_second_adapter_and_delete_keep_vectors_consistent() -> None:
    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA, weight_tying=0.5))
    model.add_adapter("other", _config(peftkit, LLAMA, u=3))
    vectors = model.base_model.tinylora_v
    assert sorted(vectors["default"].keys()) == ["0", "1"] and sorted(vectors["other"].keys()) == ["0", "1", "2", "3"]
    model.delete_adapter("other")
    assert "other" not in vectors
    assert not any("other" in name for name, _ in model.named_parameters())


def test_mixed_batch_rows_match_single_adapter_runs() -> None:
    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA)).eval()
    model.add_adapter("other", _config(peftkit, LLAMA, u=3))
    _perturb_v(model, seed=4)
    ids = torch.randint(3, 100, (3, 6), generator=torch.Generator().manual_seed(2))
    check_mixed_batch_rows(model, {"input_ids": ids}, ["other", "__base__", "default"], TOL)


# ------------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"r": 0}, "r"),
    ({"u": -1}, "u"),
    ({"weight_tying": 1.5}, "weight_tying"),
    ({"projection_seed": 1.5}, "projection_seed"),
    ({"save_projection": "yes"}, "save_projection"),
    ({"init_v_bound": -0.1}, "init_v_bound"),
    ({"tinylora_dropout": 1.0}, "tinylora_dropout"),
    ({"bias": "lora_only"}, "bias"),
    ({"init_weights": "gaussian"}, "init_weights"),
    ({"layers_pattern": "layers"}, "layers_pattern"),
])
def test_bad_config_values_raise_typed_errors(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        peftkit.TinyLoraConfig(**kwargs)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


def test_unsupported_module_kind_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(UnsupportedModuleError, match="Linear"):
        peftkit.get_peft_model(model, peftkit.TinyLoraConfig(target_modules=["0"]))


def test_load_warns_when_file_and_save_projection_disagree(tmp_path) -> None:
    """A file without ``tinylora_P`` loaded with ``save_projection=True`` regenerates P from the seed and says so."""
    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA, save_projection=False)).eval()
    _perturb_v(model)
    model.save_pretrained(str(tmp_path))
    config = peftkit.TinyLoraConfig.from_pretrained(str(tmp_path))
    config.save_projection = True
    with pytest.warns(peftkit.errors.PeftWarning, match="regenerated from projection_seed"):
        loaded = peftkit.PeftModel.from_pretrained(case_model(LLAMA), str(tmp_path), config=config)
    case = interop_case(LLAMA)
    torch.testing.assert_close(case_output(loaded, case), case_output(model, case), **TOL)


@pytest.mark.parametrize("shape", [(5, 6), (2, 3, 6), (2, 2, 3, 6)], ids=["2d", "3d", "4d"])
def test_unviewed_inplace_update_matches_plain_reference(shape: tuple[int, ...]) -> None:
    """The in-place update (``addmm_`` / ``baddbmm_`` on the output itself) gives the plain out-of-place values and
    gradients for ``h`` and ``M``."""
    from peftkit.methods.tinylora.layers import add_lowrank_unviewed_
    from peftkit.ops.lowrank import lowrank_update_reference

    gen = torch.Generator().manual_seed(0)
    x, W, N = torch.randn(*shape, generator=gen), torch.randn(7, 6, generator=gen), torch.randn(7, 3, generator=gen)
    grad = torch.randn(*shape[:-1], 7, generator=gen)
    results = []
    for update in (add_lowrank_unviewed_, lambda r, h, M, N: lowrank_update_reference(r, h, M, N, 1.0)):
        h = x.clone().requires_grad_(True)
        M = torch.randn(3, 6, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        out = update(nn.functional.linear(h, W), h, M, N)
        out.backward(grad)
        results.append((out.detach(), h.grad, M.grad))
    for ours, plain in zip(*results):
        torch.testing.assert_close(ours, plain, **fp_tol(torch.float32, 6))  # fused vs separate products, k = 6


def test_inspect_measures_a_layer_with_one_shared_vector(tmp_path) -> None:
    """``weight_tying=1.0`` (one ``v``): inspect's strength of each layer is ``‖B R A‖_F`` of that layer."""
    from peftkit.cli.inspect_cmd import inspect_adapter

    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA, weight_tying=1.0)).eval()
    _perturb_v(model)
    model.save_pretrained(str(tmp_path))
    measured = {layer["module"]: layer["norm"] for layer in inspect_adapter(str(tmp_path))["layers"]}
    expected = {name.removeprefix("base_model.model."): float(module.get_delta_weight("default").double().norm())
                for name, module in model.named_modules() if isinstance(module, TinyLoraLayer)}
    assert len(measured) == len(expected) == 4  # the vector is no layer
    for name, norm in expected.items():
        assert measured[name] == pytest.approx(norm, rel=1e-5)  # float32 layer deltas against the float64 measure
