"""Adapters on an un-wrapped transformers model: ``peftkit.transformers_adapters`` against transformers' own
``model.add_adapter`` / ``load_adapter`` / ``set_adapter`` / ... driven by the reference (🤗 PEFT).

Seed 003's workflow (load an adapter, add two, switch, enable/disable, train, save) runs with the functions; the
files it writes load in peftkit's and the reference's ``PeftModel`` with identical outputs, and each operation leaves
the same outputs, active adapters and trainable parameters as transformers + the reference on the same model.
"""

from __future__ import annotations

import copy
import io
import json
import os

import pytest
import torch
from models import tiny_gpt2, tiny_llama
from numerics import TINY_MODEL_REDUCTION, fp_tol

import peftkit
from peftkit import AdapterExistsError, AdapterNotFoundError, ConfigError, ShapeMismatchError
from peftkit.transformers_adapters import (
    active_adapters,
    add_adapter,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    get_adapter_state_dict,
    load_adapter,
    save_adapter,
    set_adapter,
)

ATOL = 1e-6
# Logits of two models (another instance, library, path or merge) run other kernels on other buffers: float32
# over the tiny models' reductions (see tests/numerics.py)
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}


def _ids(seed: int = 1, batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(input_ids=ids).logits
    model.train(was)
    return out


def _trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


@pytest.fixture(scope="module")
def ref_adapter_dir(tmp_path_factory, peft):
    """A LoRA saved by the reference's ``PeftModel.save_pretrained`` on the tiny Llama (non-zero B)."""
    path = tmp_path_factory.mktemp("ref_adapter")
    torch.manual_seed(3)
    ref = peft.get_peft_model(tiny_llama(), peft.LoraConfig(task_type="CAUSAL_LM", **LORA))
    ref.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------------------- seed 003
@pytest.mark.interop
def test_seed_003_workflow(tmp_path, peft, ref_adapter_dir):
    ids = _ids()
    model = tiny_llama()
    base = _logits(model, ids)

    # 1. load an adapter saved by the reference: same outputs as the reference's PeftModel; frozen, eval mode
    load_adapter(model, ref_adapter_dir)
    ref_loaded = peft.PeftModel.from_pretrained(tiny_llama(), ref_adapter_dir)
    torch.testing.assert_close(_logits(model, ids), _logits(ref_loaded, ids), **TOL)
    assert not model.training and _trainable(model) == set()
    assert type(model).__name__ == "LlamaForCausalLM" and model._hf_peft_config_loaded
    assert active_adapters(model) == ["default"]

    # 2. add two adapters with one config (the config object is never modified); set_adapter picks one
    config = peftkit.LoraConfig(**LORA)
    before = config.to_dict()
    add_adapter(model, config, adapter_name="adapter_1")
    model.add_adapter(config, adapter_name="adapter_2")  # bound by the first call
    assert config.to_dict() == before
    assert model.active_adapters() == ["adapter_2"]
    out_2 = _logits(model, ids)
    set_adapter(model, "adapter_1")
    out_1 = _logits(model, ids)
    assert (out_1 - out_2).abs().max() > 1e-3 and (out_1 - base).abs().max() > 1e-3

    # 3. disable -> base outputs (and generate), enable -> adapter outputs again
    disable_adapters(model)
    torch.testing.assert_close(_logits(model, ids), base, **TOL)
    generated = model.generate(input_ids=ids[:1, :4], max_new_tokens=4, do_sample=False)
    plain = tiny_llama().eval().generate(input_ids=ids[:1, :4], max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, plain)
    enable_adapters(model)
    torch.testing.assert_close(_logits(model, ids), out_1, **TOL)

    # 4. train a fresh adapter with the seed's config (default targets for Llama: q_proj, v_proj)
    train_cfg = peftkit.LoraConfig(lora_alpha=16, lora_dropout=0.1, r=8, bias="none", task_type="CAUSAL_LM")
    add_adapter(model, train_cfg, adapter_name="trained")
    assert _trainable(model) and all(".lora_" in n and ".trained." in n for n in _trainable(model))
    losses = _train(model, ids, steps=4)
    assert losses[-1] < losses[0]
    trained = _logits(model, ids)

    # 5. save: the functions and transformers' own save_pretrained both write files that both libraries load
    save_adapter(model, tmp_path / "fn")
    model.save_pretrained(tmp_path / "hf")
    for sub in ("fn", "hf"):
        directory = tmp_path / sub
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(directory))
        ours = peftkit.PeftModel.from_pretrained(tiny_llama(), directory)
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), directory)
        torch.testing.assert_close(_logits(ours, ids), trained, **TOL)
        torch.testing.assert_close(_logits(theirs, ids), trained, **TOL)
    saved = json.loads((tmp_path / "fn" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 8 and sorted(saved["target_modules"]) == ["q_proj", "v_proj"]


def _train(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> list[float]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_seed_003_trainer_writes_adapter_only_checkpoints(tmp_path):
    """``add_adapter(model, cfg)`` then an unmodified ``transformers.Trainer``: the adapter trains and checkpoints hold
    only the adapter (transformers' ``save_pretrained`` runs peftkit's bound methods), loadable by ``PeftModel``."""
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    add_adapter(model, peftkit.LoraConfig(lora_alpha=16, r=8, bias="none", task_type="CAUSAL_LM"))
    before = {k: v.clone() for k, v in get_adapter_state_dict(model).items()}
    rows = _ids(seed=4, batch=8)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, save_steps=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows]).train()
    after = get_adapter_state_dict(model)
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-4
    checkpoint = tmp_path / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not any(f.startswith("model") for f in files)
    loaded = peftkit.PeftModel.from_pretrained(tiny_llama(), checkpoint)
    ids = _ids()
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), **TOL)


