"""Training memory of LoRA variants and methods against the reference (🤗 PEFT 0.21.2): what a training forward
keeps for backward (``saved_tensors_hooks``, unique storages, parameters excluded), the quantity that drives the
peak RSS measured by ``bench/run.py --cases methods``. The same tiny model and batch in both libraries; peftkit
must not keep more, and where it keeps less the gradients still equal the reference's (same adapter weights)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from numerics import fp_tol
from torch import nn

import peftkit
from tests.models import FFN, HIDDEN, LAYERS, VOCAB, tiny_llama

pytestmark = pytest.mark.interop

INVOKE = [5, 6, 7]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _ids() -> torch.Tensor:
    """(3, 16) token ids with the aLoRA invocation at position 4 of every row (the update covers 12 of 16)."""
    ids = torch.randint(8, VOCAB, (3, 16), generator=torch.Generator().manual_seed(3))
    ids[:, 4:7] = torch.tensor(INVOKE)
    return ids


def saved_bytes(model: nn.Module, ids: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes of the unique non-parameter storages a training forward saves for backward, and the loss."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    return sum(saved.values()), loss


def _same_weights(ours: nn.Module, ref: nn.Module) -> list[str]:
    """Copy the reference's trainable tensors into peftkit's (same names and shapes); return the names."""
    ref_params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    names = []
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(ref_params[name])
                names.append(name)
    return names


def _both(config: Callable[[Any], Any], perturb: Callable[[nn.Module], None]) -> tuple[nn.Module, nn.Module]:
    """The tiny Llama wrapped by the reference (``perturb``-ed: non-trivial updates) and by peftkit with the same
    trainable tensors, both in train mode."""
    import peft

    ref = peft.get_peft_model(tiny_llama(), config(peft))
    perturb(ref)
    ours = peftkit.get_peft_model(tiny_llama(), config(peftkit))
    _same_weights(ours, ref)
    return ours.train(), ref.train()


def _randomise(prefixes: tuple[str, ...]) -> Callable[[nn.Module], None]:
    def perturb(model: nn.Module) -> None:
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and any(k in name for k in prefixes):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return perturb


CASES = {
    "alora": (lambda lib: lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM",
                                         alora_invocation_tokens=INVOKE), _randomise(("lora_B",))),
    "loha": (lambda lib: lib.LoHaConfig(r=4, alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"),
             _randomise(("hada_",))),
}


@pytest.mark.parametrize("method", list(CASES))
def test_training_saves_no_more_than_the_reference_with_equal_gradients(method):
    pytest.importorskip("peft")
    config, perturb = CASES[method]
    ours, ref = _both(config, perturb)
    ids = _ids()
    ours_bytes, ours_loss = saved_bytes(ours, ids)
    ref_bytes, ref_loss = saved_bytes(ref, ids)
    assert ours_bytes <= ref_bytes, (method, ours_bytes, ref_bytes)
    ours_loss.backward()
    ref_loss.backward()
    # float32, another summation order through LAYERS layers of (hidden + ffn + rank)-term matmuls
    tol = fp_tol(torch.float32, LAYERS * (HIDDEN + FFN + 4) + HIDDEN)
    torch.testing.assert_close(ours_loss, ref_loss, **tol)
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **tol, msg=name)


@pytest.mark.parametrize("which", [(True, True, True, True), (False, True, False, True), (True, False, True, False)])
def test_loha_hada_product_matches_the_plain_definition(which):
    """LoHa's lean Hadamard product (recomputing the two products in backward) against autograd through the plain
    ``(w1a @ w1b) * (w2a @ w2b)``: the same value and the same gradients for any subset of trainable factors."""
    from peftkit.methods.loha.layers import hada_product, hada_product_plain

    gen = torch.Generator().manual_seed(0)
    shapes = [(12, 3), (3, 20), (12, 3), (3, 20)]
    leaves = [torch.randn(s, generator=gen).requires_grad_(w) for s, w in zip(shapes, which)]
    plain = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    grad = torch.randn(12, 20, generator=gen)
    out = hada_product(*leaves)
    expected = hada_product_plain(*plain)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the same kernels on the same data
    out.backward(grad)
    expected.backward(grad)
    for ours, ref in zip(leaves, plain):
        if ref.requires_grad:  # float32, another summation order over r=3 / out=12 / cols=20 terms
            torch.testing.assert_close(ours.grad, ref.grad, **fp_tol(torch.float32, 20))
        else:
            assert ours.grad is None
    with torch.no_grad():  # no autograd node without gradients
        assert hada_product(*leaves).grad_fn is None
