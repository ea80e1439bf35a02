"""LoRA on parameters (``LoraConfig(target_parameters=[...])``): the experts of transformers' MoE models (3-D
parameters) and any 2-D or 3-D parameter of a custom module (issue 17, item 1 and 2).

Interop runs both ways against the reference on tiny models of every MoE architecture transformers 5 stores as
parameters; outputs are compared after perturbing the adapter weights (``init_lora_weights=False``) with a
tolerance from the dtype and the reduction length (different kernels: the reference forms ``W + ΔW``, peftkit adds
the low-rank term on the routed tokens).
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from moe_models import moe_model
from numerics import fp_tol
from torch import nn

from peftkit import (
    ConfigError,
    LoraConfig,
    PeftModel,
    PeftWarning,
    get_peft_model,
    get_peft_model_state_dict,
)
from peftkit.errors import UnsupportedOperationError
from peftkit.methods.lora import param as param_module
from peftkit.methods.lora.param import ParamLayer

#: float32 over the tiny MoE models' hidden size (32): ~1.5e-5, the issue's 1e-5 bound in ulps (seen: <= 5e-7)
TOL = fp_tol(torch.float32, 32)
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
#: decorated experts (routed path) and Llama 4 (own forward: W + ΔW for the call)
MODELS = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3", "deepseek_v2", "glm4_moe", "qwen3_next",
          "gpt_oss", "phimoe", "llama4"]


def _config(lib: object = None, **overrides: object) -> object:
    kwargs = {"r": 2, "lora_alpha": 4, "target_modules": [], "target_parameters": EXPERTS, "init_lora_weights": False,
              **overrides}
    return (lib or peft).LoraConfig(**kwargs) if lib is peft else LoraConfig(**kwargs)


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits


def _quiet() -> warnings.catch_warnings:
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.simplefilter("ignore")
    return context


@pytest.mark.parametrize("name", MODELS)
def test_peftkit_files_load_in_the_reference(name: str, tmp_path) -> None:
    torch.manual_seed(1)
    ours = get_peft_model(moe_model(name), _config()).eval()
    expected = _logits(ours)
    assert not torch.allclose(expected, _logits(moe_model(name).eval()), **TOL)  # the adapter changes the output
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(moe_model(name), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs), expected, **TOL)
    assert set(peft.get_peft_model_state_dict(theirs)) == set(get_peft_model_state_dict(ours))


@pytest.mark.parametrize("name", MODELS)
def test_reference_files_load_in_peftkit(name: str, tmp_path) -> None:
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(moe_model(name), _config(peft)).eval()
    expected = _logits(theirs)
    theirs.save_pretrained(str(tmp_path))
    ours = PeftModel.from_pretrained(moe_model(name), tmp_path).eval()
    torch.testing.assert_close(_logits(ours), expected, **TOL)
    mine = get_peft_model(moe_model(name), _config())
    count = sum(p.numel() for p in mine.parameters() if p.requires_grad)
    assert count == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert ours.peft_config["default"].target_parameters is not None


def _routed_and_materialised(name: str, monkeypatch: pytest.MonkeyPatch,
                             r: int = 2) -> tuple[tuple[torch.Tensor, ...], ...]:
    results = []
    for materialise in (False, True):
        with monkeypatch.context() as patch:
            if materialise:
                patch.setattr(param_module, "routed_forward", lambda *args: None)
            torch.manual_seed(1)
            model = get_peft_model(moe_model(name), _config(r=r))
            loss = model(_ids(), labels=_ids()).loss
            loss.backward()
            grads = [p.grad for _, p in sorted(model.named_parameters()) if p.requires_grad]
            results.append((loss.detach(), *grads))
    return tuple(results)


@pytest.mark.parametrize("r", [2, 4], ids=["r2-loop", "r4-grouped_mm"])
@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "qwen3_next", "deepseek_v3"])
def test_routed_lora_equals_materialised_weights(name: str, r: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loss and every adapter gradient of the routed path equal those of ``W + ΔW`` (the reference's formula); with
    r=4 the low-rank factors also go through torch's grouped_mm (16-byte rows), with r=2 through the plain loop."""
    routed, materialised = _routed_and_materialised(name, monkeypatch, r)
    assert len(routed) == len(materialised) > 1
    for got, want in zip(routed, materialised):
        torch.testing.assert_close(got, want, **TOL)


