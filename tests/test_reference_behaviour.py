"""Behaviours that match the reference library (issue 15, section 2): module dtype/device moves on LoHa/LoKr
models, ``disable_adapter()`` restoring the previous state, ``inference_mode`` in saved configs, the reference's
public API on ``PeftModel``/``PeftConfig`` (same signatures), ``AutoPeftModel`` on task adapters, and the
spellings the reference accepts.

Each test builds the same tiny model for both libraries where a comparison is made; the reference (``peft``) is
imported only here, in tests.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import peft
import pytest
import torch
from models import MLP, Conv1dModel, Conv2dModel
from numerics import TINY_MODEL_REDUCTION, fp_tol

import peftkit
from peftkit import get_peft_model

# ------------------------------------------------------------------------------------------------ 1. LoHa/LoKr


def _lycoris_configs(pkg, target: str) -> list:
    return [pkg.LoHaConfig(r=2, target_modules=[target], init_weights=False),
            pkg.LoKrConfig(r=2, target_modules=[target], init_weights=False)]


_MODELS = [(MLP, "lin0", (2, 10)), (Conv2dModel, "conv", (2, 3, 8, 8)), (Conv1dModel, "conv", (2, 4, 16))]


@pytest.mark.parametrize("method", [0, 1], ids=["loha", "lokr"])
@pytest.mark.parametrize(("model_cls", "target", "shape"), _MODELS, ids=["linear", "conv2d", "conv1d"])
def test_lycoris_model_moves_between_dtypes(method: int, model_cls, target: str, shape: tuple[int, ...]) -> None:
    """``.to(dtype)``, ``.half()``, ``.double()`` and ``.float()`` convert every adapter tensor (``nn.Module._apply``
    is not shadowed), and the float64 -> float32 round trip gives the float32 output back."""
    torch.manual_seed(0)
    model = get_peft_model(model_cls(), _lycoris_configs(peftkit, target)[method]).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = model(x)
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    model.half()
    assert all(p.dtype == torch.float16 for p in model.parameters())
    model.double()
    model.float()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        # float16 rounding of the weights (rel. 2**-11 each) over a reduction of <= 20 terms of O(1) magnitude
        torch.testing.assert_close(model(x), expected, atol=5e-2, rtol=1e-2)
    model.to("cpu", dtype=torch.float64)
    with torch.no_grad():
        assert model(x.double()).dtype == torch.float64


@pytest.mark.parametrize("method", [0, 1], ids=["loha", "lokr"])
@pytest.mark.parametrize(("model_cls", "target", "shape"), _MODELS, ids=["linear", "conv2d", "conv1d"])
def test_lycoris_layer_in_out_features_match_the_reference(method: int, model_cls, target: str,
                                                           shape: tuple[int, ...]) -> None:
    ours = get_peft_model(model_cls(), _lycoris_configs(peftkit, target)[method])
    theirs = peft.get_peft_model(model_cls(), _lycoris_configs(peft, target)[method])
    ours_layer = ours.base_model.model.get_submodule(target)
    theirs_layer = theirs.base_model.model.get_submodule(target)
    assert (ours_layer.in_features, ours_layer.out_features) == (theirs_layer.in_features,
                                                                 theirs_layer.out_features)


# ------------------------------------------------------------------------------------------------ 2. disable_adapter


def _lora_pair() -> tuple:
    """The same MLP with the same non-identity LoRA adapter in both libraries."""
    torch.manual_seed(0)
    base = MLP()
    ours = get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(target_modules=["lin0", "lin1"],
                                                                  init_lora_weights=False))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["lin0", "lin1"],
                                                                      init_lora_weights=False))
    return ours, theirs


def _layer_flags(model) -> list[bool]:
    """``disable_adapters`` of each adapter layer, in module order."""
    return [m.disable_adapters for _, m in model.named_modules()
            if hasattr(m, "disable_adapters") and hasattr(m, "base_layer")]


@pytest.mark.parametrize("before", ["enabled", "disabled", "irregular"])
def test_disable_adapter_context_restores_the_state_as_the_reference(before: str) -> None:
    """On exit, layers disabled before stay disabled; enabled ones are enabled; a mixed state warns (inside the
    context the model is the base model) and ends all enabled -- the same flags as the reference."""
    ours, theirs = _lora_pair()
    x = torch.randn(3, 10)
    inner = ours.get_base_model()
    with torch.no_grad():
        base_out = inner.lin1.base_layer(inner.relu(inner.lin0.base_layer(x)))
    for model in (ours, theirs):
        if before == "disabled":
            model.base_model.disable_adapter_layers()
        elif before == "irregular":
            model.base_model.model.lin0.enable_adapters(False)
    flags = {}
    for label, model in (("ours", ours), ("theirs", theirs)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with model.disable_adapter(), torch.no_grad():
                assert all(_layer_flags(model))
                if label == "ours":  # the same modules run on the same data
                    torch.testing.assert_close(model(x), base_out, atol=0, rtol=0)
        mixed = [w for w in caught if "enabled and others that are disabled" in str(w.message)]
        assert len(mixed) == (before == "irregular"), (label, [str(w.message) for w in caught])
        flags[label] = _layer_flags(model)
    assert flags["ours"] == flags["theirs"]
    assert flags["ours"] == ([True, True] if before == "disabled" else [False, False])


def test_disable_adapter_context_keeps_a_disabled_prompt_adapter_disabled() -> None:
    from models import tiny_llama

    model = get_peft_model(tiny_llama(), peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    ids = torch.randint(3, 50, (1, 5))
    with torch.no_grad():
        base = model.get_base_model()(input_ids=ids).logits
        model.base_model.disable_adapter_layers()
        with model.disable_adapter():
            pass
        # the same code runs on the same data: the base model's output exactly
        torch.testing.assert_close(model(input_ids=ids).logits, base, atol=0, rtol=0)
        model.base_model.enable_adapter_layers()
        assert model(input_ids=ids).logits.shape[1] == 5 + 2  # the virtual tokens are back


# ------------------------------------------------------------------------------------------------ 3. inference_mode


@pytest.mark.parametrize("inference_mode", [False, True])
def test_config_save_writes_its_inference_mode_as_the_reference(tmp_path, inference_mode: bool) -> None:
    """``PeftConfig.save_pretrained`` writes the config's own ``inference_mode`` (the reference: ``to_dict()``)."""
    import json

    peftkit.LoraConfig(r=2, target_modules=["lin0"], inference_mode=inference_mode).save_pretrained(tmp_path / "ours")
    peft.LoraConfig(r=2, target_modules=["lin0"], inference_mode=inference_mode).save_pretrained(tmp_path / "theirs")
    for side in ("ours", "theirs"):
        assert json.loads((tmp_path / side / "adapter_config.json").read_text())["inference_mode"] is inference_mode


