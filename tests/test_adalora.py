"""AdaLoRA: config rules, the SVD layer against a dense formula, the orthogonality regulariser, the budget schedule,
rank allocation during training (optimizer hook and Trainer callback), rank_pattern save/load, and interoperability
with the reference library."""

from __future__ import annotations

import copy
import itertools
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from models import CASES_BY_NAME, MLP, tiny_gpt2, tiny_llama
from numerics import TINY_MODEL_REDUCTION, fp_tol
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import (
    AdaLoraConfig,
    ConfigError,
    PeftModel,
    PeftWarning,
    UnsupportedModuleError,
    attach_adalora,
    get_peft_model,
)
from peftkit.methods.adalora import SVDLayer, budget_schedule

ATOL = 1e-5
# Logits of two models (another instance, library, path or merge) run other kernels on other buffers: float32
# over the tiny models' reductions (see tests/numerics.py)
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)
LLAMA_TARGETS = ["q_proj", "v_proj"]
N_LLAMA = 4  # 2 layers x (q_proj, v_proj)


def _svd_layers(model: nn.Module) -> dict[str, SVDLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDLayer)}


def total_rank(model: nn.Module, adapter: str = "default") -> int:
    """Number of nonzero ``E`` entries over every layer."""
    return sum(int((m.lora_E[adapter] != 0).sum()) for m in _svd_layers(model).values())


def _randomize(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if any(k in name for k in ("lora_A", "lora_B", "lora_E")):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits without passing labels (the reference's AdaLoRA fails on a loss when no adapter is trainable)."""
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    if "decoder_input_ids" not in kwargs and inputs["labels"].shape != inputs["input_ids"].shape:
        kwargs["decoder_input_ids"] = inputs["labels"]  # seq2seq
    with torch.no_grad():
        return model(**kwargs).logits


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, field", [
    ({}, "total_step"),
    ({"total_step": 0}, "total_step"),
    ({"total_step": 10, "use_dora": True}, "use_dora"),
    ({"total_step": 10, "loftq_config": {"loftq_bits": 4}}, "loftq_config"),
    ({"total_step": 10, "tinit": 6, "tfinal": 4}, "tinit"),
    ({"total_step": 10, "beta1": 1.0}, "beta1"),
    ({"total_step": 10, "beta2": 0.0}, "beta2"),
    ({"total_step": 10, "target_r": -1}, "target_r"),
    ({"total_step": 10, "deltaT": 0}, "deltaT"),
    ({"total_step": 10, "orth_reg_weight": -0.1}, "orth_reg_weight"),
    ({"total_step": 10, "rank_pattern": {"x.lora_E": [1, 0]}}, "rank_pattern"),
])
def test_config_rules(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        AdaLoraConfig(**kwargs)
    assert info.value.field == field


def test_config_defaults_warning_and_file() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = AdaLoraConfig(total_step=10)  # r left at 8: no warning
    assert (config.target_r, config.init_r, config.tinit, config.tfinal, config.deltaT) == (8, 12, 0, 0, 1)
    assert (config.beta1, config.beta2, config.orth_reg_weight, config.rank_pattern) == (0.85, 0.85, 0.5, None)
    assert isinstance(config, peftkit.LoraConfig) and config.peft_type == "ADALORA"
    with pytest.warns(PeftWarning, match="init_r"):
        AdaLoraConfig(total_step=10, r=4)
    data = json.loads(config.to_json_string())
    assert data["rank_pattern"] is None and data["peft_type"] == "ADALORA" and data["total_step"] == 10
    assert type(peftkit.PeftConfig.from_dict(data)) is AdaLoraConfig


def test_config_defaults_match_reference() -> None:
    peft = pytest.importorskip("peft")
    ours = AdaLoraConfig(total_step=10).to_dict()
    ref = peft.AdaLoraConfig(total_step=10).to_dict()
    for key in ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                "rank_pattern", "lora_alpha", "lora_dropout"):
        assert ours[key] == ref[key], key


def test_default_targets_and_unsupported_modules() -> None:
    model = get_peft_model(tiny_llama(), AdaLoraConfig(task_type="CAUSAL_LM", total_step=10))
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    with pytest.raises(UnsupportedModuleError, match="embed_tokens"):
        get_peft_model(tiny_llama(), AdaLoraConfig(total_step=10, target_modules=["embed_tokens"]))


