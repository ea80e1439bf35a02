"""Conformance of the prompt-learning methods (``kind == "prompt"``: prompt tuning, P-tuning, prefix tuning).

Parametrized over every registered prompt method x its example configs (P-tuning MLP and LSTM, prefix tuning with
and without projection) x the transformers text cases of ``TASK_CASES`` (Whisper and the custom models take no
``input_ids``). The identity-at-init check of the adapter methods does not apply (virtual tokens change the outputs
from the start); these invariants replace it:

* ``disable_adapter()`` gives the base model's outputs (1e-6) and the adapted outputs return after it;
* output shapes: prompt tuning / P-tuning make per-token outputs ``nvt + S`` long (SEQ_CLS and the seq2seq decoder
  keep theirs), prefix tuning keeps every length;
* only the active prompt encoder (and the SEQ_CLS / TOKEN_CLS / QA head copies) trains; one optimizer step changes
  only those tensors, every base parameter stays bit-identical;
* save -> load: a single ``prompt_embeddings`` key of the right shape, loaded into a plain embedding (1e-5), and
  loading as trainable is refused;
* two adapters, the operations that cannot work with virtual tokens, and invalid configs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conformance_helpers import (
    BATCH,
    HEAD_TASKS,
    PROMPT_METHODS,
    TOL_IDENTITY,
    add_adapter,
    assert_close,
    assert_differs,
    base_model,
    base_output,
    clone_params,
    config_has_field,
    loss_of,
    output,
    perturb_trainable,
    wrap,
)
from models import TASK_CASES, TaskCase
from safetensors.torch import load_file

from peftkit import (
    ConfigError,
    MergeError,
    ModulesToSaveWrapper,
    PeftConfig,
    PeftModel,
    PeftWarning,
    get_peft_model,
)
from peftkit.registry import MethodSpec

TOL_LOAD = 1e-5
#: the transformers text cases (Whisper and the custom models have task_type None)
TEXT_CASES = [c for c in TASK_CASES if c.task_type is not None]
#: task types whose outputs are per input token (the virtual tokens lengthen them under "embeddings" routing)
PER_TOKEN_TASKS = ("CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
ENCODER = "base_model.prompt_encoder."


@dataclass(frozen=True)
class PromptExample:
    """One example config of one prompt-learning method (``kwargs`` has everything but ``task_type``)."""

    spec: MethodSpec
    index: int
    kwargs: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.spec.peft_type}-{self.index}"

    @property
    def nvt(self) -> int:
        return int(self.kwargs["num_virtual_tokens"])

    @property
    def prefix(self) -> bool:
        return self.spec.prompt_routing == "prefix"

    def config(self, case: TaskCase, **overrides: Any) -> PeftConfig:
        return self.spec.config_cls(**{"task_type": case.task_type, **self.kwargs, **overrides})


EXAMPLES = [PromptExample(spec, i, dict(kw)) for spec in PROMPT_METHODS for i, kw in enumerate(spec.example_configs)]
ALL_PROMPT = [pytest.param(ex, case, id=f"{ex.id}-{case.name}") for ex in EXAMPLES for case in TEXT_CASES]


def test_the_suite_covers_the_prompt_methods_and_text_cases() -> None:
    """The parametrization is not empty: three methods, both variants of P-tuning and prefix tuning, 11 cases."""
    assert {str(m.peft_type) for m in PROMPT_METHODS} == {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"}
    variants = {(str(e.spec.peft_type), str(e.kwargs.get("encoder_reparameterization_type", "MLP")),
                 bool(e.kwargs.get("prefix_projection", False))) for e in EXAMPLES}
    assert {("P_TUNING", "MLP", False), ("P_TUNING", "LSTM", False)} <= variants
    assert {("PREFIX_TUNING", "MLP", False), ("PREFIX_TUNING", "MLP", True)} <= variants
    assert len(TEXT_CASES) == 11 and not any(c.name == "whisper" or c.is_custom for c in TEXT_CASES)


def expected_output_shape(ex: PromptExample, case: TaskCase, base_shape: torch.Size) -> tuple[int, ...]:
    shape = list(base_shape)
    if not ex.prefix and case.task_type in PER_TOKEN_TASKS:
        shape[1] += ex.nvt
    return tuple(shape)


def expected_checkpoint_shape(ex: PromptExample, case: TaskCase) -> tuple[int, int]:
    """``prompt_embeddings``: ``(nvt * submodules, hidden)`` for virtual tokens; ``(nvt, layers * 2 * kv_dim)`` for a
    prefix, where ``kv_dim`` is the width of the key/value projections (``kv_heads * head_dim`` on GQA models)."""
    cfg = base_model(case).config
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    if ex.prefix:
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        return ex.nvt, cfg.num_hidden_layers * 2 * kv_heads * (hidden // heads)
    return ex.nvt * (2 if case.task_type == "SEQ_2_SEQ_LM" else 1), hidden


def expected_trainable(model: PeftModel, case: TaskCase, adapter: str = "default") -> set[str]:
    """The active encoder's tensors and, for the head tasks, the head copies of the adapter."""
    names = [n for n, _ in model.named_parameters()]
    heads = {n for n in names if f".modules_to_save.{adapter}." in n}
    assert bool(heads) == (case.task_type in HEAD_TASKS)
    return {n for n in names if n.startswith(f"{ENCODER}{adapter}.")} | heads


