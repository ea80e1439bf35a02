"""Uni-LoRA (``UniLoraConfig``): the factors against a plain implementation of the paper's formula (balanced index
assignment, inverse square-root scales), interop with the reference both ways (tiny Llama, BERT, GPT-2 ``Conv1D``, a
custom MLP; indices regenerated from the seed or saved), ``theta_d`` held once per model, merge/unmerge, mixed
batches, ``peftkit inspect`` and typed config errors."""

from __future__ import annotations

import warnings

import numpy as np
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
from peftkit.methods.unilora import UniLoraLayer
from tests.numerics import TINY_MODEL_REDUCTION, fp_tol

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft = pytest.importorskip("peft")

#: both libraries run the same float32 model with their own (differently ordered) matmuls: a few ulp per term of the
#: longest reductions of the tiny models (tests/numerics.py)
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)
LLAMA = "llama-causal"  # the model case (tests/models.py) of the Llama tests


def _layers(model: nn.Module) -> list[UniLoraLayer]:
    return [m for m in model.modules() if isinstance(m, UniLoraLayer)]


# ------------------------------------------------------------------------------------------------ plain reference


def plain_factors(theta: torch.Tensor, shapes: list[tuple[int, int, int]], seed: int
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The paper's construction in float64 for layers ``[(r, in, out), ...]`` in model order: one shuffled list over
    all factor entries in which every ``theta_d`` index occurs ``floor`` or ``ceil`` of ``D / d`` times (numpy's
    ``default_rng(seed)``: extras without replacement, then a shuffle), cut into ``A: (r, in)`` then ``B: (out, r)``
    per layer; each entry ``theta_d[k] / sqrt(#k)``."""
    d = theta.numel()
    total = sum(r * i + o * r for r, i, o in shapes)
    rng = np.random.default_rng(seed)
    pool = sorted(list(range(d)) * (total // d))  # 0, 0, ..., 1, 1, ... before the shuffle
    if total % d:
        pool += list(rng.choice(d, size=total % d, replace=False))
    pool = np.array(pool)
    rng.shuffle(pool)
    uses = {k: int((pool == k).sum()) for k in range(d)}
    values = [float(theta[k]) / uses[k] ** 0.5 for k in pool]
    out, start = [], 0
    for r, i, o in shapes:
        A = torch.tensor(values[start:start + r * i], dtype=torch.float64).reshape(r, i)
        start += r * i
        B = torch.tensor(values[start:start + o * r], dtype=torch.float64).reshape(o, r)
        start += o * r
        out.append((A, B))
    return out


@pytest.mark.parametrize("theta_d_length", [7, 64, 500])  # fewer, about as many, more entries than factor entries
def test_layer_outputs_match_plain_formula(theta_d_length: int) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6))
    model = peftkit.get_peft_model(base, peftkit.UniLoraConfig(
        r=3, theta_d_length=theta_d_length, proj_seed=5, init_theta_d_bound=0.5, target_modules=["0", "2"]))
    theta = model.base_model.unilora_theta_d["default"].detach().double()
    expected = plain_factors(theta, [(3, 12, 8), (3, 8, 6)], seed=5)
    for layer, (A, B) in zip(_layers(model), expected):
        x = torch.randn(2, 5, layer.in_features)
        w, b = layer.get_base_layer().weight.double(), layer.get_base_layer().bias.double()
        want = x.double() @ w.T + b + x.double() @ A.T @ B.T
        # float32 layer against float64: dot products of at most 12 terms
        torch.testing.assert_close(layer(x).double(), want, **fp_tol(torch.float32, 16))
        torch.testing.assert_close(layer.get_delta_weight("default").double(), B @ A, **fp_tol(torch.float32, 4))


def test_assignment_is_balanced_and_regenerated_bit_exactly() -> None:
    config = peftkit.UniLoraConfig(r=2, theta_d_length=40, target_modules=["q_proj", "v_proj", "up_proj"])
    one, two = (peftkit.get_peft_model(case_model(LLAMA), config) for _ in range(2))
    flat = torch.cat([b.flatten() for n, b in one.named_buffers() if "unilora_indices" in n])
    counts = torch.bincount(flat, minlength=40)
    assert int(counts.max() - counts.min()) <= 1  # each entry used floor(D/d) or ceil(D/d) times
    for (n1, b1), (n2, b2) in zip(one.named_buffers(), two.named_buffers()):
        assert n1 == n2 and torch.equal(b1, b2)


def test_theta_is_held_once_and_shared_by_every_layer() -> None:
    model = peftkit.get_peft_model(case_model(LLAMA).train(), peftkit.UniLoraConfig(
        r=2, theta_d_length=32, target_modules=["q_proj", "v_proj"]))
    holder = model.base_model.unilora_theta_d
    assert all(layer.unilora_theta_d is holder for layer in _layers(model))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["base_model.unilora_theta_d.default"]
    model(input_ids=interop_case(LLAMA).make_inputs(2)["input_ids"]).logits.sum().backward()
    assert holder["default"].grad.abs().sum() > 0
    model.add_adapter("other", peftkit.UniLoraConfig(r=2, theta_d_length=16, target_modules=["q_proj"]))
    assert set(holder.keys()) == {"default", "other"} and not holder["other"].requires_grad
    keys = set(peftkit.get_peft_model_state_dict(model, adapter_name="other"))
    assert keys == {"base_model.unilora_theta_d"}
    model.delete_adapter("other")
    assert set(holder.keys()) == {"default"}
    assert all(not layer.has_adapter("other") for layer in _layers(model))


# ------------------------------------------------------------------------------------------------ interop


#: model case (tests/models.py) -> target_modules
INTEROP_MODELS = {
    LLAMA: ["q_proj", "v_proj", "up_proj"],
    "bert-feat": ["query", "value"],
    "gpt2-causal": ["c_attn", "c_fc"],
    "custom-mlp": ["lin0", "lin1"],
}
INTEROP = [pytest.param(m, saved, id=f"{m}-{'indices' if saved else 'seed'}")
           for m in INTEROP_MODELS for saved in (False, True) if m in (LLAMA, "gpt2-causal") or not saved]


def _config(lib, name: str, save_indices: bool = False):
    return lib.UniLoraConfig(r=3, theta_d_length=50, proj_seed=3, target_modules=INTEROP_MODELS[name],
                             save_indices=save_indices, fan_in_fan_out=name == "gpt2-causal")


def _perturb(model: nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "unilora_theta_d" in name:
                param.add_(torch.randn(param.shape, generator=gen))


def _run(model: nn.Module, name: str) -> torch.Tensor:
    return case_output(model, interop_case(name))


@pytest.mark.parametrize(("name", "save_indices"), INTEROP)
def test_interop_both_ways(name: str, save_indices: bool, tmp_path) -> None:
    """Perturbed ``theta_d``: the same saved keys (``theta_d`` once; with ``save_indices`` each layer's indices and
    scales), shapes, dtypes and config essentials, and each library loads the other's file with the saver's outputs
    (1e-5); the adapter is not identity."""
    check_interop_both_ways(name, lambda lib: _config(lib, name, save_indices), tmp_path, markers=None,
                            perturb=_perturb, min_change=1e-3,
                            essentials=("r", "theta_d_length", "proj_seed", "save_indices"))
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert "base_model.unilora_theta_d" in saved
    assert any("unilora_indices_A" in k for k in saved) == save_indices


def test_saved_indices_are_used_on_load(tmp_path) -> None:
    """With ``save_indices`` a load takes the file's indices and scales, not a fresh draw (here: another seed)."""
    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA, True)).eval()
    _perturb(model)
    model.save_pretrained(str(tmp_path))
    other_seed = peftkit.UniLoraConfig(**{**_config(peftkit, LLAMA, True).to_dict(), "proj_seed": 11})
    loaded = peftkit.PeftModel.from_pretrained(case_model(LLAMA), str(tmp_path), config=other_seed).eval()
    torch.testing.assert_close(_run(loaded, LLAMA), _run(model, LLAMA), rtol=0, atol=0)


@pytest.mark.parametrize("autocast", [True, False])
def test_half_precision_base_keeps_the_reference_dtypes(autocast: bool, tmp_path) -> None:
    """On a bfloat16 base ``theta_d`` and the scales are float32 with ``autocast_adapter_dtype`` (else bfloat16), in
    memory and in the saved file, as the reference's; the file loads in the reference with peftkit's outputs."""
    def build() -> nn.Module:
        return case_model(LLAMA).to(torch.bfloat16)

    model = peftkit.get_peft_model(build(), _config(peftkit, LLAMA, True), autocast_adapter_dtype=autocast).eval()
    ref = peft.get_peft_model(build(), _config(peft, LLAMA, True), autocast_adapter_dtype=autocast).eval()
    dtypes = [{str(t.dtype) for n, t in [*m.named_parameters(), *m.named_buffers()] if "unilora_" in n
               and "indices" not in n} for m in (model, ref)]
    assert dtypes[0] == dtypes[1] == {"torch.float32" if autocast else "torch.bfloat16"}
    _perturb(model)
    model.save_pretrained(str(tmp_path / "ours"))
    ref.save_pretrained(str(tmp_path / "ref"))
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "ref"))
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in theirs.items()}
    loaded = peft.PeftModel.from_pretrained(build(), str(tmp_path / "ours"), autocast_adapter_dtype=autocast).eval()
    # the same bfloat16 model through other kernels: a few bfloat16 ulp of the tiny model's order-one logits
    torch.testing.assert_close(_run(loaded, LLAMA).float(), _run(model, LLAMA).float(),
                               **fp_tol(torch.bfloat16, TINY_MODEL_REDUCTION))


