"""Optimizers for LoRA training with the reference's names: LoRA+ (``create_loraplus_optimizer``) and LoRA-FA
(``LoraFAOptimizer``, ``create_lorafa_optimizer``)."""

from __future__ import annotations

from .lorafa import LoraFAOptimizer, create_lorafa_optimizer
from .loraplus import create_loraplus_optimizer

__all__ = ["LoraFAOptimizer", "create_lorafa_optimizer", "create_loraplus_optimizer"]
