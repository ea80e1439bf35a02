"""Adapter files: layout, key names, formats, atomic saves, load errors, AutoPeftModel and load_adapter."""

from __future__ import annotations

import json
import os
import re

import pytest
import safetensors.torch
import torch
from models import (
    CASES_BY_NAME,
    MLP,
    EmbModel,
    causal_lm_inputs,
    seq_cls_inputs,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)
from numerics import TINY_MODEL_REDUCTION, fp_tol
from safetensors import safe_open

import peftkit.serialization.files as files_module
from peftkit import (
    AdapterLoadError,
    AdapterNotFoundError,
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    ConfigError,
    LoraConfig,
    PeftModel,
    PeftWarning,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)

# Logits of two models (another instance, library, path or merge) run other kernels on other buffers: float32
# over the tiny models' reductions (see tests/numerics.py)
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)

LLAMA_LORA = {"task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj"], "r": 4, "init_lora_weights": False}


def _listing(path) -> set[str]:
    return {os.path.relpath(os.path.join(root, f), path) for root, _, files in os.walk(path) for f in files}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _two_adapter_llama():
    pm = get_peft_model(tiny_llama(), LoraConfig(**LLAMA_LORA))
    pm.add_adapter("other", LoraConfig(**dict(LLAMA_LORA, target_modules=["k_proj"], r=2)))
    return pm


def _front_matter(text: str) -> list[str]:
    assert text.startswith("---\n")
    return text.split("---\n")[1].splitlines()


# ---------------------------------------------------------------------------------------------- layout


def test_save_layout_and_model_card(tmp_path):
    pm = _two_adapter_llama()
    pm.save_pretrained(tmp_path)
    assert _listing(tmp_path) == {
        "adapter_config.json", "adapter_model.safetensors", "README.md",
        "other/adapter_config.json", "other/adapter_model.safetensors",
    }
    header = _front_matter((tmp_path / "README.md").read_text())
    assert "library_name: peft" in header
    assert "- lora" in header and "- transformers" in header
    assert not any(line.startswith("base_model:") for line in header)  # from-config model: base unknown
    other = json.loads((tmp_path / "other" / "adapter_config.json").read_text())
    assert other["target_modules"] == ["k_proj"] and other["r"] == 2


def test_selected_adapters(tmp_path):
    pm = _two_adapter_llama()
    pm.save_pretrained(tmp_path, selected_adapters=["other"])
    assert _listing(tmp_path) == {"README.md", "other/adapter_config.json", "other/adapter_model.safetensors"}
    with pytest.raises(AdapterNotFoundError, match="nope"):
        pm.save_pretrained(tmp_path / "x", selected_adapters=["nope"])


def test_non_default_adapter_round_trip_with_subfolder(tmp_path):
    pm = _two_adapter_llama()
    pm.save_pretrained(tmp_path)
    pm.set_adapter("other")
    pm.eval()
    inputs = causal_lm_inputs(2)
    expected = _logits(pm, inputs)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, subfolder="other", adapter_name="other")
    assert loaded.active_adapter == "other"
    torch.testing.assert_close(_logits(loaded, inputs), expected, **TOL)


def test_safetensors_metadata_and_keys(tmp_path):
    pm = get_peft_model(tiny_llama(), LoraConfig(**LLAMA_LORA))
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        # "format": "pt" as the reference writes it, plus the config saved in the same transaction (the pairing check)
        assert fh.metadata() == {"format": "pt",
                                 "peftkit_adapter_config": (tmp_path / "adapter_config.json").read_text()}
        keys = set(fh.keys())
    assert keys == {
        f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{ab}.weight"
        for i in (0, 1) for p in ("q_proj", "v_proj") for ab in "AB"
    }
    assert not any("default" in k for k in keys)