def test_model_save_writes_inference_mode_true_as_the_reference(tmp_path) -> None:
    """``PeftModel.save_pretrained`` writes ``inference_mode: true`` (the reference sets it for the save only) and
    leaves the live config trainable."""
    import json

    ours, theirs = _lora_pair()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    for side in ("ours", "theirs"):
        assert json.loads((tmp_path / side / "adapter_config.json").read_text())["inference_mode"] is True
    assert ours.peft_config["default"].inference_mode is False


def test_config_loaded_with_from_pretrained_trains(tmp_path) -> None:
    """A training config saved and loaded back gives an adapter with trainable parameters (as the reference)."""
    peftkit.LoraConfig(r=2, target_modules=["lin0"]).save_pretrained(tmp_path)
    config = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert config.inference_mode is False
    model = get_peft_model(MLP(), config)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 2 * (10 + 20)  # A: (2, 10), B: (20, 2)


# ------------------------------------------------------------------------------------------------ 4. public API


def _static(owner: type, name: str):
    attr = inspect.getattr_static(owner, name)
    return attr.__func__ if isinstance(attr, (classmethod, staticmethod)) else attr


def _params(func) -> list[tuple[str, object, object]]:
    """``(name, kind, default)`` of each parameter (annotations differ in spelling between the libraries)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(func).parameters.values()]


_METHODS = [
    ("PeftModel", "get_prompt_embedding_to_save"), ("PeftModel", "get_prompt"), ("PeftModel", "set_requires_grad"),
    ("PeftModel", "prepare_model_for_gradient_checkpointing"), ("PeftModel", "from_pretrained"),
    ("PeftModel", "load_adapter"), ("PeftModel", "save_pretrained"), ("PeftModel", "push_to_hub"),
    ("PeftConfig", "check_kwargs"), ("PeftConfig", "push_to_hub"), ("PeftConfig", "save_pretrained"),
    ("PeftConfig", "from_pretrained"),
]
_PROPERTIES = ["active_peft_config", "has_active_enabled_adapter", "modules_to_save", "base_model_torch_dtype"]


@pytest.mark.parametrize(("owner", "name"), _METHODS, ids=[f"{o}.{n}" for o, n in _METHODS])
def test_public_method_has_the_reference_signature(owner: str, name: str) -> None:
    """Every parameter of the reference's method, in order, with its kind and default; peftkit may only add a
    trailing ``**kwargs`` (``push_to_hub`` passes it on to ``save_pretrained``)."""
    ours, theirs = _params(_static(getattr(peftkit, owner), name)), _params(_static(getattr(peft, owner), name))
    assert isinstance(inspect.getattr_static(getattr(peftkit, owner), name), classmethod) == isinstance(
        inspect.getattr_static(getattr(peft, owner), name), classmethod)
    extra = ours[len(theirs):]
    assert ours[:len(theirs)] == theirs
    assert all(kind is inspect.Parameter.VAR_KEYWORD for _, kind, _ in extra), extra


@pytest.mark.parametrize("name", _PROPERTIES)
def test_public_property_exists_as_in_the_reference(name: str) -> None:
    assert isinstance(inspect.getattr_static(peft.PeftModel, name), property)
    assert isinstance(inspect.getattr_static(peftkit.PeftModel, name), property)


def test_properties_match_the_reference_on_a_classifier() -> None:
    from models import tiny_bert

    configs = [pkg.LoraConfig(task_type="SEQ_CLS", target_modules=["query"], modules_to_save=["pooler"])
               for pkg in (peftkit, peft)]
    ours = get_peft_model(tiny_bert(), configs[0])
    theirs = peft.get_peft_model(tiny_bert(), configs[1])
    assert ours.modules_to_save == theirs.modules_to_save
    assert ours.base_model_torch_dtype == theirs.base_model_torch_dtype == torch.float32
    assert ours.active_peft_config is ours.peft_config["default"]
    assert ours.has_active_enabled_adapter and theirs.has_active_enabled_adapter
    with ours.disable_adapter(), theirs.disable_adapter():
        assert ours.has_active_enabled_adapter is theirs.has_active_enabled_adapter is False
    plain = get_peft_model(MLP(), peftkit.LoraConfig(target_modules=["lin0"]))
    assert plain.modules_to_save is None and plain.base_model_torch_dtype is None


def test_set_requires_grad_as_the_reference() -> None:
    """Named adapters' tensors (active or not) get the flag; others are untouched; prompt methods raise TypeError."""
    results = {}
    for label, pkg in (("ours", peftkit), ("theirs", peft)):
        model = pkg.get_peft_model(MLP(), pkg.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
        model.add_adapter("other", pkg.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
        model.set_requires_grad("other", True)
        model.set_requires_grad(["default"], False)
        results[label] = sorted(n.replace("base_model.model.", "") for n, p in model.named_parameters()
                                if p.requires_grad)
    assert results["ours"] == results["theirs"]
    assert results["ours"] and all(".other." in n or n.endswith(".other") for n in results["ours"])
    from models import tiny_llama

    prompt = get_peft_model(tiny_llama(), peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(TypeError, match="PROMPT_TUNING"):
        prompt.set_requires_grad("default")


def test_set_requires_grad_persists_through_set_adapter() -> None:
    model = get_peft_model(MLP(), peftkit.LoraConfig(target_modules=["lin0"]))
    model.set_requires_grad("default", False)
    model.set_adapter("default")
    assert model.get_nb_trainable_parameters()[0] == 0
    with pytest.raises(ValueError, match="nope"):
        model.set_requires_grad("nope")


def test_prepare_model_for_gradient_checkpointing_as_the_reference() -> None:
    from models import tiny_llama

    model = get_peft_model(tiny_llama(), peftkit.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    inner = model.get_base_model()
    assert model.prepare_model_for_gradient_checkpointing(inner) is inner
    out = inner.get_input_embeddings()(torch.tensor([[3, 4]]))
    assert out.requires_grad  # the embeddings output requires grad, so re-entrant checkpointing trains adapters


_PROMPT_CONFIGS = {
    "prompt": lambda pkg: pkg.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "ptuning": lambda pkg: pkg.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                   encoder_hidden_size=8),
    "prefix": lambda pkg: pkg.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prefix-proj": lambda pkg: pkg.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                      prefix_projection=True, encoder_hidden_size=8),
}


@pytest.mark.parametrize("kind", list(_PROMPT_CONFIGS))
def test_prompt_embedding_to_save_and_get_prompt_as_the_reference(kind: str) -> None:
    """``get_prompt_embedding_to_save`` is what the saved file holds, with the reference's shape (detached, on
    CPU); ``get_prompt(B)`` has the reference's shape (a tensor for prompt tuning / P-tuning, a cache of per-layer
    key/value tensors for prefix tuning)."""
    from models import tiny_llama

    ours = get_peft_model(tiny_llama(), _PROMPT_CONFIGS[kind](peftkit))
    theirs = peft.get_peft_model(tiny_llama(), _PROMPT_CONFIGS[kind](peft))
    saved = ours.get_prompt_embedding_to_save("default")
    assert not saved.requires_grad and saved.device.type == "cpu"
    assert saved.shape == theirs.get_prompt_embedding_to_save("default").shape
    # the same tensors (read, not recomputed, for prompt tuning; the same head on the same input otherwise)
    torch.testing.assert_close(saved, peftkit.get_peft_model_state_dict(ours)["prompt_embeddings"], atol=0, rtol=0)
    prompt_ours, prompt_theirs = ours.get_prompt(batch_size=2), theirs.get_prompt(batch_size=2)
    if kind.startswith("prefix"):
        layers_ours = [(layer.keys, layer.values) for layer in prompt_ours.layers]
        layers_theirs = [(layer.keys, layer.values) for layer in prompt_theirs.layers]
        assert [(k.shape, v.shape) for k, v in layers_ours] == [(k.shape, v.shape) for k, v in layers_theirs]
    else:
        assert prompt_ours.shape == prompt_theirs.shape == (2, 3, saved.shape[-1])
        torch.testing.assert_close(prompt_ours[1], saved, atol=0, rtol=0)
    lora = get_peft_model(MLP(), peftkit.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(AttributeError, match="prompt"):  # the reference's builtin
        lora.get_prompt(1)
    with pytest.raises(TypeError, match="prompt"):
        lora.get_prompt_embedding_to_save("default")


def test_config_check_kwargs_is_called_by_from_pretrained(tmp_path, monkeypatch) -> None:
    """As the reference, ``from_pretrained`` passes the loaded fields through ``check_kwargs`` (a subclass hook)."""
    peftkit.LoraConfig(r=2, target_modules=["lin0"]).save_pretrained(tmp_path)
    seen = {}

    def check(cls, **kwargs):
        seen.update(kwargs)
        return {**kwargs, "r": 3}

    assert peftkit.PeftConfig.check_kwargs(a=1) == {"a": 1}
    monkeypatch.setattr(peftkit.LoraConfig, "check_kwargs", classmethod(check))
    assert peftkit.LoraConfig.from_pretrained(tmp_path).r == 3
    assert seen["r"] == 2 and seen["peft_type"] == "LORA"


def _fake_hub(monkeypatch) -> dict:
    from pathlib import Path

    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    record: dict = {"files": {}}

    def create_repo(repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(*, folder_path, **kwargs):
        record["kwargs"] = kwargs
        root = Path(folder_path)
        record["files"] = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        return "commit-info"

    def hf_hub_download(repo_id, filename, **kwargs):
        raise EntryNotFoundError(filename)

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return record


def test_config_push_to_hub_uploads_the_config(monkeypatch) -> None:
    import json

    record = _fake_hub(monkeypatch)
    config = peftkit.LoraConfig(r=2, target_modules=["lin0"])
    assert config.push_to_hub("me/cfg", commit_message="c", tags=["t"]) == "commit-info"
    assert json.loads(record["files"]["adapter_config.json"]) == json.loads(config.to_json_string())
    assert record["kwargs"]["commit_message"] == "c"


def test_model_push_to_hub_accepts_max_shard_size(monkeypatch) -> None:
    record = _fake_hub(monkeypatch)
    model = get_peft_model(MLP(), peftkit.LoraConfig(target_modules=["lin0"]))
    model.push_to_hub("me/m", max_shard_size="5MB")
    assert "adapter_model.safetensors" in record["files"]


def test_from_pretrained_ignore_mismatched_sizes_as_the_reference(tmp_path) -> None:
    """Mismatched tensors are skipped with a warning and reported missing (the reference's ``load_adapter``); other
    tensors load. Without the flag the load raises (a RuntimeError in both libraries)."""
    torch.manual_seed(0)
    base = MLP()
    saved = get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(target_modules=["lin0", "lin1"], r=2,
                                                                   init_lora_weights=False))
    saved.save_pretrained(tmp_path)
    results = {}
    for label, pkg in (("ours", peftkit), ("theirs", peft)):
        config = pkg.LoraConfig(target_modules=["lin0", "lin1"], r=2, rank_pattern={"lin1": 4})
        with pytest.raises(RuntimeError, match="lin1"):
            pkg.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, config=config)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = pkg.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, config=config,
                                                  ignore_mismatched_sizes=True)
        messages = " ".join(str(w.message) for w in caught)
        assert "lin1.lora_A" in messages and "missing" in messages.lower(), messages
        results[label] = model.base_model.model.lin0.lora_A["default"].weight
    # lin0 loaded the saved tensors in both: the same values, copied
    torch.testing.assert_close(results["ours"], results["theirs"], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ 5. AutoPeftModel


def _saved_llama_adapter(tmp_path, task_type: str | None):
    from models import tiny_llama
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, peftkit.LoraConfig(task_type=task_type, target_modules=["q_proj"],
                                                    init_lora_weights=False)).eval()
    model.save_pretrained(tmp_path / "adapter")
    return model


def test_auto_peft_model_dispatches_a_task_adapter_where_the_reference_raises(tmp_path) -> None:
    """A documented difference: ``AutoPeftModel`` on a CAUSAL_LM adapter returns ``PeftModelForCausalLM`` (the
    reference raises ValueError asking for ``AutoPeftModelForCausalLM``)."""
    from models import causal_lm_inputs

    model = _saved_llama_adapter(tmp_path, "CAUSAL_LM")
    with pytest.raises(ValueError, match="Cannot use `AutoPeftModel` with a task type"):
        peft.AutoPeftModel.from_pretrained(tmp_path / "adapter")
    loaded = peftkit.AutoPeftModel.from_pretrained(tmp_path / "adapter")
    assert type(loaded) is peftkit.PeftModelForCausalLM
    assert type(loaded.get_base_model()).__name__ == "LlamaForCausalLM"
    inputs = causal_lm_inputs(2)
    with torch.no_grad():  # two model instances (buffers at other addresses, the first call builds the plan)
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits,
                                   **fp_tol(torch.float32, TINY_MODEL_REDUCTION))


def test_auto_peft_model_for_causal_lm_loads_an_adapter_without_task_type_as_the_reference(tmp_path) -> None:
    """No ``task_type``: the base class comes from ``auto_mapping`` and the task class wraps it, in both libraries."""
    _saved_llama_adapter(tmp_path, None)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    ours = peftkit.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert type(ours).__name__ == type(theirs).__name__ == "PeftModelForCausalLM"
    assert type(ours.get_base_model()) is type(theirs.get_base_model())


# ------------------------------------------------------------------------------------------------ 6. spellings


def _targeted(model) -> list[str]:
    return sorted(n.replace("base_model.model.", "") for n, m in model.named_modules()
                  if hasattr(m, "base_layer") and hasattr(m, "lora_A"))


@pytest.mark.parametrize("spelling", ["OLoRA", "OLORA", "olora"])
def test_olora_spellings_as_the_reference(spelling: str) -> None:
    """The reference compares ``init_lora_weights.lower() == "olora"``: every case initialises OLoRA, giving the
    reference's factors (QR of the same base weight, float32: a few ulp times the reduction length 20)."""
    torch.manual_seed(0)
    base = MLP()
    ours = get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(target_modules=["lin0"], r=2,
                                                                  init_lora_weights=spelling))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["lin0"], r=2,
                                                                      init_lora_weights=spelling))
    for attr in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(ours.base_model.model.lin0, attr)["default"].weight,
                                   getattr(theirs.base_model.model.lin0, attr)["default"].weight,
                                   atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.base_model.model.lin0.base_layer.weight,
                               theirs.base_model.model.lin0.base_layer.weight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spelling", ["Gaussian", "GAUSSIAN"])
