"""Shared setup of the LoRA variant tests (``test_kasa.py``, ``test_velora.py``) and of the tied-embedding LoRA tests
(``test_lora_tied_targets.py``, ``test_lora_trainable_tokens.py``): tiny models, fixed inputs, deterministic
perturbation of the adapter tensors, the saved files, and the save/load and merge checks both variant files run.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit

WEIGHTS = "adapter_model.safetensors"
_T = TypeVar("_T")


# ---------------------------------------------------------------------------------------------- models and inputs
class TwoLinear(nn.Module):
    """``x: (..., in) -> (..., out)`` through ``fc1: in -> hidden``, a ReLU and ``fc2: hidden -> out``."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def two_linear(in_features: int, hidden: int, out_features: int) -> TwoLinear:
    """A :class:`TwoLinear` with the weights of seed 0 (every call gives the same model)."""
    torch.manual_seed(0)
    return TwoLinear(in_features, hidden, out_features)


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    """A standard normal tensor of ``shape`` from its own generator (the global RNG is untouched)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tiny_llama_tied(tied: bool = True) -> nn.Module:
    """``tests.models.tiny_llama`` (seed 0) in eval mode; with ``tied`` its ``lm_head`` shares the input embedding's
    weight (``tie_word_embeddings=True``)."""
    from tests.models import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama()
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model.eval()


def token_ids() -> torch.Tensor:
    """``(2, 6)`` token ids of the tiny Llama's vocabulary (ids 3, 5 and 60 in both rows)."""
    return torch.tensor([[1, 3, 7, 5, 60, 9], [60, 2, 3, 4, 5, 6]])


def logits(model: nn.Module) -> torch.Tensor:
    """``model``'s logits on :func:`token_ids`, without autograd."""
    with torch.no_grad():
        return model(token_ids()).logits


# ---------------------------------------------------------------------------------------------- adapters
def perturb_adapter(model: nn.Module, seed: int, scale: float, markers: tuple[str, ...] = ("lora_",)) -> None:
    """Add ``scale * N(0, 1)`` (generator seeded ``seed``, parameters in ``named_parameters`` order) to every
    parameter whose name contains one of ``markers``, each storage once (the reference's tied head factors view
    the embedding's)."""
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            ptr = param.untyped_storage().data_ptr()
            if any(m in name for m in markers) and ptr not in seen:
                seen.add(ptr)
                param.add_(torch.randn(param.shape, generator=gen) * scale)


def quiet(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """``fn(*args, **kwargs)`` with warnings silenced (the reference's deprecations and notices)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def saved_keys(path: str | os.PathLike[str]) -> set[str]:
    """The tensor names of the adapter saved in ``path``."""
    return set(load_file(os.path.join(path, WEIGHTS)))


def saved_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``adapter_config.json`` saved in ``path``."""
    return json.loads(Path(path, "adapter_config.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- shared checks
def check_save_load_round_trip(model: nn.Module, fresh_base: Callable[[], nn.Module], x: torch.Tensor,
                               tmp_path: Path) -> list[peftkit.PeftModel]:
    """Save ``model`` and load it on ``fresh_base()`` in peftkit (eval, trainable, ``low_cpu_mem_usage``): the
    outputs on ``x`` are bit-identical (same kernels on the same weights). Returns the loaded models."""
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(x)
    loaded_models = []
    for trainable, low_mem in ((False, False), (True, False), (False, True)):
        loaded = peftkit.PeftModel.from_pretrained(fresh_base(), tmp_path, is_trainable=trainable,
                                                   low_cpu_mem_usage=low_mem)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)  # exact: loaded bits, same kernels, same x
        loaded_models.append(loaded)
    return loaded_models


def check_merge_matches_reference(model: nn.Module, fresh_base: Callable[[], nn.Module], x: torch.Tensor,
                                  tmp_path: Path, tol: dict[str, float],
                                  after_unmerge: Callable[[nn.Module, torch.Tensor], None]) -> None:
    """``merge_adapter`` keeps ``model``'s outputs on ``x`` (within ``tol``: merged weights run other kernels);
    ``after_unmerge(model, expected)`` checks the state after ``unmerge_adapter``; ``merge_and_unload(
    safe_merge=True)`` gives the adapted outputs and those of the reference's ``merge_and_unload`` of the saved
    adapter on ``fresh_base()``."""
    import peft

    with torch.no_grad():
        expected = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), expected, **tol)
        model.unmerge_adapter()
        after_unmerge(model, expected)
        model.save_pretrained(tmp_path)
        ours = model.merge_and_unload(safe_merge=True)(x)
        ref = peft.PeftModel.from_pretrained(fresh_base(), tmp_path).merge_and_unload()(x)
    torch.testing.assert_close(ours, expected, **tol)
    torch.testing.assert_close(ours, ref, **tol)


def check_typed_sub_config_error(ours: type, ref: type, prefix: str, kwargs: dict[str, Any], error: type,
                                 builtin: type) -> None:
    """``ref(**kwargs)`` (the reference's sub-config) raises ``builtin``; ``ours(**kwargs)`` raises the typed
    ``error``, an instance of ``builtin`` too, whose message names ``<prefix>.<field>`` (the first key)."""
    with pytest.raises(builtin):
        ref(**kwargs)
    name = next(iter(kwargs))
    with pytest.raises(error, match=f"{prefix}.{name}") as info:
        ours(**kwargs)
    assert isinstance(info.value, builtin)
