"""Activated LoRA (``alora_invocation_tokens``, issue 20 item 2): the adapter's update applies only from the last
occurrence of the invocation sequence on, as the reference (🤗 PEFT 0.21.2 ``ALoraLinearVariant``,
``calculate_alora_offsets``). Math against a plain implementation, identity at init, save/load, merging refused,
restrictions, and interop both ways with the reference (forward and greedy ``generate`` with a KV cache)."""

from __future__ import annotations

import warnings

import pytest
import torch
from numerics import fp_tol
from torch import nn

import peftkit
from peftkit import LoraConfig, get_peft_model
from peftkit.methods.lora.alora import invocation_offsets
from tests.models import HIDDEN, LAYERS, VOCAB, tiny_llama

INVOKE = [5, 6, 7]
# float32 logits of tiny llama by two libraries (or two code paths): another summation order over the layers'
# matmuls (hidden 32, ffn 64, rank 4; a few dozen terms per layer and layer count)
LLAMA_TOL = fp_tol(torch.float32, LAYERS * (HIDDEN + 64 + 2 * 4) + HIDDEN)


class TokLinear(nn.Module):
    """ids: (batch, T) -> (batch, T, 6): an embedding, then a linear layer (the aLoRA target)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 10)
        self.lin = nn.Linear(10, 6)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(input_ids))


def _ids() -> torch.Tensor:
    """Row 0: the invocation twice (the last one counts); row 1: once; row 2: never; row 3: a partial match."""
    return torch.tensor([[1, 5, 6, 7, 2, 5, 6, 7, 3, 4],
                         [9, 9, 1, 2, 5, 6, 7, 8, 8, 8],
                         [1, 2, 3, 4, 8, 9, 10, 11, 12, 13],
                         [5, 6, 1, 5, 6, 7, 4, 5, 6, 2]])


def _starts() -> list[int | None]:
    return [5, 4, None, 3]


def _perturbed(model: nn.Module) -> None:
    """Non-zero ``lora_B`` everywhere (init_lora_weights=False already randomises A and B in both libraries)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.1)


def test_offsets_match_the_last_invocation_start():
    ids = _ids()
    T = ids.shape[1]
    assert invocation_offsets(ids, INVOKE) == [None if s is None else T - s for s in _starts()]
    assert invocation_offsets(ids[0], INVOKE) == [T - 5]  # one row given as (T,)
    assert invocation_offsets(ids[:, :2], INVOKE) == [None] * 4  # shorter than the invocation


@pytest.mark.parametrize("grad", [True, False])
def test_update_applies_from_the_invocation_start_only(grad):
    model = get_peft_model(TokLinear(), LoraConfig(r=3, lora_alpha=6, target_modules=["lin"],
                                                   init_lora_weights=False, alora_invocation_tokens=INVOKE))
    _perturbed(model)
    layer = model.base_model.model.lin
    ids = _ids()
    with torch.set_grad_enabled(grad):
        out = model(input_ids=ids)
    # plain implementation: W e + b + [t >= start] * s * B A e
    e = layer_in = model.base_model.model.emb(ids)
    W, b = layer.get_base_layer().weight, layer.get_base_layer().bias
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for row, start in enumerate(_starts()):
        if start is not None:
            mask[row, start:] = True
    expected = layer_in @ W.t() + b + mask.unsqueeze(-1) * (s * (e @ A.t() @ B.t()))
    # float32, two summation orders over 10 + 3 terms
    torch.testing.assert_close(out, expected, **fp_tol(torch.float32, 13))
    # the update is really there: far beyond the float tolerance, not a rounding difference
    assert (out[0, 5:] - (layer_in @ W.t() + b)[0, 5:]).abs().max() > 100 * fp_tol(torch.float32, 13)["atol"]


def test_explicit_offsets_equal_computed_ones_and_none_is_the_base():
    model = get_peft_model(TokLinear(), LoraConfig(r=3, target_modules=["lin"], init_lora_weights=False,
                                                   alora_invocation_tokens=INVOKE))
    _perturbed(model)
    ids = _ids()
    with torch.no_grad():
        base = model.base_model.model.lin.get_base_layer()(model.base_model.model.emb(ids))
        computed = model(input_ids=ids)
        given = model(input_ids=ids, alora_offsets=[10 - s if s is not None else None for s in _starts()])
        none = model(input_ids=ids, alora_offsets=[None] * 4)
    torch.testing.assert_close(given, computed, rtol=0, atol=0)  # the same offsets through the same kernels
    torch.testing.assert_close(none, base, **fp_tol(torch.float32, 10))


def test_identity_at_init_and_save_load(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                                    alora_invocation_tokens=INVOKE))
    base = tiny_llama()
    ids = _ids() + 10
    ids[:, 4:7] = torch.tensor(INVOKE)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, **LLAMA_TOL)
    _perturbed(model)
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].alora_invocation_tokens == INVOKE
    with torch.no_grad():
        # the same tensors through the same kernels on the same inputs: bit-identical
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits,  # same kernels/data
                                   rtol=0, atol=0)  # exact: loaded tensors are the saved bits, run by the same kernels
        # positions before the invocation see the base model only
        torch.testing.assert_close(loaded(input_ids=ids).logits[:, :4], base(input_ids=ids).logits[:, :4],
                                   **LLAMA_TOL)


