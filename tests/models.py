"""Tiny, deterministic models and inputs for tests (no files, no network).

Every transformers model is built from a config with hidden size 32, 2 layers, 4 heads and vocab 128
(see ECOSYSTEM.md §7). Factories seed torch inside a forked RNG, so the same call always returns the same
weights and the caller's global RNG state is left alone. Models come back in fp32, in the mode
``nn.Module.__init__`` leaves them (training mode; transformers' default dropout is used, so call
``.eval()`` before comparing outputs).

``TASK_CASES`` lists one ``TaskCase`` per (model, task type). Typical use::

    @pytest.mark.parametrize("case", TASK_CASES, ids=CASE_IDS)
    def test_something(case):
        model = case.build()
        out = model(**case.make_inputs(2))
        logits = model_output(out, case.output_key)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# transformers is only imported lazily inside the factories, after this
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 128
HIDDEN = 32
LAYERS = 2
HEADS = 4
FFN = 64
MAX_POS = 64
SEQ_LEN = 8  # encoder / decoder-only sequence length used by make_inputs
TGT_LEN = 6  # seq2seq label length


@contextlib.contextmanager
def _seeded(seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# transformers model factories


def tiny_llama(task: str | None = "CAUSAL_LM"):
    """Llama with grouped-query attention (4 query heads, 2 kv heads: k_proj/v_proj map 32 -> 16)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POS,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if task in (None, "CAUSAL_LM"):
        from transformers import LlamaForCausalLM as cls
    elif task == "SEQ_CLS":
        from transformers import LlamaForSequenceClassification as cls

        config.num_labels = 2
    elif task == "FEATURE_EXTRACTION":
        from transformers import LlamaModel as cls
    else:
        raise ValueError(f"tiny_llama: unsupported task {task!r}")
    with _seeded():
        return cls(config)


def tiny_gpt2():
    """GPT2LMHeadModel: tied input/output embeddings, attention/MLP use transformers' ``Conv1D``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=MAX_POS,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=FFN,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with _seeded():
        return GPT2LMHeadModel(config)


def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        word_embed_proj_dim=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        ffn_dim=FFN,
        max_position_embeddings=MAX_POS,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with _seeded():
        return OPTForCausalLM(config)


def _t5_kwargs():
    return {
        "vocab_size": VOCAB,
        "d_model": HIDDEN,
        "d_kv": HIDDEN // HEADS,
        "d_ff": FFN,
        "num_layers": LAYERS,
        "num_decoder_layers": LAYERS,
        "num_heads": HEADS,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    with _seeded():
        return T5ForConditionalGeneration(T5Config(**_t5_kwargs()))


def tiny_mt5():
    from transformers import MT5Config, MT5ForConditionalGeneration

    with _seeded():
        return MT5ForConditionalGeneration(MT5Config(**_t5_kwargs()))


def tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN,
        max_position_embeddings=MAX_POS,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
    )
    with _seeded():
        return BartForConditionalGeneration(config)


def tiny_bert(task: str | None = "SEQ_CLS"):
    from transformers import BertConfig

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=MAX_POS,
        pad_token_id=0,
    )
    if task == "SEQ_CLS":
        from transformers import BertForSequenceClassification as cls

        config.num_labels = 2
    elif task == "TOKEN_CLS":
        from transformers import BertForTokenClassification as cls

        config.num_labels = 3
    elif task == "QUESTION_ANS":
        from transformers import BertForQuestionAnswering as cls
    elif task in (None, "FEATURE_EXTRACTION"):
        from transformers import BertModel as cls
    else:
        raise ValueError(f"tiny_bert: unsupported task {task!r}")
    with _seeded():
        return cls(config)


def tiny_whisper():
    """WhisperForConditionalGeneration; ``input_features`` are (B, 80, 2 * max_source_positions) = (B, 80, 32)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=80,
        d_model=HIDDEN,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN,
        max_source_positions=16,
        max_target_positions=MAX_POS,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
        # defaults reference the real 51865-token vocab; they only matter for generate()
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    with _seeded():
        return WhisperForConditionalGeneration(config)


