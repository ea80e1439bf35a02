"""``TrainableTokensConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig, as_set, check, is_int
from ...errors import ConfigTypeError
from ...types import PeftType
from ..lora.config import _check_modules_field


def check_token_indices(name: str, indices: object) -> None:
    """Validate a list of token indices: a non-empty list of distinct ints >= 0 (the upper bound, the size of the
    embedding, is checked against the model when the layer is planned).

    Raises:
        ConfigTypeError: not a list/tuple of ints (bools are not ints here).
        ConfigError: empty, negative or repeated entries.
    """
    if not isinstance(indices, (list, tuple)) or not all(is_int(i) for i in indices):
        raise ConfigTypeError(name, indices, "allowed: a list of int token indices, e.g. [128000, 128001]")
    check(len(indices) > 0, name, indices, "allowed: a non-empty list of token indices")
    check(all(i >= 0 for i in indices), name, indices, "allowed: token indices >= 0")
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    check(not repeated, name, indices, f"allowed: distinct token indices; repeated: {repeated}")


@dataclass
class TrainableTokensConfig(PeftConfig):
    """Configuration of a TrainableTokens adapter (field names and defaults of the reference's config).

    Only the rows ``token_indices`` of an embedding are trained: each adapted embedding holds a
    ``trainable_tokens_delta: (len(token_indices), embedding_dim)`` that *replaces* those rows in the forward pass
    (initialised to a copy of them, so a fresh adapter is an identity; ``init_weights=False``: random rows).
    ``target_modules=None`` targets the model's input embedding (``get_input_embeddings()``, else
    ``embed_tokens``). With ``tie_word_embeddings`` the module sharing the embedding's weight (the output
    embedding) gets a tied layer that uses the same rows.
    """

    token_indices: list[int] = field(default_factory=list)
    target_modules: list[str] | set[str] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.TRAINABLE_TOKENS
        self.target_modules = as_set(self.target_modules)
        _check_modules_field("target_modules", self.target_modules)
        check_token_indices("token_indices", self.token_indices)
        self.token_indices = list(self.token_indices)
        check(isinstance(self.init_weights, bool), "init_weights", self.init_weights, "allowed: True or False")
