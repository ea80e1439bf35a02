"""``PromptTuningConfig``: soft prompts prepended to the input embeddings (the reference's fields and rules)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from ...config import check
from ...types import PeftType
from ..prompt.config import PromptLearningConfig


class PromptTuningInit(str, enum.Enum):
    """How the virtual-token embeddings start."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"

    def __str__(self) -> str:
        return self.value


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``num_virtual_tokens`` trainable vectors prepended to the input embeddings.

    Args:
        prompt_tuning_init: ``RANDOM`` (N(0, 1)), ``SAMPLE_VOCAB`` (rows of the word-embedding matrix at random token
            ids) or ``TEXT`` (the embeddings of ``prompt_tuning_init_text``, repeated or cut to the number of virtual
            tokens).
        prompt_tuning_init_text: the text for ``TEXT``.
        tokenizer_name_or_path: the tokenizer for ``TEXT`` (loaded with ``AutoTokenizer.from_pretrained``).
        tokenizer_kwargs: extra arguments for the tokenizer (``TEXT`` only; ``trust_remote_code`` is dropped).
    """

    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PROMPT_TUNING
        allowed = [m.value for m in PromptTuningInit]
        check(str(self.prompt_tuning_init) in allowed, "prompt_tuning_init", self.prompt_tuning_init,
              f"allowed: {allowed}")
        self.prompt_tuning_init = PromptTuningInit(str(self.prompt_tuning_init))
        text = self.prompt_tuning_init == PromptTuningInit.TEXT
        check(not (text and not self.tokenizer_name_or_path), "tokenizer_name_or_path", self.tokenizer_name_or_path,
              "prompt_tuning_init='TEXT' needs a tokenizer name or path")
        check(not (text and self.prompt_tuning_init_text is None), "prompt_tuning_init_text",
              self.prompt_tuning_init_text, "prompt_tuning_init='TEXT' needs the init text")
        check(not (self.tokenizer_kwargs and not text), "tokenizer_kwargs", self.tokenizer_kwargs,
              "tokenizer_kwargs are only allowed with prompt_tuning_init='TEXT'")
        check(self.tokenizer_kwargs is None or isinstance(self.tokenizer_kwargs, dict), "tokenizer_kwargs",
              self.tokenizer_kwargs, "allowed: None or a dict")