def test_embedding_keys_have_no_weight_suffix(tmp_path):
    pm = get_peft_model(EmbModel(), LoraConfig(target_modules=["emb"], r=4))
    pm.save_pretrained(tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == {"base_model.model.emb.lora_embedding_A", "base_model.model.emb.lora_embedding_B"}
    assert tensors["base_model.model.emb.lora_embedding_A"].shape == (4, 100)
    assert tensors["base_model.model.emb.lora_embedding_B"].shape == (16, 4)


def test_bin_format_uses_weights_only(tmp_path, monkeypatch):
    pm = get_peft_model(tiny_llama(), LoraConfig(**LLAMA_LORA)).eval()
    pm.save_pretrained(tmp_path, safe_serialization=False)
    assert _listing(tmp_path) == {"adapter_config.json", "adapter_model.bin", "README.md"}
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    inputs = causal_lm_inputs(2)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert calls == [True]
    torch.testing.assert_close(_logits(loaded, inputs), _logits(pm, inputs), **TOL)


def test_bin_with_pickled_object_is_refused(tmp_path):
    LoraConfig(target_modules=["lin0"]).save_pretrained(tmp_path)
    torch.save({"base_model.model.lin0.lora_A.weight": torch.zeros(8, 10), "evil": PeftWarning("x")},
               tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match=re.escape(str(tmp_path / "adapter_model.bin"))):
        PeftModel.from_pretrained(MLP(), tmp_path)


# ---------------------------------------------------------------------------------------------- state dicts


def test_state_dict_of_injected_model_has_no_prefix():
    model = inject_adapter_in_model(LoraConfig(target_modules=["lin0"], r=2), MLP())
    state = get_peft_model_state_dict(model)
    assert sorted(state) == ["lin0.lora_A.weight", "lin0.lora_B.weight"]
    assert state["lin0.lora_A.weight"].shape == (2, 10)


@pytest.mark.parametrize("prefix", ["", "base_model.model."])
@pytest.mark.parametrize("wrapped", [False, True])
def test_set_state_dict_accepts_keys_with_or_without_prefix(prefix, wrapped):
    config = LoraConfig(target_modules=["lin0"], r=2)
    model = get_peft_model(MLP(), config) if wrapped else inject_adapter_in_model(config, MLP())
    values = {f"{prefix}lin0.lora_A.weight": torch.full((2, 10), 0.5), f"{prefix}lin0.lora_B.weight": torch.ones(20, 2)}
    result = set_peft_model_state_dict(model, values)
    assert result.missing_keys == [] and result.unexpected_keys == []
    layer = (model.get_base_model() if wrapped else model).lin0
    assert torch.equal(layer.lora_A["default"].weight, torch.full((2, 10), 0.5))
    assert torch.equal(layer.lora_B["default"].weight, torch.ones(20, 2))


# ---------------------------------------------------------------------------------------------- atomic save


def test_atomic_save_keeps_previous_file(tmp_path, monkeypatch):
    pm = get_peft_model(tiny_llama(), LoraConfig(**LLAMA_LORA))
    pm.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    before = weights.read_bytes()
    before_listing = _listing(tmp_path)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(1.0)

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\x00" * 100)  # half a file, then the "crash"
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    monkeypatch.setattr(files_module, "save_file", broken_save_file, raising=False)  # if imported at module level
    with pytest.raises(RuntimeError, match="disk full"):
        pm.save_pretrained(tmp_path)
    assert weights.read_bytes() == before
    assert _listing(tmp_path) == before_listing  # no temporary files left behind
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))


# ---------------------------------------------------------------------------------------------- load errors


def test_missing_directory(tmp_path):
    missing = tmp_path / "does-not-exist"
    model = MLP()
    with pytest.raises(AdapterLoadError, match=re.escape(str(missing))):
        PeftModel.from_pretrained(model, missing)
    with pytest.raises(AdapterLoadError, match=re.escape(str(missing))):
        get_peft_model(MLP(), LoraConfig(target_modules=["lin1"])).load_adapter(missing, adapter_name="x")
    assert type(model.lin0).__name__ == "Linear"


def test_missing_weights(tmp_path):
    LoraConfig(target_modules=["lin0"]).save_pretrained(tmp_path)
    with pytest.raises(AdapterLoadError, match=re.escape(str(tmp_path))):
        PeftModel.from_pretrained(MLP(), tmp_path)


