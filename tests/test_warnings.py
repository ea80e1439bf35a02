"""The warnings the reference gives for likely mistakes, given by peftkit in the same cases (docs/warnings.md).

Properties:
- each case emits a :class:`PeftWarning` (a ``UserWarning``; a ``RuntimeWarning`` too where the reference uses that
  category) whose message names the field or module and what to do;
- where it is cheap, the reference warns in the same case (``interop``).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from models import MLP, tiny_gpt2

from peftkit import LoraConfig, PeftWarning, get_peft_model
from peftkit.errors import PeftRuntimeWarning


def _lora(lib: Any, **kwargs: Any) -> Any:
    return lib.LoraConfig(**{"target_modules": ["lin0"], **kwargs})


def _merged_two(lib: Any) -> Any:
    """An MLP with adapters 'default' (merged) and 'b'."""
    model = lib.get_peft_model(MLP(), _lora(lib))
    model.add_adapter("b", _lora(lib))
    model.merge_adapter()
    return model


def _two(lib: Any) -> Any:
    model = lib.get_peft_model(MLP(), _lora(lib))
    model.add_adapter("b", _lora(lib))
    return model


def _merge_more(lib: Any) -> None:
    model = _merged_two(lib)
    model.base_model.merge_adapter(["b"])


def _save_ungathered(lib: Any) -> None:
    """Save adapter parameters that are empty on this rank, as un-gathered ZeRO-3 / FSDP shards are."""
    model = lib.get_peft_model(MLP(), _lora(lib))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = torch.empty(0)
    lib.get_peft_model_state_dict(model)


def _convert_plain_init(lib: Any) -> None:
    """``path_initial_model_for_weight_conversion`` on an adapter whose init left the base weight unchanged."""
    model = lib.get_peft_model(MLP(), _lora(lib, init_lora_weights=False))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(os.path.join(tmp, "init"))
        model.save_pretrained(os.path.join(tmp, "out"),
                              path_initial_model_for_weight_conversion=os.path.join(tmp, "init"))


#: (id, action taking the library module, category, message regex); each action runs with peftkit and, for the
#: interop check, with the reference (same code: the public APIs agree)
CASES: list[tuple[str, Callable[[Any], Any], type[Warning], str]] = [
    ("lora_bias-without-base-bias",
     lambda lib: lib.get_peft_model(MLP(bias=False), _lora(lib, lora_bias=True)), UserWarning,
     r"lora_bias=True.*\['lin0'\].*no bias"),
    ("pissa-rslora-patterns",
     lambda lib: lib.LoraConfig(init_lora_weights="pissa", use_rslora=True, rank_pattern={"lin0": 2}),
     UserWarning, r"init_lora_weights='pissa' with use_rslora=True and rank_pattern/alpha_pattern"),
    ("olora-rslora-patterns",
     lambda lib: lib.LoraConfig(init_lora_weights="olora", use_rslora=True, alpha_pattern={"lin0": 2}),
     UserWarning, r"init_lora_weights='olora' with use_rslora=True"),
    ("exclude_modules-matching-nothing",
     lambda lib: lib.get_peft_model(MLP(), _lora(lib, exclude_modules=["lin7"])), UserWarning,
     r"exclude_modules entries \['lin7'\] matched no module.*closest names: .*lin0"),
    ("rank_pattern-key-matching-nothing",
     lambda lib: lib.get_peft_model(MLP(), _lora(lib, rank_pattern={"lin9": 2})), RuntimeWarning,
     r"rank_pattern key 'lin9' matched none of the targeted modules"),
    ("tied-embeddings-targeted",
     lambda lib: lib.get_peft_model(tiny_gpt2(), lib.LoraConfig(target_modules=["lm_head"])), UserWarning,
     r"ties its input and output embeddings.*\['lm_head'\]"),
    ("fan_in_fan_out-on-linear",
     lambda lib: lib.get_peft_model(MLP(), _lora(lib, fan_in_fan_out=True)), UserWarning,
     r"fan_in_fan_out=True.*\['lin0'\].*nn.Linear"),
    ("set_adapter-while-merged", lambda lib: _merged_two(lib).set_adapter("b"), UserWarning,
     r"set_adapter while adapters \['default'\] are merged.*unmerge_adapter\(\)"),
    ("delete-the-active-adapter", lambda lib: _two(lib).delete_adapter("default"), UserWarning,
     r"Adapter default was active which is now deleted. Setting active adapter to b"),
    ("unmerge-when-nothing-merged", lambda lib: _two(lib).unmerge_adapter(), UserWarning,
     r"Already unmerged. Nothing to do"),
    ("merge-on-top-of-merged", _merge_more, UserWarning,
     r"Already following adapters were merged default. You are now additionally merging b"),
    ("empty-tensors-at-save", _save_ungathered, UserWarning,
     r"tensor\(s\) are empty.*not gathered before saving"),
    ("weight-conversion-of-a-plain-init", _convert_plain_init, UserWarning,
     r"path_initial_model_for_weight_conversion is meant for PiSSA.*init_lora_weights=False"),
    ("loftq_config-without-loftq-init",
     lambda lib: lib.LoraConfig(loftq_config={"loftq_bits": 4}), UserWarning,
     r"loftq_config is given but ignored because init_lora_weights=True"),
    ("revision-argument-overrides-the-config",
     lambda lib: lib.get_peft_model(MLP(), _lora(lib, revision="v1"), revision="v2"), UserWarning,
     r"revision 'v1'.*'v2' overrides it"),
    ("pissa-next-to-another-adapter",
     lambda lib: lib.get_peft_model(MLP(), _lora(lib, init_lora_weights="pissa")).add_adapter("b", _lora(lib)),
     UserWarning, r"'pissa' \(PiSSA/OLoRA\) changes the base weights of the model and should thus not be used with other"),
]
IDS = [case[0] for case in CASES]
#: cases where the reference's warning needs another path to trigger
NOT_CHECKED_ON_REFERENCE = {
    "weight-conversion-of-a-plain-init": "the reference's save_pretrained sets init_lora_weights=True on its copy of "
                                         "the config before the check, so its warning never fires",
    "pissa-next-to-another-adapter": "the reference checks this in PeftModel.load_adapter only; peftkit also warns "
                                     "in add_adapter (the same mistake)",
}


@pytest.mark.parametrize(("name", "action", "category", "pattern"), CASES, ids=IDS)
def test_peftkit_warns(name, action, category, pattern):
    import peftkit

    torch.manual_seed(0)
    with pytest.warns(PeftWarning, match=pattern) as record:
        action(peftkit)
    hits = [w for w in record if issubclass(w.category, PeftWarning) and w.category is not None]
    assert any(issubclass(w.category, category) for w in hits)  # the reference's category too


REFERENCE_CASES = [case for case in CASES if case[0] not in NOT_CHECKED_ON_REFERENCE]


@pytest.mark.interop
@pytest.mark.parametrize(("name", "action", "category", "pattern"), REFERENCE_CASES,
                         ids=[case[0] for case in REFERENCE_CASES])
def test_reference_warns_in_the_same_case(name, action, category, pattern):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        action(peft)
    assert any(issubclass(w.category, category) for w in record), [str(w.message)[:80] for w in record]


def test_no_spurious_warnings_on_plain_use():
    """The new warnings stay quiet when nothing is wrong: targets with biases, used excludes and patterns, a
    single unmerge after a merge, unload of an unmerged model."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0", "lin1"], exclude_modules=["lin1"],
                                                 rank_pattern={"lin0": 2}, lora_bias=True))
        model.merge_adapter()
        model.unmerge_adapter()
        model.set_adapter("default")
        model.base_model.unload()


def test_rank_pattern_warning_is_a_runtime_warning_as_in_the_reference():
    assert issubclass(PeftRuntimeWarning, RuntimeWarning) and issubclass(PeftRuntimeWarning, PeftWarning)
