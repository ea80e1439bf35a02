"""``generate`` passes through the PEFT wrapper: adapted generation equals the merged model's, disabled equals base."""

from __future__ import annotations

import copy

import pytest
import torch
from models import CASES_BY_NAME

from peftkit import LoraConfig, PeftModelForSeq2SeqLM, get_peft_model

CAUSAL = ["llama-causal", "gpt2-causal", "opt-causal"]
SEQ2SEQ = ["t5-seq2seq", "bart-seq2seq"]
GEN = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}


def _wrapped(name: str):
    case = CASES_BY_NAME[name]
    base = case.build().eval()
    torch.manual_seed(0)
    config = LoraConfig(task_type=case.task_type, target_modules=case.target_modules, r=4, lora_alpha=64,
                        init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), config).eval()
    return case, base, model


def _prompt(case):
    inputs = case.make_inputs(2)
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_generate_matches_merged_and_base(name):
    case, base, model = _wrapped(name)
    prompt = _prompt(case)
    with torch.no_grad():
        adapted = model.generate(**prompt, **GEN)
        positional = model.generate(prompt["input_ids"], attention_mask=prompt["attention_mask"], **GEN)
        with model.disable_adapter():
            disabled = model.generate(**prompt, **GEN)
        plain = base.generate(**prompt, **GEN)
        merged = model.merge_and_unload().generate(**prompt, **GEN)
    assert torch.equal(adapted, positional)
    assert torch.equal(disabled, plain)
    assert torch.equal(adapted, merged)
    assert not torch.equal(adapted, plain)  # the adapter really changes what is generated


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_seq2seq_generate_keyword_only(name):
    case, base, model = _wrapped(name)
    assert isinstance(model, PeftModelForSeq2SeqLM)
    prompt = _prompt(case)
    with torch.no_grad():
        adapted = model.generate(**prompt, **GEN)
        with model.disable_adapter():
            disabled = model.generate(**prompt, **GEN)
        plain = base.generate(**prompt, **GEN)
        merged = model.merge_and_unload().generate(**prompt, **GEN)
    assert torch.equal(disabled, plain)
    assert torch.equal(adapted, merged)
    assert not torch.equal(adapted, plain)  # the adapter really changes what is generated
    with pytest.raises(TypeError):
        model.generate(prompt["input_ids"])  # keyword arguments only, as in the reference
