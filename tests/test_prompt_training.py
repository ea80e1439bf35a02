"""Initialisation and training of the prompt-learning methods (issue 4, "Done when").

* TEXT initialisation copies the input-embedding rows of the tokenised text, repeated (ceil) or cut to the virtual
  tokens, and passes ``tokenizer_kwargs`` to the tokenizer; SAMPLE_VOCAB draws rows of the embedding matrix
  (reproducibly under a seed); RANDOM does not.
* Every method (prompt tuning RANDOM and TEXT, P-tuning MLP and LSTM, prefix tuning with and without projection)
  learns a small task with the base frozen: the loss falls clearly and only the prompt parameters change.
* Prefix tuning trains under gradient checkpointing (reentrant and not) on the GQA Llama and on T5, with the
  first-step gradient of training without checkpointing.
* GQA: the prefix cache holds ``num_layers`` entries of ``(B, kv_heads, nvt, head_dim)`` and generate carries it.

``test_prompt_basic.py`` covers shapes, routing, one-step gradient equality under checkpointing and greedy
generate; this file adds the initialisation contents and the training runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from models import tiny_llama, tiny_t5, tiny_tokenizer
from torch import nn

from peftkit import PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

VOCAB = 128
#: the fixed continuation every training example must learn (ids < VOCAB, none of them special)
TARGET = torch.tensor([17, 42, 99, 5])
ROWS, CONTEXT = 8, 4
STEPS = 60
LR = 0.05


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer trained in memory and saved (``AutoTokenizer.from_pretrained`` loads it)."""
    path = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer("wordlevel").save_pretrained(path)
    return path


def _tokenizer(path: Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, **kwargs)


def _expected_rows(ids: list[int], total: int) -> list[int]:
    """``ids`` repeated ``ceil(total / len(ids))`` times and cut to ``total``."""
    return (ids * math.ceil(total / len(ids)))[:total]


def _prompt_weight(model: PeftModel) -> torch.Tensor:
    return model.base_model.prompt_encoder["default"].embedding.weight


def _input_embeddings(model: PeftModel) -> torch.Tensor:
    return model.get_base_model().get_input_embeddings().weight


def _text_config(path: Path, nvt: int, text: str, task: str = "CAUSAL_LM", **kwargs: Any) -> PromptTuningConfig:
    return PromptTuningConfig(task_type=task, num_virtual_tokens=nvt, prompt_tuning_init="TEXT",
                              prompt_tuning_init_text=text, tokenizer_name_or_path=str(path), **kwargs)


# ---------------------------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("nvt", [3, 12], ids=["cut", "repeated"])
def test_text_init_copies_the_rows_of_the_tokenised_text(tokenizer_dir: Path, nvt: int) -> None:
    """5 text tokens into 3 virtual tokens (cut) or 12 (three copies, cut to 12): exactly those embedding rows, as a
    trainable fp32 copy that does not share storage with the model's matrix."""
    text = "the quick brown fox jumps"
    ids = _tokenizer(tokenizer_dir)(text)["input_ids"]
    assert len(ids) == 5 and len(set(ids)) == 5
    model = get_peft_model(tiny_llama(), _text_config(tokenizer_dir, nvt, text))
    weight, table = _prompt_weight(model), _input_embeddings(model)
    rows = _expected_rows(ids, nvt)
    assert weight.shape == (nvt, table.shape[1]) and weight.dtype == torch.float32 and weight.requires_grad
    assert torch.equal(weight, table[torch.tensor(rows)])
    assert weight.data_ptr() != table.data_ptr()
    with torch.no_grad():
        weight.add_(1.0)
    assert torch.equal(_input_embeddings(model)[torch.tensor(rows)] + 1.0, weight), "the prompt aliases the matrix"


def test_text_init_fills_every_submodule_row_on_seq2seq(tokenizer_dir: Path) -> None:
    """Encoder-decoder models have ``nvt * 2`` prompt rows; TEXT fills all of them from the text."""
    text = "hello world"
    ids = _tokenizer(tokenizer_dir)(text)["input_ids"]
    model = get_peft_model(tiny_t5(), _text_config(tokenizer_dir, 3, text, task="SEQ_2_SEQ_LM"))
    weight, table = _prompt_weight(model), _input_embeddings(model)
    assert weight.shape == (6, 32)
    assert torch.equal(weight, table[torch.tensor(_expected_rows(ids, 6))])