def tiny_vit(num_labels: int = 3):
    """ViTForImageClassification: ``pixel_values`` (B, 3, 32, 32), 8x8 patches (16 tokens + CLS), a fresh
    ``classifier`` head Linear(32, num_labels); attention projections are ``q_proj`` / ``k_proj`` / ``v_proj``
    (transformers 5 names; 4.x called them ``query`` / ``key`` / ``value``)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        num_labels=num_labels,
    )
    with _seeded():
        return ViTForImageClassification(config)


# --------------------------------------------------------------------------------------------------
# plain-torch models (no transformers)


class MLP(nn.Module):
    """x: (B, 10) float -> (B, 2)."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2, bias=bias)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


class EmbModel(nn.Module):
    """x: (B, L) long in [0, 100) -> (B, L, 2)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.lin0 = nn.Linear(16, 2)

    def forward(self, x):
        return self.lin0(self.emb(x))


class Conv2dModel(nn.Module):
    """x: (B, 3, 8, 8) float -> (B, 2)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(8 * 8 * 8, 2)

    def forward(self, x):
        return self.lin0(self.flat(self.conv(x)))


class Conv1dModel(nn.Module):
    """x: (B, 4, 16) float -> (B, 2)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(8 * 16, 2)

    def forward(self, x):
        return self.lin0(self.flat(self.conv(x)))


class ResnetBlock(nn.Module):
    """diffusers-style ResNet block: GroupNorm -> SiLU -> conv1 -> GroupNorm -> SiLU -> conv2, plus the input."""

    def __init__(self, channels: int = HIDDEN, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.nonlinearity = nn.SiLU()

    def forward(self, x):
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        return x + h


class SelfAttention(nn.Module):
    """diffusers-style attention over the pixels of a feature map: ``to_q`` / ``to_k`` / ``to_v`` and
    ``to_out`` = [Linear, Dropout] (so the output projection is ``to_out.0``), GroupNorm in front, residual."""

    def __init__(self, channels: int = HIDDEN, heads: int = HEADS, groups: int = 8):
        super().__init__()
        self.heads = heads
        self.group_norm = nn.GroupNorm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x):
        b, c, hgt, wid = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)

        def split(t):  # (B, H*W, C) -> (B, heads, H*W, C / heads)
            return t.view(b, -1, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = split(self.to_q(h)), split(self.to_k(h)), split(self.to_v(h))
        h = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
        h = self.to_out[1](self.to_out[0](h))
        return x + h.transpose(1, 2).reshape(b, c, hgt, wid)


class UNetBlock(nn.Module):
    """A diffusers-style UNet mid block from plain torch modules (stands in for DreamBooth-style training).

    x: (B, 4, 8, 8) latents -> (B, 4, 8, 8) predicted noise. Conv2d targets: ``conv_in``, ``resnet.conv1``,
    ``resnet.conv2``, ``conv_out``; attention Linear targets: ``to_q``, ``to_k``, ``to_v``, ``to_out.0``.
    """

    def __init__(self, latent_channels: int = 4, channels: int = HIDDEN):
        super().__init__()
        self.conv_in = nn.Conv2d(latent_channels, channels, 3, padding=1)
        self.resnet = ResnetBlock(channels)
        self.attn = SelfAttention(channels)
        self.norm_out = nn.GroupNorm(8, channels)
        self.conv_out = nn.Conv2d(channels, latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.attn(self.resnet(self.conv_in(x)))
        return self.conv_out(nn.functional.silu(self.norm_out(h)))


def _seeded_build(cls: type[nn.Module]) -> Callable[[], nn.Module]:
    def build():
        with _seeded():
            return cls()

    build.__name__ = f"build_{cls.__name__}"
    return build


# --------------------------------------------------------------------------------------------------
# inputs


def _ids(batch_size: int, length: int = SEQ_LEN, seed: int = 1, low: int = 3, high: int = VOCAB):
    # ids >= 3 so that pad (0) / bos / eos never occur by accident
    return torch.randint(low, high, (batch_size, length), generator=_gen(seed))


def _mask(batch_size: int, length: int = SEQ_LEN, n_pad: int = 2) -> torch.Tensor:
    """All ones, except the last ``n_pad`` positions of row 1 (right padding) when batch_size > 1."""
    mask = torch.ones(batch_size, length, dtype=torch.long)
    if batch_size > 1:
        mask[1, length - n_pad :] = 0
    return mask


def _padded_ids(batch_size: int, seed: int = 1):
    ids = _ids(batch_size, seed=seed)
    mask = _mask(batch_size)
    return ids.masked_fill(mask == 0, 0), mask


def causal_lm_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    ids, mask = _padded_ids(batch_size)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def seq2seq_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    ids, mask = _padded_ids(batch_size)
    labels = _ids(batch_size, TGT_LEN, seed=2).contiguous()  # must be contiguous (view in the loss)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def seq_cls_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    ids, mask = _padded_ids(batch_size)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(batch_size) % 2}


def token_cls_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    ids, mask = _padded_ids(batch_size)
    labels = torch.randint(0, 3, (batch_size, SEQ_LEN), generator=_gen(3)).masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def qa_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    ids, mask = _padded_ids(batch_size)
    start = torch.arange(batch_size) % 3
    return {"input_ids": ids, "attention_mask": mask, "start_positions": start, "end_positions": start + 2}


def feature_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    ids, mask = _padded_ids(batch_size)
    return {"input_ids": ids, "attention_mask": mask}


def whisper_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    features = torch.randn(batch_size, 80, 32, generator=_gen(4))
    labels = _ids(batch_size, TGT_LEN, seed=2).contiguous()
    return {"input_features": features, "labels": labels}


def mlp_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch_size, 10, generator=_gen(5))}


def emb_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randint(0, 100, (batch_size, SEQ_LEN), generator=_gen(6))}


def conv2d_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch_size, 3, 8, 8, generator=_gen(7))}


def conv1d_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch_size, 4, 16, generator=_gen(8))}


def vit_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch_size, 3, 32, 32, generator=_gen(9)),
            "labels": torch.arange(batch_size) % 3}


def unet_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch_size, 4, 8, 8, generator=_gen(10))}


# --------------------------------------------------------------------------------------------------
# cases


@dataclass(frozen=True)
class TaskCase:
    name: str
    task_type: str | None  # PEFT TaskType value, e.g. "CAUSAL_LM"; None -> plain PeftModel
    build: Callable[[], nn.Module]
    make_inputs: Callable[[int], dict[str, torch.Tensor]]
    target_modules: list[str] = field(default_factory=list)
    output_key: str | None = "logits"  # None: the model returns a plain tensor

    @property
    def has_loss(self) -> bool:
        """Whether ``make_inputs`` includes labels, so that ``outputs.loss`` is populated."""
        return self.output_key is not None and any(
            k in self.make_inputs(1) for k in ("labels", "start_positions")
        )

    @property
    def is_custom(self) -> bool:
        """Plain torch model (not a transformers PreTrainedModel)."""
        return self.name.startswith("custom-")

    def __repr__(self) -> str:  # short ids in pytest output
        return f"TaskCase({self.name})"


def model_output(out: Any, key: str | None) -> torch.Tensor:
    """The tensor to compare from a model's output (``key`` None: ``out`` is already the tensor)."""
    if key is None:
        return out
    if isinstance(out, dict):  # ModelOutput is a dict subclass too
        return out[key]
    return getattr(out, key)


