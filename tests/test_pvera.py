"""PVeRA: the layer against the paper's formula written here (mean and reparametrised sample, projections drawn
here), bit-exact projections against the reference's generator, sharing of the projections (one object per model),
sampling at inference and its per-adapter generator, merging (the mean), several adapters and their checks, config
errors, gradients and sampled outputs against the reference, and interop both ways with the reference (tiny Llama,
BERT, GPT-2 Conv1D, an MLP), with and without saved projections.

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
from models import MLP, tiny_llama
from numerics import fp_tol
from safetensors.torch import load_file
from torch import nn

from peftkit import PeftModel, PveraConfig, get_peft_model, get_peft_model_state_dict
from peftkit.errors import AdapterConflictError, ConfigError, UnsupportedModuleError
from peftkit.methods.pvera import PveraLayer

ATOL = 1e-5  # issue 22: interop outputs within 1e-5
# MLP lin0: 10 -> 20, lin1: 20 -> 2; one adapted output sums over in (<= 20) and r terms, two layers deep
MLP_TOL = fp_tol(torch.float32, 2 * (20 + 8))


def plain_projections(seed: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's frozen random A: (2r, max_in), B: (max_out, r), kaiming-uniform (gain sqrt(2), fan_in) from one
    seeded CPU generator, A drawn first."""
    g = torch.Generator().manual_seed(seed)
    a = torch.empty(2 * r, max_in).uniform_(-math.sqrt(6 / max_in), math.sqrt(6 / max_in), generator=g)
    b = torch.empty(max_out, r).uniform_(-math.sqrt(6 / r), math.sqrt(6 / r), generator=g)
    return a, b


def _perturbed_mlp(**kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    return get_peft_model(MLP(), PveraConfig(target_modules=["lin0", "lin1"], init_weights=False, **kwargs))


def _plain_mlp_output(model: nn.Module, x: torch.Tensor, seed: int, r: int, sample_seed: int | None) -> torch.Tensor:
    """y = W x + b + λ_b ⊙ (B[:out] z) per adapted layer, [μ, log σ²] = λ_d ⊙ (A[:, :in] x), z = μ or (with
    ``sample_seed``) μ + ε exp(log σ² / 2), ε from a fresh CPU generator seeded with ``sample_seed`` per layer."""
    base = model.base_model.model
    a, b = plain_projections(seed, r, 20, 20)

    def adapted(layer: PveraLayer, h: torch.Tensor) -> torch.Tensor:
        lin = layer.get_base_layer()
        ld, lb = layer.pvera_lambda_d["default"].detach(), layer.pvera_lambda_b["default"].detach()
        hidden = ld * (h @ a[:, : lin.in_features].T)
        mu, logvar = hidden[..., :r], hidden[..., r:]
        z = mu
        if sample_seed is not None:
            eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(sample_seed))
            z = mu + eps * torch.exp(0.5 * logvar)
        return h @ lin.weight.T + lin.bias + lb * (z @ b[: lin.out_features].T)

    return adapted(base.lin1, torch.relu(adapted(base.lin0, x)))


def test_projections_are_bit_exact_with_the_references_generator() -> None:
    g = torch.Generator().manual_seed(7)
    ref_a = nn.init.kaiming_uniform_(torch.empty(16, 20), generator=g)  # the reference's PveraModel draws
    ref_b = nn.init.kaiming_uniform_(torch.empty(20, 8), generator=g)
    model = get_peft_model(MLP(), PveraConfig(target_modules=["lin0", "lin1"], r=8, projection_prng_key=7))
    shared = model.base_model.model.lin0.vera_projections
    assert torch.equal(shared.pvera_A, ref_a) and torch.equal(shared.pvera_B, ref_b)
    plain_a, plain_b = plain_projections(7, 8, 20, 20)
    torch.testing.assert_close(shared.pvera_A, plain_a, atol=1e-6, rtol=1e-6)  # sqrt rounding order only
    torch.testing.assert_close(shared.pvera_B, plain_b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("sample_at_inference", [False, True])
def test_eval_forward_matches_the_papers_formula(sample_at_inference: bool) -> None:
    """Eval: the mean (sample_at_inference=False) or a sample from each layer's seeded generator (True)."""
    model = _perturbed_mlp(r=6, projection_prng_key=3, sample_at_inference=sample_at_inference,
                           generator_seed=11).eval()
    x = torch.randn(5, 10)
    expected = _plain_mlp_output(model, x, 3, 6, 11 if sample_at_inference else None)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, **MLP_TOL)