def test_the_routed_path_is_taken_for_transformers_experts(monkeypatch: pytest.MonkeyPatch) -> None:
    results: list[object] = []
    real = param_module.routed_forward
    monkeypatch.setattr(param_module, "routed_forward", lambda *a: results.append(real(*a)) or results[-1])
    model = get_peft_model(moe_model("mixtral"), _config())
    assert model(_ids()).logits.shape == (2, 9, 64)
    # one call per layer (the outer wrapper computes both nested parameters), each answered by the routed path
    assert len(results) == 2 and all(isinstance(r, torch.Tensor) for r in results)


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_merge_unmerge_unload(name: str) -> None:
    torch.manual_seed(1)
    model = get_peft_model(moe_model(name), _config()).eval()
    expected = _logits(model)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model), expected, **TOL)
    model.unmerge_adapter()
    torch.testing.assert_close(_logits(model), expected, **TOL)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), _logits(moe_model(name).eval()), **TOL)
    merged = model.merge_and_unload()
    torch.testing.assert_close(_logits(merged), expected, **TOL)
    experts = merged.model.layers[0].mlp.experts
    assert type(experts).__name__.endswith("Experts") and not any(isinstance(m, ParamLayer) for m in merged.modules())
    assert not hasattr(experts, "base_layer")


def test_save_and_load_round_trip_exactly(tmp_path) -> None:
    torch.manual_seed(1)
    model = get_peft_model(moe_model("qwen3_moe"), _config()).eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(moe_model("qwen3_moe"), tmp_path).eval()
    assert torch.equal(_logits(loaded), _logits(model))  # same tensors, same code path
    keys = set(get_peft_model_state_dict(model))
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys  # gate_up_proj, nested
    assert "base_model.model.model.layers.0.mlp.experts.lora_B.weight" in keys  # down_proj, outer


def test_two_adapters_on_the_same_parameters_and_switching() -> None:
    torch.manual_seed(1)
    model = get_peft_model(moe_model("mixtral"), _config()).eval()
    first = _logits(model)
    model.add_adapter("other", _config(r=3))
    model.set_adapter("other")
    second = _logits(model)
    assert not torch.allclose(first, second)
    model.set_adapter("default")
    torch.testing.assert_close(_logits(model), first, **TOL)
    experts = model.base_model.model.model.layers[0].mlp.experts
    assert [layer.parameter_name for layer in experts.chain()] == ["down_proj", "gate_up_proj"]
    assert all(set(layer.lora_A) == {"default", "other"} for layer in experts.chain())


def test_rules_of_the_reference_raise_typed_errors() -> None:
    model = get_peft_model(moe_model("mixtral"), _config())
    with pytest.raises(ConfigError, match="same ones"):
        model.add_adapter("other", _config(target_parameters=["experts.down_proj"]))
    assert list(model.peft_config) == ["default"]
    for field, value in (("lora_dropout", 0.1), ("use_dora", True), ("lora_bias", True),
                         ("init_lora_weights", "pissa")):
        with pytest.raises(ConfigError, match=field):
            get_peft_model(moe_model("mixtral"), _config(**{field: value}))
    with pytest.raises(ConfigError, match="the module itself is adapted"):
        get_peft_model(moe_model("mixtral"), _config(target_modules=["q_proj"], target_parameters=["q_proj.weight"]))
    with pytest.raises(ConfigError, match="target_parameters"):
        LoraConfig(target_parameters="experts.down_proj")


def test_mixed_batches_are_refused() -> None:
    model = get_peft_model(moe_model("mixtral"), _config()).eval()
    with pytest.raises(UnsupportedOperationError, match="mixed adapter batches"):
        model(_ids(), adapter_names=["default", "default"])


def test_router_weight_saves_the_keys_of_a_linear_layer(tmp_path) -> None:
    """A 2-D parameter (Mixtral's router ``gate.weight``) gets ``lora_A: (r, in)``, ``lora_B: (out, r)`` under the
    module's name, the keys a LoRA ``nn.Linear`` would have; mixed with module targets."""
    torch.manual_seed(1)
    config = _config(target_modules=["q_proj"], target_parameters=["gate.weight"])
    model = get_peft_model(moe_model("mixtral"), config).eval()
    keys = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    assert keys["base_model.model.model.layers.0.mlp.gate.lora_A.weight"] == (2, 32)
    assert keys["base_model.model.model.layers.0.mlp.gate.lora_B.weight"] == (4, 2)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(moe_model("mixtral"), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs), _logits(model), **TOL)


