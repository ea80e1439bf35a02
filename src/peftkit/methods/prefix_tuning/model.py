"""``PrefixEncoder``: the key/value prefix of every layer, stored or produced by a projection MLP."""

from __future__ import annotations

import torch
from torch import nn

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

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)
        return self.transform(embeds) if self.has_head else embeds
