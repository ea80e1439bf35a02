"""Shared helpers of the conformance suite: parameters over (method x example config x model case), building
wrapped models, forward passes, and snapshots for "the model is unchanged" checks.

Every registered method (``peftkit.registry.all_methods()``) gets the whole suite: configs are built generically as
``spec.config_cls(task_type=case.task_type, target_modules=case.target_modules, **example_kwargs)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from kind_models import CASE_CONFIG_KWARGS, KIND_CASE_KINDS, KIND_CASES, REFUSED, UNMERGEABLE
from models import TASK_CASES, TaskCase, model_output
from numerics import TINY_MODEL_REDUCTION, fp_tol
from torch import nn

from peftkit import AdapterLayer, ModulesToSaveWrapper, PeftConfig, PeftModel, get_peft_model
from peftkit.registry import MethodSpec, all_methods

#: LoRA-style methods only; the prompt-learning methods (kind="prompt") have their own invariants (tests/test_prompt_*.py)
METHODS: list[MethodSpec] = [m for m in all_methods() if m.kind != "prompt"]
#: the prompt-learning methods; tested by test_conformance_prompt.py over the transformers text cases
PROMPT_METHODS: list[MethodSpec] = [m for m in all_methods() if m.kind == "prompt"]
BATCH = 2
#: tolerances of REFERENCE.md §4 (fp32)
TOL_IDENTITY = 1e-6
#: merged weights are rounded to fp32 at the scale of W + dW and the merged model runs other kernels than the
#: unmerged one: a few ulp per term of the tiny models' reductions (tests/numerics.py; 1.2e-4, the reference's own
#: merge tolerance is 1e-4), absolute and relative to the largest compared value
TOL_MERGE = RTOL_MERGE = fp_tol(torch.float32, TINY_MODEL_REDUCTION)["atol"]
#: task types whose head the reference adds to ``modules_to_save``
HEAD_TASKS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


@dataclass(frozen=True)
class MethodConfig:
    """One example config of one method: ``kwargs`` has everything but ``task_type`` / ``target_modules``."""

    spec: MethodSpec
    index: int
    kwargs: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.spec.peft_type}-{self.index}"

    def config(self, case: TaskCase, **overrides: Any) -> PeftConfig:
        """The config for ``case`` (``overrides`` win over the example's keyword arguments)."""
        kwargs = {"task_type": case.task_type, "target_modules": list(case.target_modules),
                  **CASE_CONFIG_KWARGS.get(case.name, {}), **self.kwargs, **overrides}
        return self.spec.config_cls(**kwargs)

    def observable(self, case: TaskCase, **overrides: Any) -> PeftConfig:
        """Like :meth:`config`, with ``spec.non_identity_kwargs`` so a fresh adapter changes the outputs. A method
        without such an option (empty ``non_identity_kwargs``: LN tuning's copies start equal to the base) gets a
        config marked so that :func:`wrap` / :func:`add_adapter` perturb the new adapter's tensors instead."""
        config = self.config(case, **{**self.spec.non_identity_kwargs, **overrides})
        if not self.spec.non_identity_kwargs and self.spec.identity_at_init:
            vars(config)["_conformance_perturb"] = self.spec.prefix  # not a dataclass field: never saved
        return config

    def field(self, name: str, default: Any = None) -> Any:
        """The value of config field ``name`` in this example (its dataclass default when not given)."""
        if name in self.kwargs:
            return self.kwargs[name]
        for f in dataclasses.fields(self.spec.config_cls):
            if f.name == name:
                return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        return default


def _method_configs(first_only: bool) -> list[MethodConfig]:
    out = []
    for spec in METHODS:
        examples = list(spec.example_configs) or [{}]
        for i, kwargs in enumerate(examples[:1] if first_only else examples):
            out.append(MethodConfig(spec, i, dict(kwargs)))
    return out


ALL_CONFIGS = _method_configs(first_only=False)
FIRST_CONFIGS = _method_configs(first_only=True)


#: module kinds (``peftkit.layers.dispatch.module_kind``) of each case's target modules; unlisted cases: linear only.
#: Methods with ``MethodSpec.supported_kinds`` run only on the cases whose kinds they all support (checked against
#: the built models by tests/test_loha_lokr.py).
CASE_TARGET_KINDS: dict[str, frozenset[str]] = {
    "gpt2-causal": frozenset({"hf_conv1d"}),
    "custom-emb": frozenset({"embedding"}),
    "custom-conv2d": frozenset({"conv"}),
    "custom-conv1d": frozenset({"conv"}),
    **KIND_CASE_KINDS,
}
#: the model cases of the suite: ``models.TASK_CASES`` and the LoRA target kinds of issue 18 (``kind_models``)
CONFORMANCE_CASES: list[TaskCase] = [*TASK_CASES, *KIND_CASES]


def case_kinds(case: TaskCase) -> frozenset[str]:
    return CASE_TARGET_KINDS.get(case.name, frozenset({"linear"}))


def supports(spec: MethodSpec, case: TaskCase) -> bool:
    """Can ``spec`` wrap every target module of ``case`` (``MethodSpec.supported_kinds``; a ``"parameter"`` case
    needs ``MethodSpec.parameter_options``)?"""
    kinds = case_kinds(case)
    if "parameter" in kinds:
        return spec.parameter_options is not None
    return spec.supported_kinds is None or kinds <= set(spec.supported_kinds)


def refused_field(mc: MethodConfig, case: TaskCase) -> str | None:
    """The config field the reference refuses for this case (e.g. DoRA on a grouped conv, ``kind_models.REFUSED``;
    a LoRA variant on a kind it does not adapt, ``MethodSpec.example_kinds``), or None."""
    rule = REFUSED.get(case.name)
    refused = rule(mc.kwargs) if rule is not None else None
    scope = mc.spec.example_kinds(mc.kwargs)
    if refused is None and scope is not None and not case_kinds(case) <= set(scope[1]):
        return scope[0]
    return refused


def can_merge(mc: MethodConfig, case: TaskCase) -> bool:
    """The method merges and the case's layers can be merged (not a grouped convolution)."""
    return mc.spec.mergeable and case.name not in UNMERGEABLE


#: the quick tier of the suite (what ``bash scripts/test.sh`` runs): one causal LM, one encoder with a head, and one
#: case per module kind (linear MLP, GPT-2 Conv1D, embedding, conv, grouped conv, MultiheadAttention, parameters).
#: The other task cases (seq2seq, token classification, QA, feature extraction, Whisper, ...) run every method in
#: the slow tier (``-m slow``; ``.ci/run`` runs both tiers). A method's further examples (index > 0: DoRA, BD-LoRA,
#: ...) run quickly on the kind cases and the causal LM only.
QUICK_CASES: frozenset[str] = frozenset({"llama-causal", "bert-seqcls", "gpt2-causal", "custom-mlp", "custom-emb",
                                         "custom-conv2d", "custom-gconv", "custom-mha", "moe-params"})
QUICK_CASES_FURTHER_EXAMPLES: frozenset[str] = QUICK_CASES - {"bert-seqcls"}


def is_quick(mc: MethodConfig, case: TaskCase) -> bool:
    """Does (``mc``, ``case``) belong to the quick tier (:data:`QUICK_CASES`)?"""
    return case.name in (QUICK_CASES if mc.index == 0 else QUICK_CASES_FURTHER_EXAMPLES)


def _param(mc: MethodConfig, case: TaskCase) -> Any:
    """A ``pytest.param`` of the pair, marked ``slow`` outside the quick tier."""
    marks = () if is_quick(mc, case) else (pytest.mark.slow,)
    return pytest.param(mc, case, id=f"{mc.id}-{case.name}", marks=marks)


def _product(configs: list[MethodConfig], cases: Iterable[TaskCase]) -> list[Any]:
    cases = list(cases)
    return [_param(mc, case) for mc in configs for case in cases
            if supports(mc.spec, case) and refused_field(mc, case) is None]


#: every example config of every method x every model case (cheap properties)
ALL = _product(ALL_CONFIGS, CONFORMANCE_CASES)
#: the first example config of every method x every model case (expensive properties)
FIRST = _product(FIRST_CONFIGS, CONFORMANCE_CASES)
#: the (config, case) pairs the reference refuses: they must raise a ConfigError naming the field
REFUSED_PARAMS = [pytest.param(mc, case, id=f"{mc.id}-{case.name}") for mc in ALL_CONFIGS
                  for case in CONFORMANCE_CASES if supports(mc.spec, case) and refused_field(mc, case) is not None]


def config_has_field(spec: MethodSpec, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(spec.config_cls))


# ------------------------------------------------------------------------------------------------ models


def base_model(case: TaskCase) -> nn.Module:
    """A fresh base model in eval mode (the factories are deterministic: every call gives the same weights)."""
    return case.build().eval()


def wrap(case: TaskCase, config: PeftConfig, seed: int = 0) -> PeftModel:
    """``get_peft_model`` on a fresh base, adapters initialised under ``seed``; returned in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base_model(case), config)
    _perturb_if_marked(model, config, "default", seed)
    return model.eval()


def add_adapter(model: PeftModel, name: str, config: PeftConfig, seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(name, config)
    _perturb_if_marked(model, config, name, seed)


def _perturb_if_marked(model: nn.Module, config: PeftConfig, adapter: str, seed: int) -> None:
    """Perturb adapter ``adapter``'s tensors when ``config`` comes from :meth:`MethodConfig.observable` of a method
    that has no non-identity option (scale 0.5: clearly observable through the tiny models' heads)."""
    prefix = vars(config).get("_conformance_perturb")
    if prefix is not None:
        perturb(model, adapter_param_names(model, adapter, prefix), seed=seed + 100, scale=0.5)


@torch.no_grad()
def output(model: nn.Module, case: TaskCase) -> torch.Tensor:
    """The compared output tensor of ``model`` on the case's inputs (batch 2)."""
    return model_output(model(**case.make_inputs(BATCH)), case.output_key).detach().clone()


def base_output(case: TaskCase) -> torch.Tensor:
    return output(base_model(case), case)


def example_base_output(mc: MethodConfig, case: TaskCase) -> torch.Tensor:
    """What the example's adapters are compared with as "the base": the original model's output, or, for an example
    whose adapter rewrites the base when created (``MethodSpec.example_changes_base``: KaSA's truncation), the
    wrapped model's output inside ``disable_adapter()``."""
    if not mc.spec.example_changes_base(mc.kwargs):
        return base_output(case)
    model = wrap(case, mc.config(case))
    with model.disable_adapter():
        return output(model, case)


def loss_of(model: nn.Module, case: TaskCase) -> torch.Tensor:
    """A fixed random weighting of the compared output, summed, plus the model's loss when the case has labels.

    The weighted term gives every trainable tensor a gradient: a plain sum has none behind a final LayerNorm whose
    weight is still all ones, and a task loss alone can have none for some tensors (the QA head's bias shifts every
    position's logit equally, which the softmax ignores), which would make "every trainable tensor changed" flaky.
    """
    out = model(**case.make_inputs(BATCH))
    tensor = model_output(out, case.output_key)
    weights = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(11), dtype=tensor.dtype)
    weighted = (tensor * weights).sum()
    return out.loss + 1e-2 * weighted if case.has_loss else weighted


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str = "outputs", rtol: float = 0.0) -> None:
    """``max |a - b| <= tol + rtol * max |b|`` (``rtol=0``: absolute tolerance only)."""
    diff, scale = max_diff(a, b), b.abs().max().item()
    assert diff <= tol + rtol * scale, f"{what} differ by {diff:.3g} (tolerance {tol:g} + {rtol:g} * {scale:.3g})"