TASK_CASES: list[TaskCase] = [
    # CAUSAL_LM
    TaskCase("llama-causal", "CAUSAL_LM", tiny_llama, causal_lm_inputs, ["q_proj", "v_proj"]),
    TaskCase("gpt2-causal", "CAUSAL_LM", tiny_gpt2, causal_lm_inputs, ["c_attn"]),
    TaskCase("opt-causal", "CAUSAL_LM", tiny_opt, causal_lm_inputs, ["q_proj", "v_proj"]),
    # SEQ_2_SEQ_LM
    TaskCase("t5-seq2seq", "SEQ_2_SEQ_LM", tiny_t5, seq2seq_inputs, ["q", "v"]),
    TaskCase("bart-seq2seq", "SEQ_2_SEQ_LM", tiny_bart, seq2seq_inputs, ["q_proj", "v_proj"]),
    # SEQ_CLS
    TaskCase("bert-seqcls", "SEQ_CLS", lambda: tiny_bert("SEQ_CLS"), seq_cls_inputs, ["query", "value"]),
    TaskCase("llama-seqcls", "SEQ_CLS", lambda: tiny_llama("SEQ_CLS"), seq_cls_inputs, ["q_proj", "v_proj"]),
    # TOKEN_CLS
    TaskCase(
        "bert-tokcls", "TOKEN_CLS", lambda: tiny_bert("TOKEN_CLS"), token_cls_inputs, ["query", "value"]
    ),
    # QUESTION_ANS
    TaskCase(
        "bert-qa",
        "QUESTION_ANS",
        lambda: tiny_bert("QUESTION_ANS"),
        qa_inputs,
        ["query", "value"],
        output_key="start_logits",
    ),
    # FEATURE_EXTRACTION
    TaskCase(
        "bert-feat",
        "FEATURE_EXTRACTION",
        lambda: tiny_bert("FEATURE_EXTRACTION"),
        feature_inputs,
        ["query", "value"],
        output_key="last_hidden_state",
    ),
    TaskCase(
        "llama-feat",
        "FEATURE_EXTRACTION",
        lambda: tiny_llama("FEATURE_EXTRACTION"),
        feature_inputs,
        ["q_proj", "v_proj"],
        output_key="last_hidden_state",
    ),
    # speech: plain wrapper (PEFT's Seq2Seq wrapper injects input_ids and fails on Whisper)
    TaskCase("whisper", None, tiny_whisper, whisper_inputs, ["q_proj", "v_proj"]),
    # custom plain-torch models
    TaskCase("custom-mlp", None, _seeded_build(MLP), mlp_inputs, ["lin0"], output_key=None),
    TaskCase("custom-emb", None, _seeded_build(EmbModel), emb_inputs, ["emb"], output_key=None),
    TaskCase("custom-conv2d", None, _seeded_build(Conv2dModel), conv2d_inputs, ["conv"], output_key=None),
    TaskCase("custom-conv1d", None, _seeded_build(Conv1dModel), conv1d_inputs, ["conv"], output_key=None),
]

