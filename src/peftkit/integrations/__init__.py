"""Glue between peftkit and the training ecosystem (transformers ``Trainer``, TRL, accelerate, plain transformers
models). Names load lazily: importing ``peftkit.integrations`` imports neither transformers nor TRL.
"""

from __future__ import annotations

import importlib
from typing import Any

#: exported name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    # transformers Trainer (trainer.py)
    "AdapterTrainerMixin": "trainer",
    "AdapterTrainer": "trainer",
    "AdapterSeq2SeqTrainer": "trainer",
    "make_adapter_trainer": "trainer",
    "find_adapter_model": "trainer",
    "save_adapter_checkpoint": "trainer",
    "load_adapter_checkpoint": "trainer",
    # TRL (trl.py)
    "AdapterSFTTrainer": "trl",
}

__all__ = [  # resolved lazily by __getattr__
    "AdapterSFTTrainer",
    "AdapterSeq2SeqTrainer",
    "AdapterTrainer",
    "AdapterTrainerMixin",
    "find_adapter_model",
    "load_adapter_checkpoint",
    "make_adapter_trainer",
    "save_adapter_checkpoint",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