@pytest.mark.interop
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_reference_adapter_loads_with_load_adapter(tmp_path, peft, build):
    """Adapters the reference saves (incl. GPT-2's fan_in_fan_out Conv1D) load with the same outputs, also through
    ``peft_config`` + ``adapter_state_dict``, and trainable when asked."""
    targets = ["c_attn"] if build is tiny_gpt2 else ["q_proj", "v_proj"]
    torch.manual_seed(5)
    ref = peft.get_peft_model(build(), peft.LoraConfig(**{**LORA, "target_modules": targets}))
    ref.save_pretrained(tmp_path)
    ids = _ids()
    expected = _logits(ref, ids)

    model = build()
    load_adapter(model, tmp_path, adapter_name="x", is_trainable=True)
    torch.testing.assert_close(_logits(model, ids), expected, **TOL)
    assert model.training and _trainable(model) and all(".lora_" in n for n in _trainable(model))

    other = build()
    weights = peftkit.load_peft_weights(tmp_path)
    load_adapter(other, peft_config=json.loads((tmp_path / "adapter_config.json").read_text()),
                 adapter_state_dict=weights)
    torch.testing.assert_close(_logits(other, ids), expected, **TOL)
    state = get_adapter_state_dict(other)
    assert {f"base_model.model.{k}" for k in state} == set(weights)
    assert all(torch.equal(state[k.removeprefix("base_model.model.")], v) for k, v in weights.items())


# --------------------------------------------------------------------------------------------------------- semantics
def _copy_weights(src: torch.nn.Module, dst: torch.nn.Module, name: str) -> None:
    peftkit.set_peft_model_state_dict(dst, src.get_adapter_state_dict(name), name)


@pytest.mark.interop
def test_semantics_match_transformers_with_reference(peft):
    """The same sequence of calls on two copies of a model (transformers' methods + reference vs peftkit's functions)
    gives the same outputs, active adapters and trainable parameters after every step."""
    ids = _ids(seed=2)
    ref, ours = tiny_llama(), tiny_llama()
    base = _logits(ours, ids)
    torch.manual_seed(0)
    for name in ("a", "b"):
        ref.add_adapter(peft.LoraConfig(**LORA), adapter_name=name)
        add_adapter(ours, peftkit.LoraConfig(**LORA), adapter_name=name)
        _copy_weights(ref, ours, name)

    def check(step: str) -> None:
        assert active_adapters(ours) == ref.active_adapters(), step
        assert _trainable(ours) == _trainable(ref), step
        torch.testing.assert_close(_logits(ours, ids), _logits(ref, ids), **TOL, msg=step)

    check("after add_adapter x2")
    steps = [
        ("set a", lambda m, fn: m.set_adapter("a") if fn is None else set_adapter(m, "a")),
        ("set [a, b]", lambda m, fn: m.set_adapter(["a", "b"]) if fn is None else set_adapter(m, ["a", "b"])),
        ("disable", lambda m, fn: m.disable_adapters() if fn is None else disable_adapters(m)),
        ("enable", lambda m, fn: m.enable_adapters() if fn is None else enable_adapters(m)),
        ("delete b", lambda m, fn: m.delete_adapter("b") if fn is None else delete_adapter(m, "b")),
    ]
    for label, step in steps:
        step(ref, None)
        step(ours, True)
        check(label)
    assert (_logits(ours, ids) - base).abs().max() > 1e-3
    for model in (ref, ours):
        (model.delete_adapter if model is ref else lambda n: delete_adapter(ours, n))("a")
        assert not hasattr(model, "peft_config") and model._hf_peft_config_loaded is False
        torch.testing.assert_close(_logits(model, ids), base, **TOL)


