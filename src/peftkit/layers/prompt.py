"""Prompt encoders and their holder: the adapter state of the prompt-learning methods.

A prompt-learning adapter is one encoder that turns ``n`` virtual-token ids into vectors (``PromptEmbedding``,
P-tuning's ``PromptEncoder``, ``PrefixEncoder``). Its checkpoint is a single tensor under the absolute key
``prompt_embeddings``: the encoder's output for every virtual token (not the weights of an MLP/LSTM head), so a
saved adapter is always loaded into a plain embedding.
"""

from __future__ import annotations

import torch
from torch import nn

#: the one checkpoint key of a prompt-learning adapter
PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"


class VirtualTokenEncoder(nn.Module):
    """Base of the prompt encoders: ``embedding: (num_tokens, dim)`` optionally followed by a trainable head.

    ``forward(indices: (B, n) long) -> (B, n, out_dim)``. Subclasses set ``has_head`` when their output is computed
    by a head (P-tuning's MLP/LSTM, prefix tuning's projection); in inference mode no head is built and the output is
    ``embedding.weight`` itself.
    """

    embedding: nn.Embedding
    has_head: bool = False

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)

    @property
    def num_tokens(self) -> int:
        return self.embedding.num_embeddings

    def output(self) -> torch.Tensor:
        """The encoder's output for every virtual token: ``(num_tokens, out_dim)`` (differentiable)."""
        if not self.has_head:
            return self.embedding.weight
        ids = torch.arange(self.num_tokens, device=self.embedding.weight.device).unsqueeze(0)
        return self(ids)[0]


class PromptEncoderDict(nn.ModuleDict):
    """``{adapter_name: VirtualTokenEncoder}``. Its checkpoint keys are absolute (``prompt_embeddings``), not
    relative to where the holder sits in the model."""

    def adapter_state(self, adapter_name: str) -> dict[str, tuple[str | None, torch.Tensor]]:
        """``{"prompt_embeddings": (in-memory key relative to this holder, tensor)}``.

        The in-memory key is None when the tensor is computed by a head (P-tuning and projected prefix tuning in
        training mode): such a state can be saved but not loaded into (load it in inference mode instead).
        """
        if adapter_name not in self:
            return {}
        encoder = self[adapter_name]
        if encoder.has_head:
            with torch.no_grad():
                return {PROMPT_EMBEDDINGS_KEY: (None, encoder.output())}
        return {PROMPT_EMBEDDINGS_KEY: (f"{adapter_name}.embedding.weight", encoder.embedding.weight)}