class _Custom(nn.Module):
    """A module with a 3-D ``(E, out, in)`` parameter applied to every expert and a 2-D ``(out, in)`` one."""

    def __init__(self) -> None:
        super().__init__()
        self.stack = nn.Parameter(torch.randn(3, 6, 5))
        self.proj = nn.Parameter(torch.randn(4, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, 5) -> (B, 4)``."""
        hidden = torch.einsum("eoi,bi->bo", self.stack, x)
        return hidden @ self.proj.T


class _Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = _Custom()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def test_any_module_parameters_match_a_plain_formula_and_the_reference(tmp_path) -> None:
    """Outside transformers' experts, the parameters are replaced by ``W + ΔW`` for the call: checked against the
    formula written here and against the reference's file."""
    torch.manual_seed(1)
    config = _config(target_parameters=["block.stack", "block.proj"], r=2)
    model = get_peft_model(_Holder(), config)
    x = torch.randn(7, 5)
    stack_layer = model.base_model.model.block.find("stack")
    proj_layer = model.base_model.model.block.find("proj")
    A, B = stack_layer.expert_factors("default")  # (E, r, in), (E, out, r)
    stack = _Holder().block.stack + torch.bmm(B, A) * stack_layer.scaling["default"]
    proj = _Holder().block.proj + (proj_layer.lora_B["default"].weight @ proj_layer.lora_A["default"].weight) * 2.0
    expected = torch.einsum("eoi,bi->bo", stack, x) @ proj.T
    torch.testing.assert_close(model(x), expected, **TOL)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_Holder(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), **TOL)


# ----------------------------------------------------------------------------- all-linear and defaults on MoE models
#: the reference's trainable counts for all-linear (r=2) on these tiny models, for the record; checked live below
CONVERTED = ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2", "glm4_moe", "qwen3_next"]


def _adapted(state_dict_keys: set[str]) -> set[str]:
    return {k.rsplit(".lora_", 1)[0] for k in state_dict_keys}


@pytest.mark.parametrize("name", [*CONVERTED, "qwen2_moe", "gpt_oss"])
def test_all_linear_adapts_what_the_reference_adapts(name: str, tmp_path) -> None:
    """Experts and router included where the reference's MoE conversion puts them, the same modules and
    parameters, the same trainable count, and files that load both ways with the same outputs."""
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(moe_model(name), _config(peft, target_modules="all-linear",
                                                              target_parameters=None)).eval()
        ours = get_peft_model(moe_model(name), _config(target_modules="all-linear", target_parameters=None)).eval()
    assert _adapted(set(get_peft_model_state_dict(ours))) == _adapted(set(peft.get_peft_model_state_dict(theirs)))
    count = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert count == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(str(tmp_path / "theirs"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_theirs = peft.PeftModel.from_pretrained(moe_model(name), str(tmp_path / "ours")).eval()
        loaded_ours = PeftModel.from_pretrained(moe_model(name), tmp_path / "theirs").eval()
    torch.testing.assert_close(_logits(loaded_theirs), _logits(ours), **TOL)
    torch.testing.assert_close(_logits(loaded_ours), _logits(theirs), **TOL)


@pytest.mark.parametrize("name", ["deepseek_v3", "glm4_moe", "qwen3_next"])
def test_linears_left_out_by_the_conversion_are_named_in_a_warning(name: str) -> None:
    with pytest.warns(PeftWarning, match=r"not adapted: .*(mlp|shared_expert)"):
        get_peft_model(moe_model(name), _config(target_modules="all-linear", target_parameters=None))


def test_targeting_half_of_a_fused_projection_raises() -> None:
    with pytest.raises(ConfigError, match="fused"):
        get_peft_model(moe_model("qwen3_moe"), _config(target_modules=["q_proj", "gate_proj"], target_parameters=None))


@pytest.mark.parametrize("name", [*CONVERTED, "qwen2_moe", "gpt_oss", "phimoe"])
def test_default_targets_on_moe_models_adapt_attention(name: str, tmp_path) -> None:
    """The reference raises here (its conversion empties the defaults, or it has no entry); peftkit adapts the
    attention projections, and the file loads in the reference with the same outputs."""
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = get_peft_model(moe_model(name), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False)).eval()
    adapted = _adapted(set(get_peft_model_state_dict(ours)))
    assert adapted and all("attn" in key for key in adapted)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(moe_model(name), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs), _logits(ours), **TOL)


