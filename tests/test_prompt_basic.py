"""Behaviour of the prompt-learning methods (prompt tuning, P-tuning, prefix tuning) on their own.

Shapes (REFERENCE.md §4 property 15), config resolution without mutation, routing of masks / labels / positions,
trainability and training, gradient checkpointing with prefix tuning, generate and ``inputs_embeds``, save / load,
initialisations, and adapter management.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from models import tiny_bert, tiny_gpt2, tiny_llama, tiny_t5, tiny_tokenizer
from safetensors.torch import load_file
from saved_files import drop_saved_config
from torch import nn

import peftkit
from peftkit import (
    AdapterLoadError,
    ConfigError,
    MergeError,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from peftkit.methods.prompt import resolve_prompt_config
from peftkit.methods.prompt.cache import ReplayablePrefixCache
from peftkit.registry import all_methods

NVT = 3
B, S = 2, 6
PROMPT_KINDS: dict[str, Callable[..., Any]] = {
    "prompt": lambda **kw: PromptTuningConfig(num_virtual_tokens=NVT, **kw),
    "ptuning-mlp": lambda **kw: PromptEncoderConfig(num_virtual_tokens=NVT, encoder_hidden_size=16, **kw),
    "ptuning-lstm": lambda **kw: PromptEncoderConfig(num_virtual_tokens=NVT, encoder_hidden_size=8,
                                                     encoder_reparameterization_type="LSTM", **kw),
    "prefix": lambda **kw: PrefixTuningConfig(num_virtual_tokens=NVT, **kw),
    "prefix-proj": lambda **kw: PrefixTuningConfig(num_virtual_tokens=NVT, prefix_projection=True,
                                                   encoder_hidden_size=16, **kw),
}
EMBEDDING_KINDS = ["prompt", "ptuning-mlp", "ptuning-lstm"]
PREFIX_KINDS = ["prefix", "prefix-proj"]


def _ids(rows: int = B, length: int = S, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 120, (rows, length), generator=torch.Generator().manual_seed(seed))


def _mask(rows: int = B, length: int = S) -> torch.Tensor:
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1, -2:] = 0
    return mask


def _randomize(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.base_model.prompt_encoder.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def _capture(model: nn.Module) -> dict[str, Any]:
    """Records the keyword arguments of the next calls of ``model.forward`` (last call wins)."""
    seen: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.clear()
        seen.update(kwargs)
        cache = kwargs.get("past_key_values")
        if cache is not None:  # the model appends to the cache during the call: record the prefix now
            inner = getattr(cache, "self_attention_cache", cache)
            seen["prefix_shapes"] = [tuple(layer.keys.shape) for layer in inner.layers]

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


# ---------------------------------------------------------------------------------------------- config


def test_resolve_fills_from_the_model_config_without_mutating() -> None:
    llama, gpt2, t5 = tiny_llama().config, tiny_gpt2().config, tiny_t5().config
    user = PromptTuningConfig(num_virtual_tokens=4)
    before = copy.deepcopy(user)
    assert resolve_prompt_config(user, llama, "CAUSAL_LM") == {
        "num_layers": 2, "token_dim": 32, "num_attention_heads": 4, "num_transformer_submodules": 1}
    assert resolve_prompt_config(user, gpt2, "CAUSAL_LM")["token_dim"] == 32
    assert resolve_prompt_config(user, t5, "SEQ_2_SEQ_LM")["num_transformer_submodules"] == 2
    assert user == before
    # prefix tuning on a GQA model (4 heads, 2 kv heads, head_dim 8) is sized for the key/value heads
    prefix = resolve_prompt_config(PrefixTuningConfig(num_virtual_tokens=4), llama, "CAUSAL_LM", kv_prefix=True)
    assert (prefix["token_dim"], prefix["num_attention_heads"], prefix["encoder_hidden_size"]) == (16, 2, 16)
    # given values win (except the GQA override), P-tuning's encoder_hidden_size follows token_dim
    given = PromptEncoderConfig(num_virtual_tokens=2, token_dim=8, num_layers=5)
    assert resolve_prompt_config(given, llama, "CAUSAL_LM") == {
        "num_attention_heads": 4, "num_transformer_submodules": 1, "encoder_hidden_size": 8}
    with pytest.raises(ConfigError, match="token_dim"):
        resolve_prompt_config(PromptTuningConfig(num_virtual_tokens=2), {"num_layers": 2}, None)
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        resolve_prompt_config(PromptTuningConfig(), llama, None)


def test_get_peft_model_keeps_the_user_config_and_stores_the_resolved_copy() -> None:
    user = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NVT)
    before = copy.deepcopy(user)
    model = get_peft_model(tiny_llama(), user)
    assert user == before
    stored = model.peft_config["default"]
    assert (stored.token_dim, stored.num_attention_heads, stored.num_layers) == (16, 2, 2)
    assert stored.num_transformer_submodules == 1 and stored.encoder_hidden_size == 16


@pytest.mark.parametrize(("cls", "kwargs", "field"), [
    (PromptTuningConfig, {"num_virtual_tokens": 0}, "num_virtual_tokens"),
    (PromptTuningConfig, {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi"}, "tokenizer_name_or_path"),
    (PromptTuningConfig, {"prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "x"}, "prompt_tuning_init_text"),
    (PromptTuningConfig, {"tokenizer_kwargs": {"a": 1}}, "tokenizer_kwargs"),
    (PromptTuningConfig, {"prompt_tuning_init": "ZEROS"}, "prompt_tuning_init"),
    (PromptEncoderConfig, {"encoder_reparameterization_type": "GRU"}, "encoder_reparameterization_type"),
    (PromptEncoderConfig, {"encoder_dropout": 1.5}, "encoder_dropout"),
    (PrefixTuningConfig, {"init_weights": "ones"}, "init_weights"),
    (PrefixTuningConfig, {"num_transformer_submodules": 3}, "num_transformer_submodules"),
])
def test_invalid_configs_raise_naming_the_field(cls: type, kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        cls(**kwargs)


def test_registry_describes_the_prompt_methods() -> None:
    prompt = {str(m.peft_type): m for m in all_methods() if m.kind == "prompt"}
    assert set(prompt) == {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"}
    assert prompt["PREFIX_TUNING"].prompt_routing == "prefix"
    assert {prompt["PROMPT_TUNING"].prompt_routing, prompt["P_TUNING"].prompt_routing} == {"embeddings"}
    assert not any(m.mergeable or m.identity_at_init for m in prompt.values())


# ---------------------------------------------------------------------------------------------- shapes and routing


@pytest.mark.parametrize("kind", EMBEDDING_KINDS)
def test_causal_virtual_tokens_extend_logits_mask_and_labels(kind: str) -> None:
    model = get_peft_model(tiny_llama(), PROMPT_KINDS[kind](task_type="CAUSAL_LM"))
    seen = _capture(model.get_base_model())
    ids, mask = _ids(), _mask()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.logits.shape == (B, NVT + S, 128)
    assert torch.equal(seen["attention_mask"], torch.cat([torch.ones(B, NVT, dtype=torch.long), mask], 1))
    assert torch.equal(seen["labels"][:, :NVT], torch.full((B, NVT), -100)) and torch.equal(seen["labels"][:, NVT:], ids)
    assert seen["inputs_embeds"].shape == (B, NVT + S, 32) and seen.get("input_ids") is None
    assert torch.isfinite(out.loss)
    with pytest.warns(peftkit.PeftWarning, match="Position ids"):
        model(input_ids=ids, position_ids=torch.arange(S).expand(B, S))
    assert "position_ids" not in seen


@pytest.mark.parametrize("kind", PREFIX_KINDS)
def test_prefix_keeps_the_length_and_fills_the_cache_per_kv_head(kind: str) -> None:
    model = get_peft_model(tiny_llama(), PROMPT_KINDS[kind](task_type="CAUSAL_LM"))
    seen = _capture(model.get_base_model())
    ids, mask = _ids(), _mask()
    out = model(input_ids=ids, attention_mask=mask, labels=ids, position_ids=torch.arange(S).expand(B, S))
    assert out.logits.shape == (B, S, 128)
    assert seen["prefix_shapes"] == [(B, 2, NVT, 8)] * 2  # num_layers x (B, kv_heads, nvt, head_dim)
    assert seen["attention_mask"].shape == (B, NVT + S) and seen["attention_mask"][:, :NVT].eq(1).all()
    assert torch.equal(seen["position_ids"], torch.arange(NVT, NVT + S).expand(B, S))
    assert torch.equal(seen["labels"], ids)


def test_seq2seq_prefixes_only_the_encoder_input() -> None:
    model = get_peft_model(tiny_t5(), PROMPT_KINDS["prompt"](task_type="SEQ_2_SEQ_LM"))
    assert model.base_model.prompt_encoder["default"].embedding.weight.shape == (2 * NVT, 32)
    seen = _capture(model.get_base_model())
    labels = _ids(length=4, seed=2)
    out = model(input_ids=_ids(), attention_mask=_mask(), labels=labels)
    assert out.logits.shape == (B, 4, 128)
    assert seen["inputs_embeds"].shape == (B, NVT + S, 32) and seen["attention_mask"].shape == (B, NVT + S)
    assert torch.equal(seen["labels"], labels)


def test_seq2seq_prefix_extends_the_decoder_mask() -> None:
    model = get_peft_model(tiny_t5(), PROMPT_KINDS["prefix"](task_type="SEQ_2_SEQ_LM"))
    seen = _capture(model.get_base_model())
    dec = _ids(length=4, seed=2)
    model(input_ids=_ids(), attention_mask=_mask(), decoder_input_ids=dec, decoder_attention_mask=torch.ones(B, 4))
    assert seen["attention_mask"].shape == (B, S)
    assert seen["decoder_attention_mask"].shape == (B, NVT + 4)
    assert seen["prefix_shapes"] == [(B, 4, NVT, 8)] * 2


def test_classification_tasks_keep_labels_and_prefix_token_types() -> None:
    model = get_peft_model(tiny_bert("SEQ_CLS"), PROMPT_KINDS["prompt"](task_type="SEQ_CLS"))
    seen = _capture(model.get_base_model())
    types = torch.ones(B, S, dtype=torch.long)
    out = model(input_ids=_ids(), attention_mask=_mask(), token_type_ids=types, labels=torch.tensor([0, 1]))
    assert out.logits.shape == (B, 2) and torch.isfinite(out.loss)
    assert torch.equal(seen["token_type_ids"], torch.cat([torch.zeros(B, NVT, dtype=torch.long), types], 1))
    assert torch.equal(seen["labels"], torch.tensor([0, 1]))
    assert model.peft_config["default"].modules_to_save == ["classifier", "score"]
    assert any(n.endswith("classifier.modules_to_save.default.weight") and p.requires_grad
               for n, p in model.named_parameters())


def test_token_classification_pads_labels_for_the_virtual_tokens() -> None:
    """The logits are nvt + S long; peftkit pads the labels with -100 (the reference does not, and fails)."""
    model = get_peft_model(tiny_bert("TOKEN_CLS"), PROMPT_KINDS["prompt"](task_type="TOKEN_CLS"))
    labels = torch.randint(0, 3, (B, S), generator=torch.Generator().manual_seed(3))
    out = model(input_ids=_ids(), attention_mask=_mask(), labels=labels)
    assert out.logits.shape == (B, NVT + S, 3) and torch.isfinite(out.loss)
    expected = nn.functional.cross_entropy(out.logits[:, NVT:].reshape(-1, 3), labels.reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_question_answering_shifts_the_answer_positions() -> None:
    """The span logits are nvt + S long, so the answer positions move by nvt (the reference leaves them)."""
    model = get_peft_model(tiny_bert("QUESTION_ANS"), PROMPT_KINDS["prompt"](task_type="QUESTION_ANS"))
    seen = _capture(model.get_base_model())
    start, end = torch.tensor([0, 2]), torch.tensor([1, 4])
    out = model(_ids(), _mask(), start_positions=start, end_positions=end)  # positional input_ids, attention_mask
    assert out.start_logits.shape == (B, NVT + S) and torch.isfinite(out.loss)
    assert torch.equal(seen["start_positions"], start + NVT) and torch.equal(seen["end_positions"], end + NVT)
    assert seen["attention_mask"].shape == (B, NVT + S)


# ---------------------------------------------------------------------------------------------- trainability, training


def test_trainable_parameters_are_the_encoder_only() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=4))
    model = get_peft_model(base, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                                     encoder_hidden_size=32))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("base_model.prompt_encoder.default.") for n in trainable)
    assert model.get_nb_trainable_parameters()[0] == 5568  # observed in the reference for this shape


@pytest.mark.parametrize("kind", list(PROMPT_KINDS))
def test_training_lowers_the_loss_and_changes_only_the_prompt(kind: str) -> None:
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), PROMPT_KINDS[kind](task_type="CAUSAL_LM"))
    base_before = {n: p.clone() for n, p in model.get_base_model().named_parameters()}
    prompt_before = {n: p.clone() for n, p in model.base_model.prompt_encoder.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.3)
    ids = _ids(seed=4)
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, base_before[n]) for n, p in model.get_base_model().named_parameters())
    assert all(p.grad is None for p in model.get_base_model().parameters())
    assert all(not torch.equal(p, prompt_before[n]) for n, p in model.base_model.prompt_encoder.named_parameters())


def _prefix_grads(build: Callable[[], nn.Module], task: str, checkpointing: bool | None, proj: bool = False) -> Any:
    torch.manual_seed(0)
    model = get_peft_model(build(), PROMPT_KINDS["prefix-proj" if proj else "prefix"](task_type=task))
    base = model.get_base_model()
    if checkpointing is not None:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    model.train()
    for module in base.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    caches: list[Any] = []
    original = model.base_model.prefix_cache
    model.base_model.prefix_cache = lambda *a, **k: caches.append(original(*a, **k)) or caches[-1]
    ids = _ids(seed=5)
    labels = ids if task == "CAUSAL_LM" else _ids(length=4, seed=6)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.base_model.prompt_encoder.parameters()])
    return loss.detach(), grads, caches[0]


@pytest.mark.parametrize(("name", "build", "task", "proj"), [
    ("llama", tiny_llama, "CAUSAL_LM", False),
    ("llama-proj", tiny_llama, "CAUSAL_LM", True),
    ("gpt2", tiny_gpt2, "CAUSAL_LM", False),
    ("t5", tiny_t5, "SEQ_2_SEQ_LM", False),
])
def test_prefix_tuning_trains_with_gradient_checkpointing(name: str, build: Any, task: str, proj: bool) -> None:
    """Unlike the reference (which raises), prefix tuning trains under checkpointing, with the same gradients; the
    layers are recomputed during backward (each layer reads the prefix twice)."""
    loss, grads, _ = _prefix_grads(build, task, None, proj)
    assert grads.abs().sum() > 0
    for reentrant in (False, True):
        loss_gc, grads_gc, cache = _prefix_grads(build, task, reentrant, proj)
        torch.testing.assert_close(loss_gc, loss, atol=1e-6, rtol=0)
        torch.testing.assert_close(grads_gc, grads, atol=1e-6, rtol=1e-5)
        inner = getattr(cache, "self_attention_cache", cache)
        assert isinstance(inner, ReplayablePrefixCache) and inner.updates == 2 * len(inner.layers)


# ---------------------------------------------------------------------------------------------- disable, generate


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_disable_adapter_gives_the_base_model(kind: str) -> None:
    base = tiny_llama().eval()
    ids, mask = _ids(), _mask()
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
        expected_gen = base.generate(input_ids=ids, attention_mask=torch.ones_like(mask), max_new_tokens=3,
                                     do_sample=False)
    model = get_peft_model(base, PROMPT_KINDS[kind](task_type="CAUSAL_LM"))
    _randomize(model)
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-6, rtol=0)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(mask), max_new_tokens=3,
                                 do_sample=False)
            assert torch.equal(gen, expected_gen)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, adapted)


@pytest.mark.parametrize("kind", list(PROMPT_KINDS))
def test_causal_generate_first_token_is_the_forward_argmax(kind: str) -> None:
    model = get_peft_model(tiny_llama(), PROMPT_KINDS[kind](task_type="CAUSAL_LM"))
    _randomize(model)
    model.eval()
    ids = _ids()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        greedy = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        beams = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, num_beams=3)
        torch.manual_seed(0)
        sampled = model.generate(input_ids=ids, max_new_tokens=4, do_sample=True, top_k=5)
        # the greedy continuation equals running the forward on the generated sequence
        full = model(input_ids=greedy).logits
    assert torch.equal(greedy[:, S], logits[:, -1].argmax(-1))
    assert torch.equal(greedy[:, S + 1:], full[:, -4:-1].argmax(-1))
    assert beams.shape == sampled.shape == (B, S + 4) and torch.equal(beams[:, :S], ids)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_generate_with_inputs_embeds(kind: str) -> None:
    model = get_peft_model(tiny_llama(), PROMPT_KINDS[kind](task_type="CAUSAL_LM"))
    _randomize(model)
    model.eval()
    ids = _ids()
    embeds = model.get_base_model().get_input_embeddings()(ids)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(input_ids=ids).logits, atol=1e-6, rtol=0)
        from_ids = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=3, do_sample=False)
    assert torch.equal(from_embeds[:, -3:], from_ids[:, -3:])


def test_seq2seq_generate_first_token_is_the_forward_argmax() -> None:
    for kind in ("prompt", "prefix"):
        model = get_peft_model(tiny_t5(), PROMPT_KINDS[kind](task_type="SEQ_2_SEQ_LM"))
        _randomize(model)
        model.eval()
        ids, mask = _ids(), torch.ones(B, S, dtype=torch.long)
        with torch.no_grad():
            start = torch.zeros(B, 1, dtype=torch.long)
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
            beams = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=2)
        assert torch.equal(out[:, 1], logits[:, -1].argmax(-1)), kind
        assert beams.shape[0] == B
        with pytest.raises(TypeError):
            model.generate(ids)  # keyword arguments only, as in the reference


# ---------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize(("kind", "shape"), [
    ("prompt", (NVT, 32)), ("ptuning-lstm", (NVT, 32)), ("prefix", (NVT, 2 * 2 * 16)), ("prefix-proj", (NVT, 64)),
])
def test_save_load_round_trip_builds_only_the_embedding(kind: str, shape: tuple[int, int], tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), PROMPT_KINDS[kind](task_type="CAUSAL_LM"))
    _randomize(model)
    model.eval()
    ids, mask = _ids(), _mask()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"prompt_embeddings": shape}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["inference_mode"] is True
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    encoder = loaded.base_model.prompt_encoder["default"]
    assert [n for n, _ in encoder.named_parameters()] == ["embedding.weight"]
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="trainable"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)


def test_computed_prompt_embeddings_cannot_be_loaded_into_a_trainable_encoder(tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), PROMPT_KINDS["ptuning-mlp"](task_type="CAUSAL_LM"))
    state = peftkit.get_peft_model_state_dict(model)
    torch.testing.assert_close(state["prompt_embeddings"], model.base_model.prompt_encoder["default"].output())
    with pytest.raises(AdapterLoadError, match="is_trainable=False"):
        peftkit.set_peft_model_state_dict(model, state)


def test_adapters_load_switch_and_delete(tmp_path: Path) -> None:
    first = get_peft_model(tiny_llama(), PROMPT_KINDS["prompt"](task_type="CAUSAL_LM"))
    _randomize(first, seed=1)
    first.save_pretrained(tmp_path)
    model = get_peft_model(tiny_llama(), PROMPT_KINDS["prompt"](task_type="CAUSAL_LM"))
    _randomize(model, seed=2)
    model.eval()
    ids = _ids()
    with torch.no_grad():
        own = model(input_ids=ids).logits
        model.load_adapter(tmp_path, "other")
        assert model.active_adapter == "default" and torch.equal(model(input_ids=ids).logits, own)
        model.set_adapter("other")
        torch.testing.assert_close(model(input_ids=ids).logits, first.eval()(input_ids=ids).logits, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError):
        model.set_adapter(["default", "other"])
    with pytest.raises(ConfigError, match="peft types"):
        model.add_adapter("lora", peftkit.LoraConfig(task_type="CAUSAL_LM"))
    with pytest.raises(MergeError):
        model.merge_and_unload()
    model.delete_adapter("other")
    assert model.active_adapter == "default" and list(model.peft_config) == ["default"]
    assert list(model.base_model.prompt_encoder) == ["default"]
    base = model.base_model.unload()
    assert type(base).__name__ == "LlamaForCausalLM" and not hasattr(base, "peft_config")


def test_failed_load_leaves_the_model_unchanged(tmp_path: Path) -> None:
    get_peft_model(tiny_llama(), PROMPT_KINDS["prefix"](task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(config_file.read_text().replace('"num_virtual_tokens": 3', '"num_virtual_tokens": 4'))
    model = get_peft_model(tiny_llama(), PROMPT_KINDS["prefix"](task_type="CAUSAL_LM"))
    with pytest.raises(peftkit.AdapterMismatchError, match="num_virtual_tokens: 4 in adapter_config.json but 3"):
        model.load_adapter(tmp_path, "broken")
    assert list(model.peft_config) == ["default"] and list(model.base_model.prompt_encoder) == ["default"]
    drop_saved_config(tmp_path)  # weights of another writer: the shape check catches it
    with pytest.raises(peftkit.ShapeMismatchError, match="prompt_embeddings"):
        model.load_adapter(tmp_path, "broken")
    assert list(model.peft_config) == ["default"] and list(model.base_model.prompt_encoder) == ["default"]
    with pytest.raises(peftkit.ShapeMismatchError):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


# ---------------------------------------------------------------------------------------------- initialisation


def test_text_init_copies_the_embeddings_of_the_tokenised_text(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer("wordlevel")
    tokenizer.save_pretrained(tmp_path)
    text = "hello world"
    token_ids = tokenizer(text)["input_ids"]
    assert len(token_ids) == 2
    for nvt in (5, 1):  # repeated (ceil) / cut to num_virtual_tokens
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=nvt, prompt_tuning_init="TEXT",
                                    prompt_tuning_init_text=text, tokenizer_name_or_path=str(tmp_path),
                                    tokenizer_kwargs={"trust_remote_code": True})
        model = get_peft_model(tiny_llama(), config)
        table = model.get_base_model().get_input_embeddings().weight
        expected = table[torch.tensor((token_ids * 3)[:nvt])]
        weight = model.base_model.prompt_encoder["default"].embedding.weight
        assert weight.dtype == torch.float32 and weight.requires_grad
        assert torch.equal(weight, expected)


def test_sample_vocab_init_draws_rows_of_the_embedding_matrix() -> None:
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8,
                                                            prompt_tuning_init="SAMPLE_VOCAB"))
    table = model.get_base_model().get_input_embeddings().weight
    weight = model.base_model.prompt_encoder["default"].embedding.weight
    matches = (weight[:, None, :] == table[None, :, :]).all(-1)  # (nvt, vocab)
    assert matches.any(1).all()
    assert not matches.all(0).any()


def test_p_tuning_mlp_warns_about_encoder_num_layers() -> None:
    with pytest.warns(peftkit.PeftWarning, match="encoder_num_layers"):
        get_peft_model(tiny_llama(), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2,
                                                         encoder_num_layers=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", peftkit.PeftWarning)
        get_peft_model(tiny_llama(), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2,
                                                         encoder_reparameterization_type="LSTM", encoder_num_layers=3))


def test_prefix_zero_init_gives_a_zero_prefix() -> None:
    for proj in (False, True):
        model = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2,
                                                                prefix_projection=proj, init_weights="zero"))
        assert model.base_model.prompt_encoder["default"].output().abs().max() == 0