def test_truncated_weights(tmp_path):
    pm = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]))
    pm.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    model = MLP()
    with pytest.raises(AdapterLoadError, match=re.escape(str(weights))):
        PeftModel.from_pretrained(model, tmp_path)
    assert type(model.lin0).__name__ == "Linear"


def test_unexpected_key_warns(tmp_path):
    build = CASES_BY_NAME["custom-mlp"].build  # same base weights on every call
    pm = get_peft_model(build(), LoraConfig(target_modules=["lin0"], init_lora_weights=False)).eval()
    state = get_peft_model_state_dict(pm)
    state["base_model.model.lin1.lora_A.weight"] = torch.zeros(8, 20)
    pm.peft_config["default"].save_pretrained(tmp_path)
    safetensors.torch.save_file(state, tmp_path / "adapter_model.safetensors")
    with pytest.warns(PeftWarning, match="lin1.lora_A.weight"):
        loaded = PeftModel.from_pretrained(build(), tmp_path)
    x = torch.randn(3, 10)
    torch.testing.assert_close(loaded(x=x), pm(x=x), **TOL)


# ---------------------------------------------------------------------------------------------- tied GPT-2


@pytest.mark.parametrize("kwargs", [
    {"target_modules": ["c_attn"], "modules_to_save": ["lm_head"]},
    {"target_modules": ["wte", "c_attn"]},
], ids=["lm_head-saved", "embedding-targeted"])
def test_tied_gpt2_saves_and_reloads(tmp_path, kwargs):
    pm = get_peft_model(tiny_gpt2(), LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kwargs)).eval()
    pm.save_pretrained(tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    if "modules_to_save" in kwargs:
        assert "base_model.model.lm_head.weight" in tensors
        saved = json.loads((tmp_path / "adapter_config.json").read_text())
        assert saved["fan_in_fan_out"] is True  # only Conv1D targets: written as the reference writes it
    else:
        assert "base_model.model.transformer.wte.lora_embedding_A" in tensors
    inputs = causal_lm_inputs(2)
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    torch.testing.assert_close(_logits(loaded, inputs), _logits(pm, inputs), **TOL)


# ---------------------------------------------------------------------------------------------- AutoPeftModel


def _saved_base(tmp_path, model, auto_cls_name):
    import transformers

    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    return getattr(transformers, auto_cls_name).from_pretrained(base_dir), str(base_dir)


def test_auto_peft_model_for_causal_lm(tmp_path):
    base, base_dir = _saved_base(tmp_path, tiny_llama(), "AutoModelForCausalLM")
    pm = get_peft_model(base, LoraConfig(**LLAMA_LORA)).eval()
    assert pm.peft_config["default"].base_model_name_or_path == base_dir
    pm.save_pretrained(tmp_path / "adapter")
    header = _front_matter((tmp_path / "adapter" / "README.md").read_text())
    assert not any(base_dir in line for line in header)  # a local path is not published in the card (issue 19)
    assert "pipeline_tag: text-generation" in header
    inputs = causal_lm_inputs(2)
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert type(loaded).__name__ == "PeftModelForCausalLM"
    torch.testing.assert_close(_logits(loaded, inputs), _logits(pm, inputs), **TOL)
    with pytest.raises(ConfigError, match="task_type"):
        AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")


def test_auto_peft_model_for_sequence_classification(tmp_path):
    base, _ = _saved_base(tmp_path, tiny_bert("SEQ_CLS"), "AutoModelForSequenceClassification")
    config = LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], init_lora_weights=False)
    pm = get_peft_model(base, config)
    with torch.no_grad():
        pm.get_base_model().classifier.modules_to_save["default"].weight.add_(0.5)
    pm.eval()
    pm.save_pretrained(tmp_path / "adapter")
    inputs = seq_cls_inputs(2)
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    assert type(loaded).__name__ == "PeftModelForSequenceClassification"
    torch.testing.assert_close(_logits(loaded, inputs), _logits(pm, inputs), **TOL)
    with pytest.raises(ConfigError, match="task_type"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")


def test_auto_peft_model_uses_auto_mapping(tmp_path):
    base, _ = _saved_base(tmp_path, tiny_llama(), "AutoModelForCausalLM")
    pm = get_peft_model(base, LoraConfig(**dict(LLAMA_LORA, task_type=None))).eval()
    pm.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["task_type"] is None
    assert saved["auto_mapping"] == {"base_model_class": "LlamaForCausalLM",
                                     "parent_library": "transformers.models.llama.modeling_llama"}
    inputs = causal_lm_inputs(2)
    loaded = AutoPeftModel.from_pretrained(tmp_path / "adapter")
    assert type(loaded) is PeftModel
    assert type(loaded.get_base_model()).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(_logits(loaded, inputs), _logits(pm, inputs), **TOL)


@pytest.mark.parametrize("cls", [AutoPeftModel, AutoPeftModelForCausalLM])
def test_auto_direct_construction_raises(cls):
    with pytest.raises(OSError, match="from_pretrained"):
        cls()


# ---------------------------------------------------------------------------------------------- load_adapter


@pytest.mark.parametrize("is_trainable", [False, True])
def test_load_adapter_not_activated_and_trainability(tmp_path, is_trainable):
    source = get_peft_model(tiny_llama(), LoraConfig(**LLAMA_LORA)).eval()
    source.save_pretrained(tmp_path)
    inputs = causal_lm_inputs(2)
    pm = get_peft_model(tiny_llama(), LoraConfig(**dict(LLAMA_LORA, target_modules=["q_proj"])))
    pm.eval()
    before = _logits(pm, inputs)
    default_grads = {n: p.requires_grad for n, p in pm.named_parameters() if ".default." in n}
    result = pm.load_adapter(tmp_path, adapter_name="second", is_trainable=is_trainable)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert pm.active_adapter == "default"
    torch.testing.assert_close(_logits(pm, inputs), before, atol=0, rtol=0)
    second = [p for n, p in pm.named_parameters() if ".second." in n]
    assert len(second) == 8
    assert not any(p.requires_grad for p in second)  # inactive adapters never train
    assert {n: p.requires_grad for n, p in pm.named_parameters() if ".default." in n} == default_grads
    pm.set_adapter("second")  # keeps the adapter's own mode: trainable only if loaded with is_trainable=True
    torch.testing.assert_close(_logits(pm, inputs), _logits(source, inputs), **TOL)
    assert all(p.requires_grad is is_trainable for p in second)
    assert not any(p.requires_grad for n, p in pm.named_parameters() if ".default." in n)


def _mixed_file(tmp_path) -> tuple[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    tensors = {
        "a": torch.randn(7, 5, generator=g), "b": torch.randn(3, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 4), "c": torch.randint(0, 9, (11,), generator=g), "d": torch.randn(2, 2, 2, generator=g),
    }
    path = str(tmp_path / "w.safetensors")
    safetensors.torch.save_file(tensors, path)
    return path, tensors


@pytest.mark.parametrize("mode", ["preadv", "partial", "no_preadv"])
def test_whole_file_read_equals_safetensors(tmp_path, monkeypatch, mode):
    path, tensors = _mixed_file(tmp_path)
    real = getattr(os, "preadv", None)
    if mode == "partial" and real is not None:  # the OS returns at most 9 bytes per call: reads must continue
        calls = []
        monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: calls.append(off) or real(fd, _first_bytes(bufs, 9), off))
    elif mode == "no_preadv" and real is not None:
        monkeypatch.delattr(os, "preadv")
    read = files_module._read_whole_file(path)
    assert read is not None
    loaded = read[0]
    assert loaded.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor)
    storages = {t.untyped_storage().data_ptr() for t in loaded.values() if t.numel()}
    assert len(storages) == 4  # each tensor owns its storage
    if mode == "partial" and real is not None:
        assert len(calls) > 10


def _first_bytes(buffers: list[memoryview], limit: int) -> list[memoryview]:
    out = []
    for buf in buffers:
        if limit <= 0:
            break
        out.append(buf[:limit])
        limit -= len(out[-1])
    return out


def test_whole_file_read_reports_a_short_read(tmp_path, monkeypatch):
    path, _ = _mixed_file(tmp_path)
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: 0, raising=False)  # the file shrank under us
    assert files_module._read_whole_file(path) is None
