"""Interop of the prompt-learning methods with the reference (🤗 PEFT 0.21.2, installed as ``peft``).

For every scenario (a tiny model x a prompt-learning config) both libraries build an adapter, set its prompt
weights to random values (so that they matter), and save it. Then each library loads the other's directory into a
fresh base model and reproduces the saver's logits within 1e-5 (eval, no_grad); the files hold the same keys and
shapes (the single ``prompt_embeddings`` key) and ``adapter_config.json`` has the same fields with the same values.
The generate cases check that peftkit, loading the reference's file, generates exactly the reference's tokens
(greedy and beam search).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from models import tiny_gpt2, tiny_llama, tiny_t5
from safetensors.torch import load_file
from torch import nn

import peftkit

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.interop

ATOL = 1e-5
NVT = 3
#: warnings that must never appear when one library loads the other's file
FORBIDDEN_WARNINGS = ("Found missing adapter keys", "Unexpected keyword arguments", "belong to no adapter")
MODELS = {
    "llama": (lambda: tiny_llama("CAUSAL_LM"), "CAUSAL_LM"),
    "gpt2": (tiny_gpt2, "CAUSAL_LM"),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM"),
    "llama-seqcls": (lambda: tiny_llama("SEQ_CLS"), "SEQ_CLS"),
}
METHODS = {
    "prompt": ("PromptTuningConfig", {}),
    "ptuning-mlp": ("PromptEncoderConfig", {"encoder_hidden_size": 16}),
    "ptuning-lstm": ("PromptEncoderConfig", {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8}),
    "prefix": ("PrefixTuningConfig", {}),
    "prefix-proj": ("PrefixTuningConfig", {"prefix_projection": True, "encoder_hidden_size": 16}),
}


@dataclass(frozen=True)
class Scenario:
    model: str
    method: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.model}-{self.method}"

    @property
    def task_type(self) -> str:
        return MODELS[self.model][1]

    def build(self) -> nn.Module:
        return MODELS[self.model][0]()

    def config(self, library: Any) -> Any:
        name, kwargs = METHODS[self.method]
        return getattr(library, name)(task_type=self.task_type, num_virtual_tokens=NVT, **kwargs, **self.extra)


SCENARIOS = [Scenario(m, k) for m in ("llama", "gpt2", "t5") for k in METHODS] + [
    Scenario("llama-seqcls", "prompt"),
    Scenario("llama-seqcls", "prefix"),
]


def _inputs(scenario: Scenario) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, -2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if scenario.task_type == "SEQ_2_SEQ_LM":
        inputs["decoder_input_ids"] = torch.randint(3, 120, (2, 4), generator=torch.Generator().manual_seed(2))
    return inputs


def _randomize(model: nn.Module, seed: int) -> None:
    """Random prompt weights (and classification head), so that the adapter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def _save(model: nn.Module, path: Path) -> dict[str, tuple[int, ...]]:
    model.save_pretrained(path)
    return {k: tuple(v.shape) for k, v in load_file(path / "adapter_model.safetensors").items()}


def _config_json(path: Path) -> dict[str, Any]:
    """The saved config; ``modules_to_save`` as a set (the reference lists the SEQ_CLS heads twice)."""
    data = json.loads((path / "adapter_config.json").read_text())
    data.pop("peft_version")
    if data.get("modules_to_save") is not None:
        data["modules_to_save"] = set(data["modules_to_save"])
    return data


def _load_clean(load: Any) -> Any:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = load()
    bad = [str(w.message) for w in caught if any(f in str(w.message) for f in FORBIDDEN_WARNINGS)]
    assert not bad, bad
    return result


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.id)
def test_files_and_outputs_interop_both_ways(scenario: Scenario, tmp_path: Path) -> None:
    inputs = _inputs(scenario)
    ours = peftkit.get_peft_model(scenario.build(), scenario.config(peftkit))
    _randomize(ours, seed=10)
    ref = peft.get_peft_model(scenario.build(), scenario.config(peft))
    _randomize(ref, seed=20)
    ours_logits, ref_logits = _logits(ours, inputs), _logits(ref, inputs)
    keys_ours = _save(ours, tmp_path / "ours")
    keys_ref = _save(ref, tmp_path / "ref")

    assert keys_ours == keys_ref
    assert "prompt_embeddings" in keys_ours
    assert _config_json(tmp_path / "ours") == _config_json(tmp_path / "ref")

    # the reference loads peftkit's file
    ref_loaded = _load_clean(lambda: peft.PeftModel.from_pretrained(scenario.build(), tmp_path / "ours"))
    torch.testing.assert_close(_logits(ref_loaded, inputs), ours_logits, atol=ATOL, rtol=0)
    # peftkit loads the reference's file
    ours_loaded = _load_clean(lambda: peftkit.PeftModel.from_pretrained(scenario.build(), tmp_path / "ref"))
    torch.testing.assert_close(_logits(ours_loaded, inputs), ref_logits, atol=ATOL, rtol=0)
    # the prompt changes the outputs (so the comparisons above are not vacuous)
    with ours_loaded.disable_adapter():
        base = _logits(ours_loaded, inputs)
    assert not torch.allclose(base[..., -4:, :] if base.dim() == 3 else base, (
        ref_logits[..., -4:, :] if ref_logits.dim() == 3 else ref_logits), atol=1e-3)


GENERATE = [Scenario(m, k) for m in ("llama", "t5") for k in ("prompt", "ptuning-mlp", "prefix", "prefix-proj")]
GENERATE += [Scenario("gpt2", "prefix"), Scenario("gpt2", "prompt")]


@pytest.mark.parametrize("scenario", GENERATE, ids=lambda s: s.id)
def test_generate_matches_reference(scenario: Scenario, tmp_path: Path) -> None:
    ref = peft.get_peft_model(scenario.build(), scenario.config(peft))
    _randomize(ref, seed=30)
    ref.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(scenario.build(), tmp_path)
    ref.eval()
    inputs = _inputs(scenario)
    inputs.pop("decoder_input_ids", None)
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    for options in ({"do_sample": False}, {"do_sample": False, "num_beams": 3}):
        with torch.no_grad():
            expected = ref.generate(**inputs, max_new_tokens=4, **options)
            got = ours.generate(**inputs, max_new_tokens=4, **options)
        assert torch.equal(got, expected), options
        with torch.no_grad(), ours.disable_adapter():
            base = ours.generate(**inputs, max_new_tokens=4, **options)
        assert base.shape == got.shape