def test_training_forward_samples_and_gradients_flow_to_both_halves() -> None:
    model = _perturbed_mlp(r=6, projection_prng_key=3, generator_seed=5).train()
    x = torch.randn(5, 10)
    out = model(x)
    torch.testing.assert_close(out.detach(), _plain_mlp_output(model, x, 3, 6, 5), **MLP_TOL)
    assert not torch.allclose(model(x), out)  # the generator moved on: a fresh sample
    out.pow(2).sum().backward()
    grad_d = model.base_model.model.lin0.pvera_lambda_d["default"].grad
    assert grad_d is not None and grad_d[:6].abs().sum() > 0 and grad_d[6:].abs().sum() > 0  # μ and log σ² train


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(6,), (2, 3)])
def test_in_place_update_matches_the_plain_formula_and_its_gradients(bias: bool, shape: tuple[int, ...]) -> None:
    """The training forward (the update written into the base output, also through the 2-D output behind the view
    that a biased ``nn.Linear`` returns for 3-D inputs) against plain autograd on the formula: same output and the
    same gradients of x, λ_d (both halves) and λ_b."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 16, bias=bias).requires_grad_(False)
    model = get_peft_model(nn.Sequential(lin), PveraConfig(target_modules=["0"], r=4, init_weights=False,
                                                           generator_seed=3)).train()
    layer = model.base_model.model[0]
    a, b = plain_projections(0, 4, 12, 16)
    x0 = torch.randn(*shape, 12)
    x = x0.clone().requires_grad_(True)
    out = model(x)
    out.pow(2).sum().backward()
    ld = layer.pvera_lambda_d["default"].detach().clone().requires_grad_(True)
    lb = layer.pvera_lambda_b["default"].detach().clone().requires_grad_(True)
    xp = x0.clone().requires_grad_(True)
    hidden = ld * (xp @ a.T)
    eps = torch.randn((*shape, 4), generator=torch.Generator().manual_seed(3))
    z = hidden[..., :4] + eps * torch.exp(0.5 * hidden[..., 4:])
    expected = lin(xp) + lb * (z @ b.T)
    expected.pow(2).sum().backward()
    tol = fp_tol(torch.float32, 12 + 8 + 16)  # reductions over in, 2r and out
    torch.testing.assert_close(out.detach(), expected.detach(), **tol)
    for mine, plain in ((x.grad, xp.grad), (layer.pvera_lambda_d["default"].grad, ld.grad),
                        (layer.pvera_lambda_b["default"].grad, lb.grad)):
        torch.testing.assert_close(mine, plain, **fp_tol(torch.float32, 6 * (12 + 8 + 16)))


def test_eval_without_sampling_is_deterministic_and_with_sampling_is_not() -> None:
    x = torch.randn(4, 10)
    with torch.no_grad():
        mean = _perturbed_mlp(r=4).eval()
        torch.testing.assert_close(mean(x), mean(x), atol=0, rtol=0)
        sampled = _perturbed_mlp(r=4, sample_at_inference=True).eval()
        assert not torch.allclose(sampled(x), sampled(x))


def test_adapters_sample_from_their_own_generators() -> None:
    """Adding an adapter does not reset an existing adapter's generator (one CPU generator per adapter)."""
    model = _perturbed_mlp(r=4, generator_seed=1, sample_at_inference=True).eval()
    x = torch.randn(3, 10)
    with torch.no_grad():
        first = model(x)
        model.add_adapter("other", PveraConfig(target_modules=["lin0"], r=4, generator_seed=1))
        second = model(x)
    assert not torch.allclose(first, second)
    fresh = _perturbed_mlp(r=4, generator_seed=1, sample_at_inference=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), first, atol=0, rtol=0)  # same seed, same state: the same sample


def test_projections_are_shared_once_per_model() -> None:
    model = get_peft_model(tiny_llama(), PveraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=4))
    layers = [m for m in model.modules() if isinstance(m, PveraLayer)]
    assert len(layers) > 2 and len({id(m.vera_projections) for m in layers}) == 1
    assert len([n for n, _ in model.named_buffers() if "vera_" in n]) == 2  # A and B once
    sizes = {(m.in_features, m.out_features) for m in layers}
    shared = layers[0].vera_projections
    assert shared.pvera_A.shape == (8, max(i for i, _ in sizes))
    assert shared.pvera_B.shape == (max(o for _, o in sizes), 4)
    assert layers[0].pvera_A["default"] is shared.vera_A