# ------------------------------------------------------------------------------------------------ merging


@pytest.mark.parametrize("name", [LLAMA, "gpt2-causal"])
def test_merge_unmerge_and_unload(name: str) -> None:
    build = interop_case(name).build
    model = peftkit.get_peft_model(build(), _config(peftkit, name)).eval()
    _perturb(model)
    base_out, out = _run(build(), name), _run(model, name)
    model.merge_adapter()
    # merged: W + B A as one matmul against two low-rank matmuls: a few ulp over the model's reductions
    torch.testing.assert_close(_run(model, name), out, **TOL)
    model.unmerge_adapter()
    torch.testing.assert_close(_run(model, name), out, **TOL)
    merged = model.merge_and_unload()
    torch.testing.assert_close(_run(merged, name), out, **TOL)
    assert not torch.allclose(out, base_out, atol=1e-3)


def test_mixed_batch_rows_match_single_adapter_runs() -> None:
    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA)).eval()
    model.add_adapter("other", peftkit.UniLoraConfig(r=2, theta_d_length=20, proj_seed=9,
                                                     target_modules=["q_proj", "v_proj"]))
    _perturb(model, seed=4)
    ids = torch.randint(3, 100, (3, 6), generator=torch.Generator().manual_seed(2))
    check_mixed_batch_rows(model, {"input_ids": ids}, ["other", "__base__", "default"], TOL)