# ---------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("ex, case", ALL_PROMPT)
def test_shapes_and_disable_adapter(ex: PromptExample, case: TaskCase) -> None:
    """Shapes follow the routing; inside ``disable_adapter()`` the base outputs (1e-6), after it the adapted ones."""
    base = base_output(case)
    config = ex.config(case)
    before = config.to_dict()
    model = wrap(case, config)
    assert config.to_dict() == before, "get_peft_model modified the user's config"
    adapted = output(model, case)
    assert tuple(adapted.shape) == expected_output_shape(ex, case, base.shape)
    if adapted.shape == base.shape:
        assert_differs(adapted, base)
    else:  # compare the outputs of the real tokens (the last S)
        assert_differs(adapted[:, -base.shape[1]:], base)
    with model.disable_adapter():
        assert_close(output(model, case), base, TOL_IDENTITY, "disabled vs base")
    assert torch.equal(output(model, case), adapted), "adapted outputs did not return after disable_adapter()"
    if case.task_type == "SEQ_2_SEQ_LM":
        inputs = case.make_inputs(BATCH)
        with torch.no_grad():
            out = model(**inputs)
        assert out.logits.shape[1] == inputs["labels"].shape[1]  # the decoder length is unchanged


# ---------------------------------------------------------------------------------------------- trainability