def test_text_init_passes_tokenizer_kwargs_to_the_tokenizer(tokenizer_dir: Path) -> None:
    """``add_eos_token=True`` makes the tokenizer append ``<eos>``, which then appears among the copied rows."""
    text = "hello world"
    plain = _tokenizer(tokenizer_dir)(text)["input_ids"]
    spaced = _tokenizer(tokenizer_dir, add_eos_token=True)(text)["input_ids"]
    assert spaced == [*plain, 1]  # otherwise the test could not tell whether the kwargs were used
    nvt = 3
    model = get_peft_model(tiny_llama(), _text_config(tokenizer_dir, nvt, text,
                                                      tokenizer_kwargs={"add_eos_token": True}))
    table = _input_embeddings(model)
    assert torch.equal(_prompt_weight(model), table[torch.tensor(_expected_rows(spaced, nvt))])
    assert not torch.equal(_prompt_weight(model), table[torch.tensor(_expected_rows(plain, nvt))])


def _sample_vocab(seed: int, nvt: int = 6) -> PeftModel:
    torch.manual_seed(seed)
    return get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=nvt,
                                                           prompt_tuning_init="SAMPLE_VOCAB"))


def _row_matches(weight: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``(nvt, vocab)``: row i of ``weight`` equals row j of ``table`` exactly."""
    return (weight[:, None, :] == table[None, :, :]).all(-1)


def test_sample_vocab_draws_embedding_rows_reproducibly() -> None:
    first, again, other = _sample_vocab(0), _sample_vocab(0), _sample_vocab(1)
    table = _input_embeddings(first)
    matches = _row_matches(_prompt_weight(first), table)
    assert matches.any(1).all(), "a SAMPLE_VOCAB row is not a row of the embedding matrix"
    assert matches.sum(1).eq(1).all()  # the rows of the tiny model's matrix are distinct: one source row each
    assert torch.equal(_prompt_weight(again), _prompt_weight(first)), "not reproducible under the same seed"
    assert _row_matches(_prompt_weight(other), table).any(1).all()
    assert not torch.equal(_prompt_weight(other), _prompt_weight(first)), "another seed drew the same rows"
    assert _prompt_weight(first).dtype == torch.float32 and _prompt_weight(first).requires_grad


def test_random_init_is_not_made_of_embedding_rows() -> None:
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    weight, table = _prompt_weight(model), _input_embeddings(model)
    assert not _row_matches(weight, table).any()
    # N(0, 1) (nn.Embedding's init), not the 0.02-scaled rows of the matrix
    assert 0.5 < weight.std().item() < 2.0 and table.std().item() < 0.1


# ---------------------------------------------------------------------------------------------- training


def trainable_llama() -> nn.Module:
    """The tiny GQA Llama (4 heads, 2 kv heads, head_dim 8) with weights at std 0.2 instead of 0.02, so that its
    outputs are not nearly uniform and a prompt can steer them within a few dozen steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config)


