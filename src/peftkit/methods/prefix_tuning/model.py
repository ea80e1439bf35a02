"""``PrefixEncoder``: the key/value prefix of every layer, stored or produced by a projection MLP."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ConfigError, ShapeMismatchError
from ...layers.prompt import VirtualTokenEncoder
from .config import PrefixTuningConfig


class PrefixEncoder(VirtualTokenEncoder):
    """``forward(ids: (B, nvt)) -> (B, nvt, num_layers * 2 * token_dim)``.

    Without projection (and always in inference mode): ``embedding: (nvt, num_layers * 2 * token_dim)``. With
    ``prefix_projection``: ``embedding: (nvt, token_dim)`` then ``transform = Linear(token_dim, h) Tanh
    Linear(h, num_layers * 2 * token_dim)``. ``init_weights="zero"`` zeroes the stored prefix or the last Linear.
    """

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        assert config.num_virtual_tokens is not None and config.token_dim is not None and config.num_layers
        dim, nvt = config.token_dim, config.num_virtual_tokens
        out = config.num_layers * 2 * dim
        if config.prefix_projection and not config.inference_mode:
            self.has_head = True
            hidden = config.encoder_hidden_size or dim
            self.embedding = nn.Embedding(nvt, dim)
            self.transform = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, out))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(nvt, out)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        """``prefix: (B, nvt)`` token indices (the reference's parameter name) -> ``(B, nvt, num_layers * 2 * dim)``."""
        embeds = self.embedding(prefix)
        return self.transform(embeds) if self.has_head else embeds

    def load_prompt_embeddings(self, prompt_embeddings: torch.Tensor) -> None:
        """Copy the flattened prefix ``prompt_embeddings: (nvt, num_layers * 2 * token_dim)`` (as saved) into
        ``embedding``; impossible with a projection head (its inputs cannot be recovered), as the reference."""
        if self.has_head:
            raise ConfigError("prefix_projection", True, "flattened prompt embeddings cannot be loaded into an "
                              "encoder with a projection head; allowed: prefix_projection=False (or inference_mode)")
        if prompt_embeddings.shape != self.embedding.weight.shape:
            raise ShapeMismatchError(f"prompt_embeddings has shape {tuple(prompt_embeddings.shape)}; allowed: "
                                     f"{tuple(self.embedding.weight.shape)}")
        with torch.no_grad():
            self.embedding.weight.copy_(prompt_embeddings.to(self.embedding.weight.device))
