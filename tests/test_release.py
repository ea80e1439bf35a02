"""A model wrapped or adapted by peftkit is freed as soon as its last reference goes (no reference cycle left for the
cyclic garbage collector), as a plain transformers model is: dropping a 400 MB model must not leave its memory to be
reclaimed later, at a cost paid by whatever code happens to run then."""

from __future__ import annotations

import copy
import gc
import inspect
import pickle
import weakref
from collections.abc import Callable, Iterator

import pytest
import torch
from models import tiny_bert, tiny_llama, tiny_t5
from torch import nn

import peftkit
from peftkit.transformers_adapters import add_adapter

BUILDS: dict[str, Callable[[], nn.Module]] = {
    "lora-causal": lambda: peftkit.get_peft_model(
        tiny_llama(), peftkit.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])),
    "ia3-seq2seq": lambda: peftkit.get_peft_model(tiny_t5(), peftkit.IA3Config(task_type="SEQ_2_SEQ_LM")),
    "lora-seqcls": lambda: peftkit.get_peft_model(
        tiny_bert(), peftkit.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"])),
    "prompt-causal": lambda: peftkit.get_peft_model(
        tiny_llama(), peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    "plain-model-functions": lambda: _plain(),
}


def _plain() -> nn.Module:
    model = tiny_llama()
    add_adapter(model, peftkit.LoraConfig(target_modules=["q_proj"]), adapter_name="a")
    return model


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("name", list(BUILDS))
def test_dropped_model_is_freed_without_the_cyclic_collector(name: str, no_cyclic_gc: None) -> None:
    model = BUILDS[name]()
    weight = next(model.parameters())
    refs = weakref.ref(model), weakref.ref(weight)
    del model, weight
    assert refs[0]() is None and refs[1]() is None


def test_forward_keeps_signature_copies_and_pickles_with_its_model() -> None:
    model = BUILDS["lora-causal"]()
    params = inspect.signature(model.forward).parameters
    assert "input_ids" in params and "adapter_names" in params and "self" not in params
    assert model.forward.__self__ is model
    ids = torch.tensor([[1, 2, 3]])
    expected = model(input_ids=ids).logits
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert clone.forward.__self__ is clone
        assert torch.equal(clone(input_ids=ids).logits, expected)


def test_plain_model_functions_bind_without_the_model_parameter() -> None:
    model = _plain()
    assert list(inspect.signature(model.set_adapter).parameters) == \
        list(inspect.signature(peftkit.transformers_adapters.set_adapter).parameters)[1:]
    assert model.active_adapters() == ["a"]