def test_gaussian_spellings_as_the_reference(spelling: str) -> None:
    """The reference compares ``init_lora_weights.lower() == "gaussian"``: any case is the Gaussian init (the
    same tensors as ``"gaussian"`` from the same seed)."""
    models = []
    for value in (spelling, "gaussian"):
        torch.manual_seed(0)
        models.append(get_peft_model(MLP(), peftkit.LoraConfig(target_modules=["lin0"], r=2,
                                                               init_lora_weights=value)))
    torch.testing.assert_close(models[0].base_model.model.lin0.lora_A["default"].weight,
                               models[1].base_model.model.lin0.lora_A["default"].weight, atol=0, rtol=0)
    peft.get_peft_model(MLP(), peft.LoraConfig(target_modules=["lin0"], r=2, init_lora_weights=spelling))


def test_pissa_is_case_sensitive_as_in_the_reference() -> None:
    """The reference tests ``startswith("pissa")``: ``"PiSSA"`` fails (at injection there, at the config here)."""
    with pytest.raises(ValueError):
        peft.get_peft_model(MLP(), peft.LoraConfig(target_modules=["lin0"], init_lora_weights="PiSSA"))
    with pytest.raises(ValueError, match="init_lora_weights"):
        peftkit.LoraConfig(target_modules=["lin0"], init_lora_weights="PiSSA")