# ---------------------------------------------------------------------------------------------- layer math
@pytest.mark.parametrize("lora_alpha", [8, 0])
def test_layer_matches_dense_formula(lora_alpha: float) -> None:
    """``y = W x + b + B (A * E) x * scaling / (ranknum + 1e-5)`` from the saved tensors; ``scaling = lora_alpha``
    (``init_r`` when ``lora_alpha <= 0``), ``ranknum = init_r``."""
    torch.manual_seed(0)
    base = MLP()
    config = AdaLoraConfig(target_modules=["lin0"], init_r=5, total_step=10, lora_alpha=lora_alpha)
    model = get_peft_model(copy.deepcopy(base), config)
    _randomize(model, 1)
    state = peftkit.get_peft_model_state_dict(model)
    A, E, B = (state[f"base_model.model.lin0.lora_{k}"] for k in "AEB")
    assert A.shape == (5, 10) and E.shape == (5, 1) and B.shape == (20, 5)
    assert not any("ranknum" in k for k in state)
    scaling = lora_alpha if lora_alpha > 0 else 5
    x = torch.randn(3, 10)
    hidden = base.lin0(x) + x @ (A * E).T @ B.T * scaling / (5 + 1e-5)
    expected = base.lin1(torch.relu(hidden))
    with torch.no_grad():
        torch.testing.assert_close(model(x=x), expected, **TOL)


def test_gpt2_conv1d_and_merge_equivalence() -> None:
    inputs = CASES_BY_NAME["gpt2-causal"].make_inputs(2)
    model = get_peft_model(tiny_gpt2(), AdaLoraConfig(target_modules=["c_attn"], init_r=4, total_step=10)).eval()
    _randomize(model, 2)
    layer = next(iter(_svd_layers(model).values()))
    assert layer.fan_in_fan_out and layer.get_delta_weight("default").shape == layer.get_base_layer().weight.shape
    assert model.peft_config["default"].fan_in_fan_out is True
    out = _logits(model, inputs)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, inputs), out, rtol=1e-5, atol=ATOL)
    model.unmerge_adapter()
    merged = model.merge_and_unload()
    torch.testing.assert_close(_logits(merged, inputs), out, rtol=1e-5, atol=ATOL)


def test_identity_at_init_and_only_adapter_params_train() -> None:
    inputs = CASES_BY_NAME["llama-causal"].make_inputs(2)
    expected = _logits(tiny_llama().eval(), inputs)
    model = get_peft_model(tiny_llama(), AdaLoraConfig(target_modules=LLAMA_TARGETS, init_r=4, total_step=10))
    assert all((m.lora_E["default"] == 0).all() for m in _svd_layers(model).values())
    torch.testing.assert_close(_logits(model.eval(), inputs), expected, **TOL)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[-2] in ("lora_A", "lora_B", "lora_E") for n in trainable)
    assert len(trainable) == 3 * N_LLAMA


def test_add_weighted_adapter_raises_type_error() -> None:
    model = get_peft_model(tiny_llama(), AdaLoraConfig(target_modules=LLAMA_TARGETS, total_step=10))
    with pytest.raises(TypeError, match="add_weighted_adapter"):
        model.add_weighted_adapter(["default"], [1.0], "combined")


# ---------------------------------------------------------------------------------------------- regulariser
def test_orthogonal_regularization_is_added_to_the_loss() -> None:
    inputs = CASES_BY_NAME["llama-causal"].make_inputs(2)
    config = AdaLoraConfig(target_modules=LLAMA_TARGETS, init_r=4, total_step=10, orth_reg_weight=0.3)
    model = get_peft_model(tiny_llama(), config)
    _randomize(model, 3)
    plain = model.get_base_model()(**inputs).loss  # the model's own loss, without the regulariser
    norms = []
    for layer in _svd_layers(model).values():
        A, B = layer.lora_A["default"], layer.lora_B["default"]
        norms.append(torch.sqrt(((A @ A.T - torch.eye(A.shape[0])) ** 2).sum()))
        norms.append(torch.sqrt(((B.T @ B - torch.eye(B.shape[1])) ** 2).sum()))
    assert len(norms) == 2 * N_LLAMA
    expected = plain + 0.3 * torch.stack(norms).mean()
    loss = model(**inputs).loss
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A" in n)
    model.set_adapter("default", inference_mode=True)  # no trained adapter: nothing added
    torch.testing.assert_close(model(**inputs).loss, plain, **TOL)