def test_identity_at_init_and_only_vectors_train() -> None:
    model = get_peft_model(MLP(), PveraConfig(target_modules=["lin0", "lin1"], r=4)).train()
    x = torch.randn(3, 10)
    with torch.no_grad():
        adapted = model(x)  # training mode: sampled, but λ_b = 0
        with model.disable_adapter():
            torch.testing.assert_close(adapted, model(x), atol=0, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("pvera_lambda_" in n for n in trainable)
    layer = model.base_model.model.lin0
    assert torch.all(layer.pvera_lambda_b["default"] == 0) and layer.pvera_lambda_d["default"].shape == (8,)
    assert torch.all(layer.pvera_lambda_d["default"] == 0.1)


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_unmerge_equal_the_mean_output(safe_merge: bool) -> None:
    model = _perturbed_mlp(r=4).eval()
    x = torch.randn(4, 10)
    with torch.no_grad():
        expected = model(x)
        weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
        model.merge_adapter(safe_merge=safe_merge)
        torch.testing.assert_close(model(x), expected, **MLP_TOL)
        model.unmerge_adapter()
        for n, p in model.named_parameters():
            if n in weights:
                torch.testing.assert_close(p, weights[n], **fp_tol(torch.float32, 4))
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(x), expected, **MLP_TOL)


def test_delta_weight_matches_the_reference(tmp_path: Path) -> None:
    """ΔW (mean half only; Conv1D layout on GPT-2) equals the reference's get_delta_weight on the same adapter."""
    import peft

    case = interop_case("gpt2-causal")
    model = get_peft_model(case.build(), PveraConfig(target_modules=["c_attn"], r=4, init_weights=False))
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out for Conv1D warns there
        ref = peft.PeftModel.from_pretrained(case.build(), tmp_path)
    ours = [m for m in model.modules() if isinstance(m, PveraLayer)]
    theirs = [m for m in ref.modules() if type(m).__name__ == "Linear" and hasattr(m, "pvera_lambda_d")]
    assert len(ours) == len(theirs) > 0
    for mine, other in zip(ours, theirs):
        delta = mine.get_delta_weight("default")
        assert delta.shape == mine.get_base_layer().weight.shape
        torch.testing.assert_close(delta, other.get_delta_weight("default"), **fp_tol(torch.float32, 4))


def test_second_adapter_shares_the_projections_and_is_checked() -> None:
    model = get_peft_model(MLP(), PveraConfig(target_modules=["lin0", "lin1"], r=4))
    model.add_adapter("other", PveraConfig(target_modules=["lin1"], r=4))
    layers = [m for m in model.modules() if isinstance(m, PveraLayer)]
    assert len({id(m.vera_projections) for m in layers}) == 1
    with pytest.raises(AdapterConflictError, match="projection_prng_key"):
        model.add_adapter("seed", PveraConfig(target_modules=["lin0"], r=4, projection_prng_key=1))
    with pytest.raises(AdapterConflictError, match="save_projection"):
        model.add_adapter("nosave", PveraConfig(target_modules=["lin0"], r=4, save_projection=False))
    with pytest.raises(AdapterConflictError, match="r=2"):
        model.add_adapter("small", PveraConfig(target_modules=["lin0"], r=2))
    assert set(model.peft_config) == {"default", "other"}
    model.delete_adapter("other")
    model.delete_adapter("default")  # no PVeRA adapter left: a new one may use another seed and r
    model.add_adapter("fresh", PveraConfig(target_modules=["lin0"], r=2, projection_prng_key=9))
    assert model.base_model.model.lin0.vera_projections.pvera_A.shape == (4, 10)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"r": 0}, "r"), ({"r": 2.5}, "r"), ({"pvera_dropout": 1.0}, "pvera_dropout"), ({"bias": "some"}, "bias"),
    ({"projection_prng_key": "x"}, "projection_prng_key"), ({"save_projection": 1}, "save_projection"),
    ({"layers_pattern": "layers"}, "layers_pattern"), ({"d_initial": "a"}, "d_initial"),
    ({"sample_at_inference": "yes"}, "sample_at_inference"), ({"generator_seed": 1.5}, "generator_seed"),
])
def test_config_errors_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        PveraConfig(**kwargs)
    assert err.value.field == field