# --------------------------------------------------------------------- adapters trained on transformers 4 MoE models
_V4 = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")), "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


def _v4_adapter(name: str, directory) -> nn.Module:
    """Write a transformers-4 style adapter (one LoRA per expert projection, ``r=2``, ``alpha=4``) for ``name`` and
    return the base model with those updates merged by hand (the formula the fused layout must reproduce)."""
    import json

    from safetensors.torch import save_file

    container, (gate, up, down) = _V4[name]
    reference = moe_model(name).eval()
    generator = torch.Generator().manual_seed(5)
    tensors: dict[str, torch.Tensor] = {}
    for layer_index, layer in enumerate(reference.model.layers):
        experts = layer.mlp.experts
        hidden, ff = experts.down_proj.shape[1], experts.down_proj.shape[2]
        for e in range(experts.num_experts):
            deltas = {}
            for proj, (fan_in, fan_out) in ((gate, (hidden, ff)), (up, (hidden, ff)), (down, (ff, hidden))):
                A = torch.randn(2, fan_in, generator=generator) * 0.3
                B = torch.randn(fan_out, 2, generator=generator) * 0.3
                prefix = f"base_model.model.model.layers.{layer_index}.{container}.experts.{e}.{proj}"
                tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = A, B
                deltas[proj] = (B @ A) * 2.0  # scaling = alpha / r
            with torch.no_grad():
                experts.gate_up_proj[e] += torch.cat([deltas[gate], deltas[up]])
                experts.down_proj[e] += deltas[down]
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "target_modules": [gate, up, down]}))
    return reference


@pytest.mark.parametrize("name", list(_V4))
def test_transformers_4_expert_adapters_load_fused(name: str, tmp_path) -> None:
    """Per-expert keys are fused at load (as the reference converts them): the output equals the hand-merged
    experts and the reference's load of the same file."""
    merged = _v4_adapter(name, tmp_path)
    ours = PeftModel.from_pretrained(moe_model(name), tmp_path).eval()
    torch.testing.assert_close(_logits(ours), _logits(merged), **TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(moe_model(name), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(ours), _logits(theirs), **TOL)
    assert ours.peft_config["default"].target_parameters == ["down_proj", "gate_up_proj"]


@pytest.mark.parametrize("name", ["deepseek_v3", "glm4_moe", "qwen3_next"])
def test_dense_and_shared_linears_as_2d_parameters_load_in_the_reference(name: str, tmp_path) -> None:
    """The way out the warning names: all-linear plus the left-out linears' weights as 2-D ``target_parameters``
    adapts them too, and the reference loads the file with the same outputs (its conversion rewrites only
    ``target_modules``)."""
    torch.manual_seed(1)
    dense = ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    shared = "shared_expert" if name == "qwen3_next" else "shared_experts"
    extra = [*dense, *(f"{shared}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj"))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = get_peft_model(moe_model(name), _config(target_modules="all-linear", target_parameters=None))
        ours = get_peft_model(moe_model(name), _config(target_modules="all-linear", target_parameters=extra)).eval()
    assert set(plain.base_model.targeted_parameter_names) < set(ours.base_model.targeted_parameter_names)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(moe_model(name), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs), _logits(ours), **TOL)
    assert set(peft.get_peft_model_state_dict(theirs)) == set(get_peft_model_state_dict(ours))


def test_compiled_model_has_no_graph_break_from_parameter_adapters() -> None:
    """Under torch.compile the routed loop (data-dependent group sizes) steps aside for ``W + ΔW``, which dynamo
    traces: no graph break comes from peftkit (the routed loop would break at its ``tolist``)."""
    torch._dynamo.reset()
    model = get_peft_model(moe_model("mixtral"), _config(target_modules=["q_proj"])).eval()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(_ids())
    assert explanation.graph_break_count == 0, explanation.break_reasons