def test_reference_written_olora_config_loads(tmp_path) -> None:
    peft.LoraConfig(target_modules=["lin0"], init_lora_weights="OLoRA").save_pretrained(tmp_path)
    config = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert config.init_lora_weights == "OLoRA"


@pytest.mark.parametrize("pkg_name", ["LoraConfig", "LoHaConfig", "LoKrConfig"])
@pytest.mark.parametrize("layers_to_transform", [None, [0]])
def test_empty_layers_pattern_as_the_reference(pkg_name: str, layers_to_transform) -> None:
    """``layers_pattern=[]`` means "no pattern" (the reference tests its truthiness): accepted with or without
    ``layers_to_transform``, and the same layers are adapted."""
    from models import tiny_llama

    kwargs = {"target_modules": ["q_proj"], "layers_pattern": [], "layers_to_transform": layers_to_transform}
    ours = get_peft_model(tiny_llama(), getattr(peftkit, pkg_name)(**kwargs))
    theirs = peft.get_peft_model(tiny_llama(), getattr(peft, pkg_name)(**kwargs))
    names = {label: sorted(n.replace("base_model.model.", "") for n, m in model.named_modules()
                           if hasattr(m, "base_layer"))
             for label, model in (("ours", ours), ("theirs", theirs))}
    assert names["ours"] == names["theirs"]
    assert len(names["ours"]) == (1 if layers_to_transform else 2)