def assert_differs(a: torch.Tensor, b: torch.Tensor, what: str = "outputs", min_diff: float = 1e-4) -> None:
    diff = max_diff(a, b)
    assert diff > min_diff, f"{what} should differ but differ by only {diff:.3g}"


def adapter_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def is_adapter_param(name: str, prefix: str) -> bool:
    """Does parameter ``name`` belong to an adapter (a path component starts with the method's prefix)?"""
    return any(part.startswith(prefix) for part in name.split(".")[:-1])


def in_adapter(name: str, adapter: str, prefix: str) -> bool:
    """Is ``name`` a tensor of adapter ``adapter`` (adapter layer tensor or modules_to_save copy)?"""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if (part.startswith(prefix) or part == "modules_to_save") and i + 1 < len(parts) and parts[i + 1] == adapter:
            return True
    return False


def clone_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@dataclass
class Snapshot:
    """What must stay the same when an operation fails: structure, flags, configs and outputs."""

    module_types: dict[str, type]
    requires_grad: dict[str, bool]
    params: dict[str, torch.Tensor]
    configs: dict[str, dict[str, Any]] | None
    active: list[str] | None
    out: torch.Tensor


def snapshot(model: nn.Module, case: TaskCase) -> Snapshot:
    configs = getattr(model, "peft_config", None)
    return Snapshot(
        module_types={n: type(m) for n, m in model.named_modules()},
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        params=clone_params(model),
        configs={k: c.to_dict() for k, c in configs.items()} if isinstance(configs, dict) else None,
        active=list(model.active_adapters) if isinstance(model, PeftModel) else None,
        out=output(model, case),
    )