def test_inputs_embeds_only_warns_and_runs_the_base_model():
    model = get_peft_model(tiny_llama(), _config(peftkit))
    _perturbed(model)
    ids = _llama_inputs()[0]
    embeds = model.get_input_embeddings()(ids).detach()
    with torch.no_grad(), pytest.warns(UserWarning, match="Cannot calculate aLoRA offsets without input_ids"):
        logits = model(inputs_embeds=embeds).logits
    with torch.no_grad():
        base = tiny_llama()(inputs_embeds=embeds).logits
    torch.testing.assert_close(logits, base, **LLAMA_TOL)


def test_merge_is_refused_and_leaves_the_model_unchanged():
    model = get_peft_model(TokLinear(), LoraConfig(r=3, target_modules=["lin"], init_lora_weights=False,
                                                   alora_invocation_tokens=INVOKE))
    weight = model.base_model.model.lin.get_base_layer().weight.clone()
    for call in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(NotImplementedError, match="aLoRA does not support merging"):
            call()
    assert torch.equal(model.base_model.model.lin.get_base_layer().weight, weight)  # untouched: no arithmetic ran
    assert not model.base_model.model.lin.merged_adapters
    assert not model.supports_lora_conversion()  # position dependent: not W + ΔW


def test_restrictions():
    with pytest.raises(ValueError, match="aLoRA adapts linear layers only"):
        get_peft_model(TokLinear(), LoraConfig(r=3, target_modules=["emb"], alora_invocation_tokens=INVOKE))
    with pytest.raises(ValueError, match="cannot be combined"):
        get_peft_model(TokLinear(), LoraConfig(r=3, target_modules=["lin"], use_dora=True,
                                               alora_invocation_tokens=INVOKE))
    for bad in ([], ["a"], [-1], 5):
        with pytest.raises(ValueError, match="alora_invocation_tokens"):
            LoraConfig(alora_invocation_tokens=bad, task_type="CAUSAL_LM")
    with pytest.warns(UserWarning, match="only supported for CAUSAL_LM"):
        LoraConfig(alora_invocation_tokens=INVOKE)
    model = get_peft_model(TokLinear(), LoraConfig(r=3, target_modules=["lin"], alora_invocation_tokens=INVOKE))
    model.eval()
    with pytest.raises(ValueError, match="not supported with aLoRA adapters"):
        model(input_ids=_ids(), adapter_names=["default"] * 4)


# ---------------------------------------------------------------------------------------------- interop
def _llama_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """``(forward ids (3, 12), prompt ids (2, 9))``: invocation inside, at the end, and absent."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(10, VOCAB, (3, 12), generator=g)
    ids[0, 4:7] = torch.tensor(INVOKE)
    ids[1, 9:12] = torch.tensor(INVOKE)
    prompt = torch.randint(10, VOCAB, (2, 9), generator=g)
    prompt[0, 6:9] = torch.tensor(INVOKE)
    prompt[1, 2:5] = torch.tensor(INVOKE)
    return ids, prompt


def _outputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    ids, prompt = _llama_inputs()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        tokens = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                do_sample=False, pad_token_id=0)
    return logits, tokens


def _config(lib):
    return lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                          init_lora_weights=False, task_type="CAUSAL_LM", alora_invocation_tokens=INVOKE)


@pytest.mark.parametrize("direction", ["peftkit_to_peft", "peft_to_peftkit"])
def test_interop_forward_and_generate(tmp_path, direction):
    peft = pytest.importorskip("peft")
    src_lib, dst_lib = (peftkit, peft) if direction == "peftkit_to_peft" else (peft, peftkit)
    torch.manual_seed(1)
    src = src_lib.get_peft_model(tiny_llama(), _config(src_lib))
    _perturbed(src)
    src.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dst = dst_lib.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    src_logits, src_tokens = _outputs(src)
    dst_logits, dst_tokens = _outputs(dst)
    torch.testing.assert_close(dst_logits, src_logits, **LLAMA_TOL)
    assert torch.equal(dst_tokens, src_tokens)  # integer token ids of greedy decoding (logits checked above)
    # the adapter matters: the base model's logits differ after the invocation (row 0 from position 4)
    with torch.no_grad():
        base_logits = tiny_llama()(input_ids=_llama_inputs()[0]).logits
    torch.testing.assert_close(src_logits[0, :4], base_logits[0, :4], **LLAMA_TOL)
    torch.testing.assert_close(src_logits[2], base_logits[2], **LLAMA_TOL)  # no invocation: the base model
    assert (src_logits[0, 4:] - base_logits[0, 4:]).abs().max() > 1e-3


def test_generate_reuses_the_base_prompt_cache():
    """Decoding with a KV cache (offsets computed once from the prompt) equals full forwards of the growing
    sequence: the first generated logits are those of a plain forward over the prompt."""
    model = get_peft_model(tiny_llama(), _config(peftkit))
    _perturbed(model)
    model.eval()
    _, prompt = _llama_inputs()
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                             do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        full = model(input_ids=out.sequences[:, :-1]).logits
    T = prompt.shape[1]
    for step, scores in enumerate(out.scores):
        torch.testing.assert_close(scores, full[:, T - 1 + step], **LLAMA_TOL)


def test_gradient_checkpointing_recomputes_with_the_same_offsets():
    """The offsets stay on the layers after forward, so the recomputation in backward masks the same positions:
    gradients equal those without checkpointing."""
    ids = _llama_inputs()[0]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same adapter weights in both runs
        model = get_peft_model(tiny_llama(), _config(peftkit))
        _perturbed(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, **LLAMA_TOL)