def test_errors_leave_model_unchanged(tmp_path, ref_adapter_dir):
    model = tiny_llama()
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ConfigError, match="No adapter loaded"):
        set_adapter(model, "default")
    with pytest.raises(TypeError, match="PeftConfig"):
        add_adapter(model, {"r": 4})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="prompt-learning"):
        add_adapter(model, peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    wrong = peftkit.LoraConfig(**{**LORA, "r": 8})
    with pytest.raises(ShapeMismatchError):
        load_adapter(model, ref_adapter_dir, peft_config=wrong)
    assert [type(m) for m in model.modules()] == modules and not hasattr(model, "peft_config")

    add_adapter(model, peftkit.LoraConfig(**LORA), adapter_name="a")
    with pytest.raises(AdapterExistsError):
        add_adapter(model, peftkit.LoraConfig(**LORA), adapter_name="a")
    with pytest.raises(AdapterNotFoundError):
        set_adapter(model, ["a", "zz"])
    with pytest.raises(AdapterNotFoundError):
        delete_adapter(model, ["a", "zz"])
    assert list(model.peft_config) == ["a"]
    add_adapter(model, peftkit.LoraConfig(**LORA), adapter_name="b")
    set_adapter(model, ["a", "b"])
    with pytest.raises(ConfigError, match="several adapters"):
        save_adapter(model, tmp_path)
    assert not os.listdir(tmp_path)


def test_adopts_inject_adapter_in_model_and_survives_deepcopy_and_pickle():
    """Adapters injected with ``inject_adapter_in_model`` are managed by the functions; the bound methods of a deep
    copy (or of a ``torch.save``/``torch.load`` round trip) act on the copy."""
    ids = _ids()
    model = tiny_llama()
    base = _logits(model, ids)
    peftkit.inject_adapter_in_model(peftkit.LoraConfig(**LORA), model, adapter_name="inj")
    adapted = _logits(model, ids)
    assert active_adapters(model) == ["inj"]
    assert get_adapter_state_dict(model).keys() == peftkit.get_peft_model_state_dict(model, adapter_name="inj").keys()
    disable_adapters(model)
    torch.testing.assert_close(_logits(model, ids), base, **TOL)
    enable_adapters(model)
    add_adapter(model, peftkit.LoraConfig(**LORA), adapter_name="two")
    clone = copy.deepcopy(model)
    clone.set_adapter("inj")
    assert model.active_adapters() == ["two"] and clone.active_adapters() == ["inj"]
    torch.testing.assert_close(_logits(clone, ids), adapted, **TOL)
    buffer = io.BytesIO()
    torch.save(clone, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    restored.set_adapter("two")
    assert restored.active_adapters() == ["two"] and clone.active_adapters() == ["inj"]
    torch.testing.assert_close(_logits(restored, ids), _logits(model, ids), **TOL)


# --------------------------------------------------------------------------------------------------------- auto
@pytest.mark.interop
@pytest.mark.parametrize("saver", ["peftkit", "reference"])
def test_auto_peft_model_resizes_to_tokenizer_saved_beside_adapter(tmp_path, peft, saver):
    """A directory with an adapter, the resized embedding matrices and a tokenizer with added tokens opens as a
    ready model: ``AutoPeftModelForCausalLM`` resizes the base embeddings to ``len(tokenizer)`` (as the reference does)
    and reproduces the saver's outputs, new tokens included."""
    from models import VOCAB, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(VOCAB + 2 - len(tokenizer))])
    assert len(tokenizer) == VOCAB + 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # new rows that differ clearly from anything a fresh resize would produce
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            emb.weight[VOCAB:] = torch.randn(emb.weight[VOCAB:].shape, generator=generator)
    lib = peftkit if saver == "peftkit" else peft
    saved = lib.get_peft_model(model, lib.LoraConfig(task_type="CAUSAL_LM", **LORA))
    adapter = tmp_path / "adapter"
    saved.save_pretrained(adapter, save_embedding_layers=True)
    ids = torch.tensor([[5, VOCAB, VOCAB + 1, 7, 9]])
    expected = _logits(saved, ids)

    with pytest.raises(ShapeMismatchError):  # no tokenizer beside the adapter: nothing says to resize
        peftkit.AutoPeftModelForCausalLM.from_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    loaded = peftkit.AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert loaded.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert loaded.get_output_embeddings().weight.shape[0] == len(tokenizer)
    # logits of the new tokens reach ~2: float32 rounding of two implementations (BLAS against peftkit's decode
    # kernel) differs by a few ulp there, hence the relative term
    torch.testing.assert_close(_logits(loaded, ids), expected, **TOL)