CASE_IDS: list[str] = [c.name for c in TASK_CASES]
CASES_BY_NAME: dict[str, TaskCase] = {c.name: c for c in TASK_CASES}


def cases(*task_types: str | None) -> list[TaskCase]:
    """The cases whose task_type is one of ``task_types`` (use ``None`` for the plain-wrapper cases)."""
    return [c for c in TASK_CASES if c.task_type in task_types]


# --------------------------------------------------------------------------------------------------
# tokenizer

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a tiny model learns to say hello world",
    "low rank adapters train only a few parameters",
    "this movie was great and i loved it",
    "this movie was bad and i hated it",
    "hello world, hello adapters! 0123456789",
    "The Quick Brown Fox. Jumps? Over: the lazy dog; yes.",
] * 4


def tiny_tokenizer(kind: str = "bpe", vocab_size: int = VOCAB):
    """A ``PreTrainedTokenizerFast`` trained in memory (offline).

    kind="bpe": byte-level BPE; kind="wordlevel": whitespace word-level. Special tokens come first:
    ``<pad>``=0, ``<eos>``=1, ``<unk>``=2, so ids match the tiny models' pad id 0 and stay < ``vocab_size``
    (the byte-level alphabet is limited to characters in the corpus; unseen characters map to ``<unk>``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    elif kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False
        )
    else:
        raise ValueError(f"tiny_tokenizer: unknown kind {kind!r}")
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    assert len(fast) <= vocab_size, len(fast)
    return fast
