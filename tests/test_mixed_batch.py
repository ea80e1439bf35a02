"""Mixed batches: row i of ``model(..., adapter_names=names)`` equals a run with adapter ``names[i]`` alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import CASES_BY_NAME, TASK_CASES, model_output
from numerics import TINY_MODEL_REDUCTION, fp_tol

from peftkit import AdapterNotFoundError, LoraConfig, MergeError, get_peft_model
from peftkit.ops.batched import add_mixed_lowrank_, contiguous_runs, mixed_lowrank_reference, stack_adapters

INTERLEAVED = ["default", "b", "__base__", "c", "b", "default"]  # 6 runs: gathered + bmm path
SORTED = ["b", "b", "b", "default", "default", "__base__"]  # 3 runs: sliced path


def _three_adapters(case):
    torch.manual_seed(0)
    kwargs = {"task_type": case.task_type, "target_modules": case.target_modules, "init_lora_weights": False}
    model = get_peft_model(case.build(), LoraConfig(**kwargs)).eval()
    model.add_adapter("b", LoraConfig(**kwargs, r=2, lora_alpha=4))
    model.add_adapter("c", LoraConfig(**kwargs, r=6, use_rslora=True))
    return model


def _single(model, name, call):
    if name == "__base__":
        with model.disable_adapter():
            return call()
    model.set_adapter(name)
    try:
        return call()
    finally:
        model.set_adapter("default")


# ------------------------------------------------------------------------------------------- ops


@settings(max_examples=25, deadline=None)
@given(
    slots=st.lists(st.integers(-1, 2), min_size=1, max_size=7),
    ranks=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    tokens=st.integers(1, 3),
)
def test_add_mixed_lowrank_matches_row_loop(slots, ranks, tokens):
    gen = torch.Generator().manual_seed(len(slots) * 7 + sum(ranks))
    n, d_in, d_out = len(slots), 5, 3
    As = [torch.randn(r, d_in, generator=gen) for r in ranks]
    Bs = [torch.randn(d_out, r, generator=gen) for r in ranks]
    scalings = [0.5, 2.0, 1.5]
    x = torch.randn(n, tokens, d_in, generator=gen)
    result = torch.randn(n, tokens, d_out, generator=gen)
    expected = mixed_lowrank_reference(result.clone(), x, slots, As, Bs, scalings)
    A_stack, B_stack = stack_adapters(As, Bs, scalings)
    index = torch.tensor(slots)
    out = add_mixed_lowrank_(result.clone(), x, index, contiguous_runs(slots), A_stack, B_stack)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_contiguous_runs():
    assert contiguous_runs([0, 0, -1, 1, 1, 0]) == [(0, 2, 0), (2, 3, -1), (3, 5, 1), (5, 6, 0)]
    assert contiguous_runs([2]) == [(0, 1, 2)]


# ------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("names", [INTERLEAVED, SORTED], ids=["interleaved", "sorted"])
@pytest.mark.parametrize("case", TASK_CASES, ids=lambda c: c.name)
def test_mixed_forward_rows_equal_single_adapter_runs(case, names):
    model = _three_adapters(case)
    inputs = case.make_inputs(len(names))
    with torch.no_grad():
        mixed = model_output(model(**inputs, adapter_names=names), case.output_key)
        for i, name in enumerate(names):
            single = model_output(_single(model, name, lambda: model(**inputs)), case.output_key)
            torch.testing.assert_close(mixed[i], single[i], atol=1e-5, rtol=1e-5)
    # the adapters really differ, so routing mistakes would show
    first = model_output(_single(model, "default", lambda: model(**inputs)), case.output_key)
    other = model_output(_single(model, "b", lambda: model(**inputs)), case.output_key)
    assert (first - other).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------- generate

GEN_CASES = ["llama-causal", "gpt2-causal", "t5-seq2seq", "bart-seq2seq"]
NAMES4 = ["b", "default", "__base__", "c"]


def _prompt(case, n):
    inputs = case.make_inputs(n)
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


@pytest.mark.parametrize(
    "gen_kwargs",
    [{"do_sample": False}, {"do_sample": False, "num_beams": 3}, {"do_sample": False, "num_beams": 2,
                                                                   "num_return_sequences": 2}],
    ids=["greedy", "beam3", "beam2x2"],
)
@pytest.mark.parametrize("name", GEN_CASES)
def test_mixed_generate_rows_equal_single_adapter_generate(name, gen_kwargs):
    case = CASES_BY_NAME[name]
    model = _three_adapters(case)
    prompt = _prompt(case, len(NAMES4))
    kwargs = {"max_new_tokens": 4, "pad_token_id": 0, **gen_kwargs}
    per_row = kwargs.get("num_return_sequences", 1)
    with torch.no_grad():
        mixed = model.generate(**prompt, adapter_names=NAMES4, **kwargs)
        for i, adapter in enumerate(NAMES4):
            single = _single(model, adapter, lambda: model.generate(**prompt, **kwargs))
            rows = slice(i * per_row, (i + 1) * per_row)
            assert torch.equal(mixed[rows], single[rows]), (adapter, mixed[rows], single[rows])


def test_mixed_generate_with_sampling_routes_rows():
    case = CASES_BY_NAME["llama-causal"]
    model = _three_adapters(case)
    prompt = _prompt(case, len(NAMES4))
    kwargs = {"max_new_tokens": 4, "pad_token_id": 0, "do_sample": True, "top_k": 1}  # top_k=1: deterministic
    with torch.no_grad():
        mixed = model.generate(**prompt, adapter_names=NAMES4, **kwargs)
        for i, adapter in enumerate(NAMES4):
            single = _single(model, adapter, lambda: model.generate(**prompt, **kwargs))
            assert torch.equal(mixed[i], single[i])
        sampled = model.generate(**prompt, adapter_names=NAMES4, max_new_tokens=4, pad_token_id=0, do_sample=True)
    assert sampled.shape == mixed.shape


# ------------------------------------------------------------------------------------------- errors


def test_mixed_batch_errors_and_state_is_restored():
    case = CASES_BY_NAME["llama-causal"]
    model = _three_adapters(case)
    inputs = case.make_inputs(2)
    with pytest.raises(ValueError, match="training mode"):
        model.train()
        model(**inputs, adapter_names=["default", "b"])
    model.eval()
    with pytest.raises(ValueError, match="2 rows"):
        model(**inputs, adapter_names=["default", "b", "c"])
    with pytest.raises(AdapterNotFoundError, match="nope"):
        model(**inputs, adapter_names=["default", "nope"])
    model.merge_adapter()
    with pytest.raises(MergeError, match="unmerge"):
        model(**inputs, adapter_names=["default", "b"])
    model.unmerge_adapter()
    layers = list(model.base_model.adapter_modules())
    assert all(m._row_adapters is None for _, m in layers)  # routing is cleared after every call, even on errors
    with torch.no_grad():
        plain = model(**inputs).logits
        routed = model(**inputs, adapter_names=["default", "default"]).logits
    # the routed (mixed-batch) path vs the plain one: a tiny-model forward on other kernels
    torch.testing.assert_close(routed, plain, **fp_tol(torch.float32, TINY_MODEL_REDUCTION))


def test_each_row_its_own_adapter_and_stack_cache_invalidation():
    """Rows ["default", "b", "c"] map to slots 0, 1, 2 (no gather); the stacked weights are cached across calls but
    rebuilt when a weight or a scaling changes."""
    case = CASES_BY_NAME["llama-causal"]
    model = _three_adapters(case)
    names = ["default", "b", "c"]
    inputs = case.make_inputs(len(names))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj

    def check():
        with torch.no_grad():
            mixed = model(**inputs, adapter_names=names).logits
            for i, name in enumerate(names):
                single = _single(model, name, lambda: model(**inputs).logits)
                torch.testing.assert_close(mixed[i], single[i], atol=1e-5, rtol=1e-5)

    check()
    assert layer._row_cache[1].rows_are_slots
    cached = layer._stack_cache
    check()
    assert layer._stack_cache is cached  # reused
    with torch.no_grad():
        layer.lora_B["b"].weight.mul_(3.0)
    check()
    assert layer._stack_cache is not cached  # a weight changed: rebuilt
    cached = layer._stack_cache
    layer.scaling["c"] = layer.scaling["c"] * 2
    check()
    assert layer._stack_cache is not cached  # a scaling changed: rebuilt


def test_consecutive_calls_with_different_routing():
    """Each call routes by its own names (a routing cache keyed by object identity once reused stale plans)."""
    case = CASES_BY_NAME["custom-mlp"]
    model = _three_adapters(case)
    inputs = case.make_inputs(2)
    with torch.no_grad():
        singles = {n: _single(model, n, lambda: model(**inputs)) for n in ("default", "b")}
        for names in (["default", "b"], ["b", "default"], ["default", "b"], ["b", "b"]):
            out = model(**inputs, adapter_names=list(names))
            for i, name in enumerate(names):
                # mixed-batch path vs one adapter for the batch: a tiny-model forward on other kernels
                torch.testing.assert_close(out[i], singles[name][i], **fp_tol(torch.float32, TINY_MODEL_REDUCTION))