# ---------------------------------------------------------------------------------------------- schedule
def test_budget_schedule_follows_the_formula() -> None:
    config = AdaLoraConfig(total_step=20, tinit=2, tfinal=3, deltaT=2)
    init, target = 48, 16

    def formula(step: int) -> int:
        return int((init - target) * (1 - (step - 2) / (20 - 3 - 2)) ** 3 + target)

    assert budget_schedule(config, init, target, 1) == (48, False)
    assert budget_schedule(config, init, target, 2) == (48, False)
    assert budget_schedule(config, init, target, 5) == (formula(5), False)  # 5 % deltaT != 0
    assert budget_schedule(config, init, target, 6) == (formula(6), True)
    assert budget_schedule(config, init, target, 17) == (16, False)
    assert budget_schedule(config, init, target, 18) == (16, True)
    assert 16 < formula(6) < formula(5) < 48


# ---------------------------------------------------------------------------------------------- training
TRAIN = {"init_r": 4, "target_r": 2, "total_step": 12, "tinit": 2, "tfinal": 3}


def _train_with_hook(config: AdaLoraConfig) -> tuple[PeftModel, list[int]]:
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), config)
    inputs = CASES_BY_NAME["llama-causal"].make_inputs(2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    hook = attach_adalora(model, optimizer)
    ranks = [total_rank(model)]
    for _ in range(config.total_step):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ranks.append(total_rank(model))
    assert hook.global_step == config.total_step
    hook.remove()
    return model, ranks


@pytest.fixture(scope="module")
def trained() -> tuple[PeftModel, list[int], AdaLoraConfig]:
    config = AdaLoraConfig(task_type="CAUSAL_LM", target_modules=LLAMA_TARGETS, **TRAIN)
    model, ranks = _train_with_hook(config)
    return model, ranks, config


def test_training_with_optimizer_hook_reduces_total_rank(trained: Any) -> None:
    model, ranks, config = trained
    init_total, target_total = TRAIN["init_r"] * N_LLAMA, TRAIN["target_r"] * N_LLAMA
    assert ranks[TRAIN["tinit"]] == init_total  # warm-up keeps the full budget (E moved off 0 by then)
    assert all(a >= b for a, b in itertools.pairwise(ranks[1:])), ranks  # non-increasing once E is nonzero
    assert ranks[-1] == target_total
    assert any(target_total < r < init_total for r in ranks), ranks  # the schedule passes through
    for step in range(TRAIN["tinit"] + 1, TRAIN["total_step"] + 1):  # each masking step meets its budget exactly
        assert ranks[step] == budget_schedule(config, init_total, target_total, step)[0], (step, ranks)
    pattern = model.peft_config["default"].rank_pattern
    assert set(pattern) == {f"model.layers.{i}.self_attn.{m}.lora_E" for i in range(2) for m in LLAMA_TARGETS}
    assert sum(sum(v) for v in pattern.values()) == target_total
    assert config.rank_pattern is None  # the user's config is not modified
    base = tiny_llama()
    for name, p in model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base.get_parameter(name.replace(".base_layer", ""))), name