def assert_unchanged(model: nn.Module, case: TaskCase, before: Snapshot) -> None:
    after = snapshot(model, case)
    assert after.module_types == before.module_types, "module structure changed"
    assert after.requires_grad == before.requires_grad, "requires_grad flags changed"
    assert after.params.keys() == before.params.keys()
    changed = [n for n in before.params if not torch.equal(before.params[n], after.params[n])]
    assert not changed, f"parameters changed: {changed[:5]}"
    assert after.configs == before.configs, "peft_config changed"
    assert after.active == before.active, "active adapters changed"
    assert torch.equal(after.out, before.out), "outputs changed"


def perturb_trainable(model: nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Add deterministic noise to every trainable tensor (so a saved adapter differs from any fresh one)."""
    perturb(model, [n for n, p in model.named_parameters() if p.requires_grad], seed, scale)


def perturb(model: nn.Module, names: Iterable[str], seed: int = 0, scale: float = 0.05) -> None:
    """Add deterministic noise to the named parameters."""
    wanted = set(names)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in wanted:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def adapter_param_names(model: nn.Module, adapter: str, prefix: str) -> list[str]:
    """Names of adapter ``adapter``'s tensors: its layer tensors and its ``modules_to_save`` copies."""
    return [n for n, _ in model.named_parameters() if in_adapter(n, adapter, prefix)]


def mergeable(params: list[Any]) -> list[Any]:
    """The subset of ``ALL`` / ``FIRST`` params whose method can merge on that case (:func:`can_merge`)."""
    return [p for p in params if can_merge(*p.values)]
