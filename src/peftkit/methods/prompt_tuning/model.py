"""``PromptEmbedding``: the virtual-token table of prompt tuning and its three initialisations."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...layers.prompt import VirtualTokenEncoder
from .config import PromptTuningConfig, PromptTuningInit


class PromptEmbedding(VirtualTokenEncoder):
    """``embedding: (nvt * num_transformer_submodules, token_dim)``; ``forward(ids: (B, n)) -> (B, n, token_dim)``.

    Init (training mode only; in inference mode the weights are loaded): ``RANDOM`` keeps ``nn.Embedding``'s N(0, 1);
    ``SAMPLE_VOCAB`` copies the word-embedding rows of uniformly drawn token ids; ``TEXT`` copies the rows of the
    tokenised ``prompt_tuning_init_text``, repeated (ceil) or cut to the number of virtual tokens. Copies are fp32.
    """

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module | None) -> None:
        super().__init__()
        assert config.num_virtual_tokens is not None and config.token_dim is not None
        total = config.num_virtual_tokens * (config.num_transformer_submodules or 1)
        self.embedding = nn.Embedding(total, config.token_dim)
        if config.inference_mode or config.prompt_tuning_init == PromptTuningInit.RANDOM:
            return
        if word_embeddings is None:
            raise ValueError(f"prompt_tuning_init={str(config.prompt_tuning_init)!r} needs the model's word "
                             "embeddings, which were not found; use prompt_tuning_init='RANDOM'")
        if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
            vocab = _vocab_size(word_embeddings)
            ids = torch.randint(0, vocab, (total,), dtype=torch.long)
        else:
            ids = torch.tensor(text_init_ids(config, total), dtype=torch.long)
        weight = _weight_of(word_embeddings)
        with torch.no_grad():
            rows = word_embeddings(ids.to(weight.device)).detach().clone().to(torch.float32)
        self.embedding.weight = nn.Parameter(rows)


def text_init_ids(config: PromptTuningConfig, total: int) -> list[int]:
    """The token ids of ``prompt_tuning_init_text``, repeated (ceil) or cut to ``total``."""
    from transformers import AutoTokenizer

    kwargs = {k: v for k, v in (config.tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} tokenises to no tokens")
    return (ids * math.ceil(total / len(ids)))[:total]


def _weight_of(module: nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else next(module.parameters())


def _vocab_size(module: nn.Module) -> int:
    return int(getattr(module, "num_embeddings", None) or _weight_of(module).shape[0])
