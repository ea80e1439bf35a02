"""``PromptEncoder`` (P-tuning): virtual-token embeddings reparameterised by an MLP or LSTM head."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ...errors import PeftWarning
from ...layers.prompt import VirtualTokenEncoder
from .config import PromptEncoderConfig, PromptEncoderReparameterizationType

_DEFAULT_NUM_LAYERS = 2


class PromptEncoder(VirtualTokenEncoder):
    """``embedding: (nvt * num_transformer_submodules, d)``; ``forward(ids: (B, n)) -> (B, n, d)``.

    Training mode builds the head (parameter names as in the reference): MLP ``mlp_head = Linear(d,h) ReLU
    Linear(h,h) ReLU Linear(h,d)``; LSTM ``lstm_head = LSTM(d, h, encoder_num_layers, bidirectional)`` and
    ``mlp_head = Linear(2h,2h) ReLU Linear(2h,d)``. Inference mode builds only the embedding, which then holds
    the saved output.
    """

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        assert config.num_virtual_tokens is not None and config.token_dim is not None
        dim = config.token_dim
        hidden = config.encoder_hidden_size or dim
        self.encoder_type = PromptEncoderReparameterizationType(str(config.encoder_reparameterization_type))
        self.embedding = nn.Embedding(config.num_virtual_tokens * (config.num_transformer_submodules or 1), dim)
        if config.inference_mode:
            return
        self.has_head = True
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
            return
        if config.encoder_num_layers != _DEFAULT_NUM_LAYERS:
            warnings.warn(f"for MLP, the argument `encoder_num_layers` is ignored. Exactly {_DEFAULT_NUM_LAYERS} "
                          "MLP layers are used.", PeftWarning, stacklevel=2)
        self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                      nn.Linear(hidden, dim))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)
        if not self.has_head:
            return embeds
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            embeds = self.lstm_head(embeds)[0]
        return self.mlp_head(embeds)