def test_unsupported_module_raises_a_typed_error() -> None:
    with pytest.raises(UnsupportedModuleError, match="PVeRA"):
        get_peft_model(nn.Sequential(nn.Conv2d(3, 4, 3)), PveraConfig(target_modules=["0"]))


# ------------------------------------------------------------------------------------------------ interop
INTEROP = [
    pytest.param("llama-causal", {"r": 4, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
                 id="llama"),
    pytest.param("llama-causal", {"r": 8, "save_projection": False, "projection_prng_key": 5}, id="llama-noproj"),
    pytest.param("bert-seqcls", {"r": 4}, id="bert"),
    pytest.param("gpt2-causal", {"r": 4, "target_modules": ["c_attn", "c_proj"]}, id="gpt2-conv1d"),
    pytest.param("custom-mlp", {"r": 4, "bias": "pvera_only", "generator_seed": 2}, id="mlp"),
]
ESSENTIALS = ("peft_type", "r", "projection_prng_key", "save_projection", "d_initial", "init_weights", "bias",
              "layers_to_transform", "layers_pattern", "sample_at_inference", "generator_seed")


@pytest.mark.interop
@pytest.mark.parametrize(("case_name", "kwargs"), INTEROP)
def test_interop_both_ways(case_name: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    """Non-identity adapters (λ_b = 1, λ_d ~ N(0, 1)): the saved files have the same keys, shapes, dtypes and config
    essentials, and each library loads the other's file with the saver's (mean) outputs (1e-5)."""
    case = interop_case(case_name)
    kw = {"target_modules": list(case.target_modules), "task_type": case.task_type, "init_weights": False, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_projection=False warns, fan_in_fan_out for Conv1D warns
        check_interop_both_ways(case, lambda lib: lib.PveraConfig(**kw), tmp_path, markers=None,
                                essentials=ESSENTIALS, tol={"atol": ATOL, "rtol": 0})
    if kw.get("save_projection", True):  # same seed: bit-exact projections
        a, b = (load_file(tmp_path / lib / "adapter_model.safetensors") for lib in ("ours", "ref"))
        assert torch.equal(a["base_model.pvera_A"], b["base_model.pvera_A"])


def _ours_and_reference(tmp_path: Path, **kwargs: Any) -> tuple[Any, nn.Module, nn.Module]:
    """The tiny-Llama case, a non-identity peftkit adapter and the reference loading it (trainable)."""
    import peft

    case = interop_case("llama-causal")
    kw = {"target_modules": ["q_proj", "v_proj", "down_proj", "up_proj"], "r": 8, "init_weights": False, **kwargs}
    torch.manual_seed(0)
    ours = get_peft_model(case.build(), PveraConfig(**kw))
    ours.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(case.build(), tmp_path, is_trainable=True)  # fresh generators, as the reference
    ref = peft.PeftModel.from_pretrained(case.build(), tmp_path, is_trainable=True)
    return case, ours, ref


def test_sampled_training_outputs_and_gradients_match_the_reference(tmp_path: Path) -> None:
    """Training mode with ``generator_seed``: both libraries draw the same ε per layer, so the sampled outputs and
    the gradients of λ_b and λ_d (both halves) agree."""
    case, ours, ref = _ours_and_reference(tmp_path, generator_seed=4)
    inputs = case.make_inputs(2)
    losses = []
    for model in (ours, ref):
        model.train()
        loss = model(**{"labels": inputs["input_ids"], **inputs}).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=ATOL, rtol=0)
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert mine.keys() == grads.keys() and len(mine) == 16
    for n, g in mine.items():
        # summed over the batch's tokens through the tiny model: reduction of a few hundred terms per entry
        torch.testing.assert_close(g, grads[n], **fp_tol(torch.float32, 4 * 256))


def test_sample_at_inference_matches_the_reference(tmp_path: Path) -> None:
    case, ours, ref = _ours_and_reference(tmp_path, generator_seed=6, sample_at_inference=True)
    inputs = case.make_inputs(2)
    with torch.no_grad():
        outs = [m.eval()(**inputs).logits for m in (ours, ref)]
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=0)


def test_default_targets_are_the_references() -> None:
    import peft

    ours = get_peft_model(tiny_llama(), PveraConfig(task_type="CAUSAL_LM", r=4))
    ref = peft.get_peft_model(tiny_llama(), peft.PveraConfig(task_type="CAUSAL_LM", r=4))
    assert set(get_peft_model_state_dict(ours)) == set(peft.get_peft_model_state_dict(ref))
    assert set(ours.peft_config["default"].target_modules) == set(ref.peft_config["default"].target_modules)


# ---------------------------------------------------------------------------------------------- quantized bases
@pytest.mark.parametrize("variant", ["8bit", "nf4"])
def test_quantized_linear_matches_reference_trains_and_merges(variant: str, tmp_path: Path) -> None:
    """On a bitsandbytes linear (the reference's bnb layers): the reference's outputs on the same quantized layer
    (loading peftkit's file), gradients reach both vectors, merging re-quantizes within a few quantization errors of
    the unmerged (mean) outputs, and unmerging restores them likewise."""
    import peft
    from method_interop import LinNet, quantized_linear

    from peftkit.layers.dispatch import QUANT_LINEAR, module_kind

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dense = nn.Linear(64, 32)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(1)
    ours = get_peft_model(LinNet(quantized_linear(variant, dense)),
                          PveraConfig(target_modules=["lin"], r=8, init_weights=False, generator_seed=2))
    assert module_kind(ours.base_model.model.lin) == QUANT_LINEAR
    ours.save_pretrained(tmp_path)
    ref = peft.PeftModel.from_pretrained(LinNet(quantized_linear(variant, dense)), tmp_path, is_trainable=True)
    # train mode throughout (bitsandbytes picks other kernels in eval mode): the same first sample in both
    sampled = ours(x)
    torch.testing.assert_close(sampled, ref(x), atol=ATOL, rtol=0)  # the same kernel; the update in float32
    sampled.pow(2).mean().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    layer = ours.base_model.model.lin
    layer.training = False  # the mean (the merged update) without switching the quantized kernel to eval
    with torch.no_grad():
        merged_dense = nn.Linear(64, 32)
        merged_dense.load_state_dict(dense.state_dict())
        merged_dense.weight += layer.get_delta_weight("default")
        # the rounding of quantizing the merged weight itself (λ_b = 1, λ_d ~ N(0, 1): a large update)
        quant_error = (quantized_linear(variant, merged_dense)(x) - merged_dense(x)).abs().max().item()
        unmerged = ours(x)
        torch.testing.assert_close(unmerged, merged_dense(x), atol=5 * quant_error, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the quantized-merge report
        ours.merge_adapter()
    with torch.no_grad():
        assert (ours(x) - unmerged).abs().max().item() <= 5 * quant_error
    ours.unmerge_adapter()
    with torch.no_grad():
        assert (ours(x) - unmerged).abs().max().item() <= 5 * quant_error


def test_inspect_strength_is_the_expected_norm_of_the_merged_update() -> None:
    """The strength ``peftkit inspect`` reports from the vectors alone is E‖ΔW‖_F of the merged (mean) update over
    the random projections; for a layer as wide as the widest one it matches the actual norm within the sampling
    spread (r=256: ~5%)."""
    from peftkit.methods.pvera import PVERA

    model = get_peft_model(nn.Sequential(nn.Linear(512, 384)), PveraConfig(target_modules=["0"], init_weights=False))
    layer = model.base_model.model[0]
    params = {k: getattr(layer, k)["default"].detach() for k in ("pvera_lambda_b", "pvera_lambda_d")}
    shape, rank, strength, _ = PVERA.update_strength(params, {"r": 256})
    assert shape == [384, 256] and rank == 256
    actual = float(layer.get_delta_weight("default").norm())
    assert abs(strength / actual - 1) < 0.1


@pytest.mark.slow
def test_compiled_training_forward_draws_from_the_adapters_generator() -> None:
    """Under ``torch.compile`` a seeded adapter samples through one opaque op (no graph break) and draws what eager
    draws from the same generator state."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        return get_peft_model(nn.Sequential(nn.Linear(16, 12)), PveraConfig(
            r=4, generator_seed=5, init_weights=False, target_modules=["0"])).train()

    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    eager = build()(x)
    model = build()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    first, second = compiled(x), compiled(x)
    torch.testing.assert_close(first, eager, **fp_tol(torch.float32, 16 + 4))  # the same draw, other kernels
    assert not torch.allclose(first, second)  # the generator advances between calls