@pytest.mark.parametrize("ex, case", ALL_PROMPT)
def test_only_the_prompt_encoder_and_heads_train(ex: PromptExample, case: TaskCase) -> None:
    """requires_grad exactly on the active encoder (+ head copies); one SGD step changes every one of those tensors
    and nothing else; frozen tensors get no gradient."""
    model = wrap(case, ex.config(case)).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(model, case)
    assert any(n.startswith(ENCODER) for n in trainable)
    count, total = model.get_nb_trainable_parameters()
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())
    before = clone_params(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = loss_of(model, case)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not with_grad, with_grad[:5]
    after = clone_params(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable, (f"frozen tensors changed: {sorted(changed - trainable)[:5]}; "
                                  f"trainable tensors unchanged: {sorted(trainable - changed)[:5]}")


# ---------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("ex, case", ALL_PROMPT)
def test_save_load_round_trip(ex: PromptExample, case: TaskCase, tmp_path: Path) -> None:
    """One ``prompt_embeddings`` key (plus the head copies); the loaded adapter is a plain, frozen embedding that
    reproduces the outputs (1e-5); ``is_trainable=True`` is refused."""
    model = wrap(case, ex.config(case))
    perturb_trainable(model, scale=0.2)
    expected = output(model, case)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tuple(tensors["prompt_embeddings"].shape) == expected_checkpoint_shape(ex, case)
    others = sorted(set(tensors) - {"prompt_embeddings"})
    if case.task_type in HEAD_TASKS:
        assert others and all(k.split(".")[-2] in HEAD_TASKS[case.task_type] for k in others), others
    else:
        assert not others, others
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftWarning)
        loaded = PeftModel.from_pretrained(base_model(case), tmp_path)
    encoder = loaded.base_model.prompt_encoder["default"]
    assert [n for n, _ in encoder.named_parameters()] == ["embedding.weight"]
    assert tuple(encoder.embedding.weight.shape) == expected_checkpoint_shape(ex, case)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert_close(output(loaded.eval(), case), expected, TOL_LOAD, "loaded vs saved")
    with pytest.raises(ValueError, match="trainable"):
        PeftModel.from_pretrained(base_model(case), tmp_path, is_trainable=True)


# ---------------------------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("ex, case", ALL_PROMPT)
def test_two_adapters_add_switch_delete(ex: PromptExample, case: TaskCase) -> None:
    model = wrap(case, ex.config(case), seed=0)
    own = output(model, case)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    add_adapter(model, "other", ex.config(case), seed=1)
    assert model.active_adapter == "default"
    assert torch.equal(output(model, case), own), "add_adapter changed the outputs"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable, "add_adapter changed trainability"
    assert list(model.base_model.prompt_encoder) == ["default", "other"]

    model.set_adapter("other")
    assert model.active_adapter == "other"
    other = output(model, case)
    assert_close(other, output(wrap(case, ex.config(case), seed=1), case), TOL_IDENTITY, "other vs alone")
    assert_differs(other, own)
    model.set_adapter("default")
    assert torch.equal(output(model, case), own)

    model.set_adapter("other")
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"] and list(model.base_model.prompt_encoder) == ["default"]
    assert model.active_adapter == "default"
    assert not any(".other." in n for n, _ in model.named_parameters())
    assert torch.equal(output(model, case), own)


@pytest.mark.parametrize("ex, case", ALL_PROMPT)
def test_unsupported_operations(ex: PromptExample, case: TaskCase) -> None:
    """No merging, no per-row ``adapter_names``; ``unload()`` returns the original model with its base outputs."""
    base = base_output(case)
    model = wrap(case, ex.config(case))
    original = model.get_base_model()
    own = output(model, case)
    with pytest.raises(MergeError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(MergeError, match="cannot be merged"):
        model.merge_and_unload()
    inputs = case.make_inputs(BATCH)
    with pytest.raises(ConfigError, match="adapter_names.*not supported for prompt-learning"):
        model(**inputs, adapter_names=["default"] * BATCH)
    if case.task_type in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
        with pytest.raises(ConfigError, match="adapter_names.*not supported for prompt-learning"):
            model.generate(input_ids=inputs["input_ids"], max_new_tokens=2, adapter_names=["default"] * BATCH)
    assert torch.equal(output(model, case), own), "a refused operation changed the model"
    unloaded = model.unload()
    assert unloaded is original and not hasattr(unloaded, "peft_config")
    assert not any(isinstance(m, ModulesToSaveWrapper) for m in unloaded.modules())
    assert_close(output(unloaded.eval(), case), base, TOL_IDENTITY, "unloaded vs base")


# ---------------------------------------------------------------------------------------------- invalid configs


def _bad_kwargs(spec: MethodSpec) -> list[tuple[dict[str, Any], str]]:
    """Invalid keyword sets for ``spec.config_cls`` and the field each error must name."""
    bad: list[tuple[dict[str, Any], str]] = [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"num_virtual_tokens": -2}, "num_virtual_tokens"),
        ({"num_virtual_tokens": 2.5}, "num_virtual_tokens"),
        ({"num_virtual_tokens": 2, "num_layers": 0}, "num_layers"),
        ({"num_virtual_tokens": 2, "token_dim": True}, "token_dim"),
    ]
    if config_has_field(spec, "prompt_tuning_init"):
        bad += [
            ({"num_virtual_tokens": 2, "prompt_tuning_init": "TEXT"}, "tokenizer_name_or_path|prompt_tuning_init_text"),
            ({"num_virtual_tokens": 2, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi"},
             "tokenizer_name_or_path"),
            ({"num_virtual_tokens": 2, "prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "tok"},
             "prompt_tuning_init_text"),
            ({"num_virtual_tokens": 2, "tokenizer_kwargs": {"use_fast": True}}, "tokenizer_kwargs"),
            ({"num_virtual_tokens": 2, "prompt_tuning_init": "SAMPLE_VOCAB", "tokenizer_kwargs": {"a": 1}},
             "tokenizer_kwargs"),
        ]
    if config_has_field(spec, "encoder_reparameterization_type"):
        bad.append(({"num_virtual_tokens": 2, "encoder_reparameterization_type": "GRU"},
                    "encoder_reparameterization_type"))
    if config_has_field(spec, "encoder_hidden_size"):
        bad.append(({"num_virtual_tokens": 2, "encoder_hidden_size": 0}, "encoder_hidden_size"))
    if config_has_field(spec, "prefix_projection"):
        bad.append(({"num_virtual_tokens": 2, "prefix_projection": "yes"}, "prefix_projection"))
    return bad


BAD = [pytest.param(spec, kw, field, id=f"{spec.peft_type}-{i}")
       for spec in PROMPT_METHODS for i, (kw, field) in enumerate(_bad_kwargs(spec))]


@pytest.mark.parametrize("spec, kwargs, field", BAD)
def test_invalid_configs_raise_config_error_naming_the_field(spec: MethodSpec, kwargs: dict[str, Any],
                                                            field: str) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        spec.config_cls(task_type="CAUSAL_LM", **kwargs)
    assert info.value.field in field.split("|")


@pytest.mark.parametrize("spec", PROMPT_METHODS, ids=lambda s: str(s.peft_type))
def test_missing_num_virtual_tokens_leaves_the_model_unchanged(spec: MethodSpec) -> None:
    """``num_virtual_tokens`` is required: ``get_peft_model`` raises a ConfigError naming it, model untouched."""
    case = TEXT_CASES[0]
    model = base_model(case)
    before = output(model, case)
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        get_peft_model(model, spec.config_cls(task_type=case.task_type))
    assert not hasattr(model, "peft_config")
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(output(model, case), before)