def test_inspect_measures_each_layer_with_saved_indices(tmp_path) -> None:
    from peftkit.cli.inspect_cmd import inspect_adapter

    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA, True)).eval()
    _perturb(model)
    model.save_pretrained(str(tmp_path))
    layers = {layer["module"]: layer for layer in inspect_adapter(str(tmp_path))["layers"]}
    expected = {name.removeprefix("base_model.model."): module.get_delta_weight("default").double().norm()
                for name, module in model.named_modules() if isinstance(module, UniLoraLayer)}
    assert len(layers) == len(expected) == 6  # 2 layers x (q, v, up); theta_d is no layer
    for name, norm in expected.items():  # float32 layer deltas against the float64 measure
        torch.testing.assert_close(torch.tensor(layers[name]["norm"], dtype=torch.float64), norm, rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"r": 0}, "r"),
    ({"theta_d_length": 0}, "theta_d_length"),
    ({"unilora_dropout": 1.5}, "unilora_dropout"),
    ({"init_theta_d_bound": 0.0}, "init_theta_d_bound"),
    ({"bias": "lora_only"}, "bias"),
    ({"save_indices": "yes"}, "save_indices"),  # the reference takes any value here (and treats it as truthy)
    ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"target_modules": ".*q_proj", "layers_pattern": "layers"}, "layers_pattern"),
])
def test_bad_config_values_raise_typed_errors(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        peftkit.UniLoraConfig(**kwargs)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)
    if field != "save_indices":
        with pytest.raises(ValueError):  # the reference refuses the same values
            peft.UniLoraConfig(**kwargs)


def test_unsupported_module_kind_is_refused() -> None:
    model = nn.Sequential(nn.Embedding(10, 8))
    with pytest.raises(UnsupportedModuleError, match="Linear"):
        peftkit.get_peft_model(model, peftkit.UniLoraConfig(target_modules=["0"]))
