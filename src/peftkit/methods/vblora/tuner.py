"""``VBLoRAModel``'s extra methods: the reference's savable-parameter counts."""

from __future__ import annotations

from typing import Any

from .bank import index_dtype


class VBLoRATunerMixin:
    """Mixed into ``VBLoRAModel``: ``get_nb_savable_parameters`` / ``print_savable_parameters``."""

    peft_config: dict[str, Any]

    def get_nb_savable_parameters(self, adapter: str = "default") -> tuple[int, int]:
        """``(VB-LoRA parameters to save, other trainable parameters)`` in float32 equivalents, as the reference:
        with ``save_only_topk_weights`` the logits count as their ``topk - 1`` weights plus ``topk`` indices (an
        ``int8`` index counts a quarter, ``int16`` a half, ``int64`` two)."""
        logits = bank = other = 0
        for name, param in self.named_parameters():  # type: ignore[attr-defined]
            if "vblora_logits" in name:
                logits += param.numel()
            elif "vblora_vector_bank" in name:
                bank += param.numel()
            elif param.requires_grad:
                other += param.numel()
        config = self.peft_config[adapter]
        if not config.save_only_topk_weights:
            return bank + logits, other
        factor = index_dtype(config.num_vectors).itemsize / 4
        per_vector = logits / config.num_vectors
        return int(bank + per_vector * (config.topk - 1) + per_vector * config.topk * factor), other

    def print_savable_parameters(self) -> None:
        """Print the counts of :meth:`get_nb_savable_parameters` for the default adapter."""
        vblora, other = self.get_nb_savable_parameters()
        print(f"VB-LoRA params to-be-saved (float32-equivalent): {vblora:,d} "
              f"|| total params to-be-saved: {(vblora + other):,d}")