def causal_batch() -> dict[str, torch.Tensor]:
    """``ROWS`` random contexts followed by ``TARGET``; the loss is on ``TARGET`` only."""
    context = torch.randint(3, VOCAB, (ROWS, CONTEXT), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([context, TARGET.expand(ROWS, -1)], dim=1)
    labels = ids.clone()
    labels[:, :CONTEXT] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def seq2seq_batch() -> dict[str, torch.Tensor]:
    """``ROWS`` random encoder inputs, all with the decoder target ``TARGET``."""
    ids = torch.randint(3, VOCAB, (ROWS, 6), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": TARGET.expand(ROWS, -1).clone()}


def train(model: PeftModel, batch: dict[str, torch.Tensor], steps: int = STEPS, lr: float = LR,
          first_grads: list[torch.Tensor] | None = None) -> tuple[float, float]:
    """Adam on the trainable parameters for ``steps`` steps on ``batch``; returns the loss before and after (eval
    forward without grad). ``first_grads`` receives the gradients of the first step (trainable parameters in
    order)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    model.eval()
    with torch.no_grad():
        initial = model(**batch).loss.item()
    model.train()
    torch.manual_seed(0)  # the same dropout masks in every run (checkpointing replays them)
    for step in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        if step == 0 and first_grads is not None:
            first_grads.extend(p.grad.detach().clone() for p in params)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        final = model(**batch).loss.item()
    return initial, final


METHODS: dict[str, Callable[[Path], Any]] = {
    "prompt-random": lambda _: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prompt-text": lambda path: _text_config(path, 4, "say hello world"),
    "ptuning-mlp": lambda _: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32),
    "ptuning-lstm": lambda _: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16,
                                                  encoder_reparameterization_type="LSTM"),
    "prefix": lambda _: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prefix-proj": lambda _: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                                                encoder_hidden_size=32),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_training_learns_a_fixed_continuation_with_the_base_frozen(method: str, tokenizer_dir: Path) -> None:
    """60 Adam steps: the loss on ``TARGET`` falls below 0.7x its start (and below the uniform-guess loss); every
    base parameter is bit-identical and gradient-free, every prompt parameter changed."""
    torch.manual_seed(0)
    model = get_peft_model(trainable_llama(), METHODS[method](tokenizer_dir)).eval()
    base = model.get_base_model()
    base_before = {n: p.detach().clone() for n, p in base.named_parameters()}
    encoder = model.base_model.prompt_encoder
    prompt_before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"base_model.prompt_encoder.{n}" for n in prompt_before}
    initial, final = train(model, causal_batch())
    assert final < 0.7 * initial and final < 0.7 * math.log(VOCAB), (initial, final)
    assert all(torch.equal(p, base_before[n]) for n, p in base.named_parameters()), "a base parameter changed"
    assert all(p.grad is None for p in base.parameters())
    unchanged = [n for n, p in encoder.named_parameters() if torch.equal(p, prompt_before[n])]
    assert not unchanged, unchanged


# ---------------------------------------------------------------------------------------------- gradient checkpointing


def t5_without_dropout() -> nn.Module:
    """The tiny T5 built with ``dropout_rate=0.0`` (a common fine-tuning setting)."""
    from transformers import T5ForConditionalGeneration

    config = tiny_t5().config
    config.dropout_rate = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return T5ForConditionalGeneration(config)


#: (model factory, batch, extra PrefixTuningConfig kwargs); T5 keeps its dropout (0.1): ``train`` seeds the masks
GC_CASES = {
    "llama": (trainable_llama, causal_batch, {}),
    "llama-proj": (trainable_llama, causal_batch, {"prefix_projection": True, "encoder_hidden_size": 32}),
    "t5": (tiny_t5, seq2seq_batch, {}),
    "t5-no-dropout": (t5_without_dropout, seq2seq_batch, {}),
}
#: "t5-no-dropout" with non-reentrant checkpointing guards a fixed bug: the prefix cache handling once switched off
#: ``gradient_checkpointing`` on T5Attention inside the checkpointed T5Block during the forward only, so the
#: recomputation took another attention path and raised ``CheckpointError`` (dropout 0 exposes it).
GC_PARAMS = [
    pytest.param(name, reentrant, id=f"{name}-{'reentrant' if reentrant else 'non-reentrant'}")
    for name in GC_CASES for reentrant in (False, True)
]


def _prefix_model(name: str, reentrant: bool | None) -> PeftModel:
    build, _, kwargs = GC_CASES[name]
    task = "SEQ_2_SEQ_LM" if name.startswith("t5") else "CAUSAL_LM"
    torch.manual_seed(0)
    model = get_peft_model(build(), PrefixTuningConfig(task_type=task, num_virtual_tokens=4, **kwargs))
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model.eval()


def _layer_calls(model: PeftModel) -> list[int]:
    """Counts the calls of the first (decoder) block's self-attention: doubled by checkpointing, which recomputes the
    block in backward (transformers checkpoints ``forward``, so the block's own hooks run once)."""
    base = model.get_base_model()
    attention = base.decoder.block[0].layer[0] if hasattr(base, "decoder") else base.model.layers[0].self_attn
    calls = [0]

    def count(*_: Any) -> None:
        calls[0] += 1

    attention.register_forward_hook(count)
    return calls


@pytest.mark.parametrize(("name", "reentrant"), GC_PARAMS)
def test_prefix_tuning_trains_under_gradient_checkpointing(name: str, reentrant: bool) -> None:
    """With checkpointing on, the layers are recomputed in backward, the first-step gradient of every prefix
    parameter equals the one without checkpointing (1e-5) and is not zero, and the loss falls below 0.7x."""
    _, batch_fn, _ = GC_CASES[name]
    batch = batch_fn()
    reference_grads: list[torch.Tensor] = []
    ref_initial, ref_final = train(_prefix_model(name, None), batch, first_grads=reference_grads)

    model = _prefix_model(name, reentrant)
    calls = _layer_calls(model)
    model.train()
    loss = model(**batch).loss
    forward_calls = calls[0]
    loss.backward()
    assert forward_calls == 1 and calls[0] == 2, "the block was not recomputed: checkpointing is off"
    model.zero_grad(set_to_none=True)

    grads: list[torch.Tensor] = []
    initial, final = train(model, batch, first_grads=grads)
    assert len(grads) == len(reference_grads) == len(list(model.base_model.prompt_encoder.parameters()))
    for got, expected in zip(grads, reference_grads):
        assert got.abs().sum() > 0, "no gradient reached the prefix encoder"
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert initial == pytest.approx(ref_initial, abs=1e-6)
    assert final < 0.7 * initial, (initial, final)
    # the same training run: float reordering in the recomputation only, which 60 Adam steps amplify a little
    assert final == pytest.approx(ref_final, rel=0.02)


# ---------------------------------------------------------------------------------------------- GQA


def test_gqa_prefix_cache_holds_kv_heads_and_is_the_models_past() -> None:
    """On the GQA Llama (4 query heads, 2 key/value heads of size 8) the prefix cache has one entry per layer of
    ``(B, 2, nvt, 8)``: the saved prefix split as (nvt, layer, key|value, kv_head, head_dim); running the base model
    with that cache as ``past_key_values`` gives the adapted outputs."""
    from transformers import DynamicCache

    nvt, rows, length = 3, 2, 5
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=nvt)).eval()
    with torch.no_grad():
        model.base_model.prompt_encoder["default"].embedding.weight.normal_(0, 1)
    prefix = model.base_model.prompt_encoder["default"].embedding.weight.detach()
    assert prefix.shape == (nvt, 2 * 2 * 2 * 8)
    split = prefix.view(nvt, 2, 2, 2, 8)  # (nvt, layer, key|value, kv_head, head_dim)
    cache = model.base_model.prefix_cache(rows, encoder_decoder=False)
    assert len(cache.layers) == 2
    for i, layer in enumerate(cache.layers):
        assert layer.keys.shape == layer.values.shape == (rows, 2, nvt, 8)
        assert torch.equal(layer.keys, split[:, i, 0].permute(1, 0, 2).expand(rows, -1, -1, -1))
        assert torch.equal(layer.values, split[:, i, 1].permute(1, 0, 2).expand(rows, -1, -1, -1))

    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(rows, length, dtype=torch.long)
    past = DynamicCache()
    for i in range(2):
        past.update(split[:, i, 0].permute(1, 0, 2).expand(rows, -1, -1, -1).clone(),
                    split[:, i, 1].permute(1, 0, 2).expand(rows, -1, -1, -1).clone(), i)
    with torch.no_grad():
        expected = model.get_base_model()(input_ids=ids, attention_mask=torch.cat([torch.ones(rows, nvt), mask], 1),
                                          past_key_values=past).logits
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("options", [
    {"do_sample": False},
    {"do_sample": False, "num_beams": 3},
    {"do_sample": True, "top_k": 5, "num_return_sequences": 2},
], ids=["greedy", "beam", "sample"])
def test_gqa_prefix_generate(options: dict[str, Any]) -> None:
    """generate on the GQA Llama: the returned cache holds the prefix plus every position, per key/value head, for
    every returned row (beams and samples included)."""
    nvt, rows, length, new = 3, 2, 5, 4
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=nvt)).eval()
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, return_dict_in_generate=True, **options)
    expanded = rows * options.get("num_beams", 1) * options.get("num_return_sequences", 1)
    returned = rows * options.get("num_return_sequences", 1)
    assert out.sequences.shape == (returned, length + new)
    assert torch.equal(out.sequences[:, :length], ids.repeat_interleave(returned // rows, 0))
    layers = out.past_key_values.layers
    assert len(layers) == 2
    for layer in layers:
        assert layer.keys.shape == (expanded, 2, nvt + length + new - 1, 8)
    if not options.get("num_beams") and not options.get("do_sample"):
        with torch.no_grad():  # the greedy tokens are the argmax of the full forward (no cache reuse)
            logits = model(input_ids=out.sequences).logits
        assert torch.equal(out.sequences[:, length:], logits[:, length - 1:-1].argmax(-1))
