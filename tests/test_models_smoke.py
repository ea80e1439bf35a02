"""Validates the tiny-model fixtures in tests/models.py (no peftkit involved)."""

import time

import pytest
import torch
from models import CASE_IDS, TASK_CASES, model_output, tiny_mt5, tiny_tokenizer


@pytest.mark.parametrize("case", TASK_CASES, ids=CASE_IDS)
def test_case_forward(case):
    model = case.build()
    inputs = case.make_inputs(2)
    out = model(**inputs)
    tensor = model_output(out, case.output_key)
    assert isinstance(tensor, torch.Tensor)
    assert tensor.shape[0] == 2
    assert torch.isfinite(tensor).all()
    if case.has_loss:
        assert out.loss is not None and out.loss.dim() == 0 and torch.isfinite(out.loss)
        out.loss.backward()
    else:
        tensor.float().sum().backward()


@pytest.mark.parametrize("case", TASK_CASES, ids=CASE_IDS)
def test_case_deterministic(case):
    a, b = case.build(), case.build()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for k in sa:
        assert sa[k].dtype in (torch.float32, torch.int64, torch.bool), (k, sa[k].dtype)
    ia, ib = case.make_inputs(2), case.make_inputs(2)
    assert ia.keys() == ib.keys() and all(torch.equal(ia[k], ib[k]) for k in ia)
    for name in case.target_modules:
        assert any(n.split(".")[-1] == name for n, _ in a.named_modules()), name


def test_build_all_fast():
    for case in TASK_CASES:  # warm up lazy imports
        case.build()
    start = time.perf_counter()
    for case in TASK_CASES:
        case.build()
    assert time.perf_counter() - start < 2.0


def test_mt5():
    out = tiny_mt5()(input_ids=torch.tensor([[5, 6, 7, 1]]), labels=torch.tensor([[8, 9, 1]]))
    assert torch.isfinite(out.loss)


def test_tiny_tokenizer_roundtrip():
    for kind in ("bpe", "wordlevel"):
        tok = tiny_tokenizer(kind)
        assert tok.pad_token_id == 0 and tok.eos_token_id == 1
        assert len(tok) <= 128
        enc = tok(["hello world", "the lazy dog jumps"], padding=True, return_tensors="pt")
        assert enc["input_ids"].max() < 128 and enc["input_ids"].shape[0] == 2
    tok = tiny_tokenizer("bpe")
    text = "hello adapters, the quick fox!"
    assert tok.decode(tok(text)["input_ids"]) == text