def test_removed_hook_and_one_trainable_adapter_rule() -> None:
    config = AdaLoraConfig(target_modules=LLAMA_TARGETS, init_r=4, target_r=2, total_step=2)
    model = get_peft_model(tiny_llama(), config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    attach_adalora(model, optimizer).remove()
    _randomize(model, 4)
    model(**CASES_BY_NAME["llama-causal"].make_inputs(2)).loss.backward()
    optimizer.step()
    assert total_rank(model) == 4 * N_LLAMA and model.peft_config["default"].rank_pattern is None
    model.add_adapter("other", config)
    model.set_adapter(["default", "other"], inference_mode=False)
    with pytest.raises(ConfigError, match="one adapter at a time"):
        model.base_model.update_and_allocate(1)
    with pytest.raises(ConfigError, match="model"):
        attach_adalora(get_peft_model(tiny_llama(), peftkit.LoraConfig(target_modules=LLAMA_TARGETS)), optimizer)


def test_trainer_callback_runs_the_allocation(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = AdaLoraConfig(task_type="CAUSAL_LM", target_modules=LLAMA_TARGETS, init_r=4, target_r=2, total_step=3)
    model = get_peft_model(tiny_llama(), config)
    inputs = CASES_BY_NAME["llama-causal"].make_inputs(2)
    data = [{k: v[i] for k, v in inputs.items()} for i in range(2)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=2e-2, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, remove_unused_columns=False, label_names=["labels"],
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[peftkit.AdaLoraCallback()])
    trainer.train()
    assert isinstance(peftkit.AdaLoraCallback(), transformers.TrainerCallback)
    pattern = model.peft_config["default"].rank_pattern
    assert pattern is not None and sum(sum(v) for v in pattern.values()) == 2 * N_LLAMA
    assert total_rank(model) == 2 * N_LLAMA


# ---------------------------------------------------------------------------------------------- save / load
def test_save_with_rank_pattern_reloads_identically(trained: Any, tmp_path: Path) -> None:
    model, _, _ = trained
    model.eval()
    inputs = CASES_BY_NAME["llama-causal"].make_inputs(2)
    expected = _logits(model, inputs)
    model.save_pretrained(tmp_path)
    pattern = model.peft_config["default"].rank_pattern
    saved = load_file(tmp_path / "adapter_model.safetensors")
    for key, keep in pattern.items():
        kept, prefix = sum(keep), f"base_model.model.{key.removesuffix('.lora_E')}"
        assert saved[f"{prefix}.lora_E"].shape == (kept, 1)
        assert saved[f"{prefix}.lora_A"].shape == (kept, 32)
        assert saved[f"{prefix}.lora_B"].shape[1] == kept
    assert sum(t.numel() for k, t in saved.items() if k.endswith("lora_E")) == 2 * N_LLAMA
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] == pattern
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert not [w for w in caught if "rank_pattern" in str(w.message)]  # surviving-rank masks are not regexes
    torch.testing.assert_close(_logits(loaded, inputs), expected, **TOL)
    layers = _svd_layers(loaded)
    assert all(m.ranknum["default"] == 4 for m in layers.values())
    assert sum(m.r["default"] for m in layers.values()) == 2 * N_LLAMA
    loaded.merge_adapter()
    torch.testing.assert_close(_logits(loaded, inputs), expected, rtol=1e-5, atol=ATOL)


# ---------------------------------------------------------------------------------------------- interop
def _allocate_to_target(lib: Any, model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    """Two optimizer steps with ``total_step=2``: step 2 makes the final allocation (rank_pattern set)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for step in (1, 2):
        model(**inputs).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()


@pytest.mark.interop
@pytest.mark.parametrize("direction", ["ours-to-reference", "reference-to-ours"])
@pytest.mark.parametrize("case_name", ["llama-causal", "t5-seq2seq"])
def test_interop_with_reference(case_name: str, direction: str, tmp_path: Path) -> None:
    """A file with a rank_pattern saved by one library loads in the other: same keys and shapes, same rank_pattern,
    outputs within 1e-5."""
    peft = pytest.importorskip("peft")
    case = CASES_BY_NAME[case_name]
    lib_save, lib_load = (peftkit, peft) if direction == "ours-to-reference" else (peft, peftkit)
    config = lib_save.AdaLoraConfig(task_type=case.task_type, target_modules=list(case.target_modules), init_r=4,
                                    target_r=2, total_step=2, lora_alpha=16)
    torch.manual_seed(0)
    saver = lib_save.get_peft_model(case.build(), config)
    _randomize(saver, 5)
    inputs = case.make_inputs(2)
    _allocate_to_target(lib_save, saver, inputs)
    saver.eval()
    expected = _logits(saver, inputs)
    saver.save_pretrained(tmp_path)
    file_config = json.loads((tmp_path / "adapter_config.json").read_text())
    pattern = file_config["rank_pattern"]
    n = len(pattern)
    assert n > 0 and all(k.endswith(".lora_E") and not k.startswith("base_model") for k in pattern)
    assert sum(sum(v) for v in pattern.values()) == 2 * n
    loaded = lib_load.PeftModel.from_pretrained(case.build(), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, inputs), expected, **TOL)
    assert (_logits(case.build().eval(), inputs) - expected).abs().max() > 1e-3  # the adapter matters
    saved = {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    reloaded = {k: tuple(v.shape) for k, v in lib_load.get_peft_model_state_dict(loaded).items()}
    assert saved == reloaded
    assert sum(s[0] for k, s in saved.items() if k.endswith("lora_E")) == 2 * n
    assert {k: list(v) for k, v in loaded.peft_config["default"].rank_pattern.items()} == pattern
