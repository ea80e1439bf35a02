"""Interop with the reference library (🤗 PEFT 0.21.2, installed as ``peft`` by the dev extra).

For each scenario (a tiny model and a LoRA config with ``init_lora_weights=False`` so the adapter is not a no-op)
both libraries build, perturb and save an adapter; then each library loads the other's file into a fresh base and
must reproduce the saver's outputs within 1e-5 (eval mode, no_grad). The saved safetensors keys/shapes and the
``adapter_config.json`` essentials must be the same, the reference must load peftkit's files without
"missing adapter keys" / "unexpected keyword arguments" warnings, and ``merge_and_unload`` must agree across
libraries.

Known, deliberate difference: when an embedding is targeted the reference also saves the full base matrix
(``...embed_tokens.base_layer.weight``); peftkit does not, but loads such files.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from models import CASES_BY_NAME, TaskCase, model_output
from numerics import fp_tol
from torch import nn

import peftkit

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.interop

ATOL = 1e-5
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: warnings that must never appear when one library loads the other's file
FORBIDDEN_WARNINGS = ("Found missing adapter keys", "Unexpected keyword arguments", "belong to no adapter")


@dataclass(frozen=True)
class Scenario:
    """A tiny model (``case``) with LoRA ``lora`` kwargs (``task_type`` and ``init_lora_weights=False`` added)."""

    id: str
    case_name: str
    lora: dict[str, Any] = field(default_factory=dict)
    adapter_name: str = "default"
    #: the reference also saves these full base embedding matrices (peftkit does not)
    ref_only_keys: tuple[str, ...] = ()

    @property
    def case(self) -> TaskCase:
        return CASES_BY_NAME[self.case_name]

    def config_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"r": 4, "lora_alpha": 8, "init_lora_weights": False}
        kwargs["target_modules"] = list(self.case.target_modules)
        kwargs["task_type"] = self.case.task_type
        kwargs.update(self.lora)
        return kwargs

    @property
    def subfolder(self) -> str | None:
        return None if self.adapter_name == "default" else self.adapter_name


SCENARIOS = [
    Scenario("llama", "llama-causal"),
    Scenario("llama-default-targets", "llama-causal", {"target_modules": None}),
    Scenario("gpt2-conv1d", "gpt2-causal"),
    Scenario("opt", "opt-causal"),
    Scenario("t5-seq2seq", "t5-seq2seq"),
    Scenario("bert-seqcls", "bert-seqcls"),
    Scenario("custom-embedding", "custom-emb"),
    Scenario(
        "llama-embed-tokens",
        "llama-causal",
        {"target_modules": ["embed_tokens", "q_proj"]},
        ref_only_keys=("base_model.model.model.embed_tokens.base_layer.weight",),
    ),
    Scenario("custom-conv2d", "custom-conv2d"),
    Scenario(
        "llama-rslora-patterns",
        "llama-causal",
        {"use_rslora": True, "rank_pattern": {"layers.0.self_attn.q_proj": 2}, "alpha_pattern": {"v_proj": 5}},
    ),
    Scenario("opt-bias-lora-only", "opt-causal", {"bias": "lora_only"}),
    Scenario("opt-bias-all", "opt-causal", {"bias": "all"}),
    Scenario("opt-lora-bias", "opt-causal", {"lora_bias": True}),
    Scenario("llama-dropout", "llama-causal", {"lora_dropout": 0.1}),
    Scenario("llama-named-adapter", "llama-causal", adapter_name="other"),
]
SCENARIO_IDS = [s.id for s in SCENARIOS]


# --------------------------------------------------------------------------------------------------
# helpers


def _perturb_trainable(model: nn.Module, seed: int) -> None:
    """Add noise to every trainable tensor (adapters, lora_B bias, modules_to_save copies, selected biases), so that
    a tensor that is not saved or not loaded changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=gen, dtype=param.dtype))


def _outputs(model: nn.Module, case: TaskCase) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model_output(model(**case.make_inputs(2)), case.output_key)


def _build_and_save(lib: Any, scenario: Scenario, directory: str, seed: int) -> torch.Tensor:
    """Wrap a fresh base with ``lib`` (peft or peftkit), perturb, save to ``directory``; returns its outputs."""
    torch.manual_seed(seed)
    config = lib.LoraConfig(**scenario.config_kwargs())
    model = lib.get_peft_model(scenario.case.build(), config, adapter_name=scenario.adapter_name)
    _perturb_trainable(model, seed)
    out = _outputs(model, scenario.case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the reference's "Setting `save_embedding_layers` to `True`"
        model.save_pretrained(directory)
    return out


def _load(lib: Any, scenario: Scenario, directory: str) -> tuple[nn.Module, list[str]]:
    """``lib.PeftModel.from_pretrained`` on a fresh base; returns the model and every warning / log message."""
    torch.manual_seed(1234)  # loading must not depend on the RNG state
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = _Collect(level=logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("peft", "peftkit", "")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # a non-default adapter is read from <dir>/<name>/ and loaded under the same name
            kwargs = {"subfolder": scenario.subfolder, "adapter_name": scenario.adapter_name} if scenario.subfolder else {}
            model = lib.PeftModel.from_pretrained(scenario.case.build(), directory, **kwargs)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    messages.extend(str(w.message) for w in caught)
    return model, messages


def _adapter_dir(directory: str, scenario: Scenario) -> str:
    return os.path.join(directory, scenario.subfolder) if scenario.subfolder else directory


def _key_shapes(directory: str) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(os.path.join(directory, WEIGHTS_FILE), framework="pt") as fh:
        return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118


def _read_config(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as fh:
        return json.load(fh)


@dataclass
class Saved:
    kit_dir: str
    kit_out: torch.Tensor
    ref_dir: str
    ref_out: torch.Tensor


@pytest.fixture(scope="module", params=SCENARIOS, ids=SCENARIO_IDS)
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Scenario, Saved]:
    """Both libraries' saved adapters for one scenario (different seeds, so the two adapters differ)."""
    scenario: Scenario = request.param
    root = tmp_path_factory.mktemp(scenario.id)
    kit_dir, ref_dir = str(root / "peftkit"), str(root / "reference")
    kit_out = _build_and_save(peftkit, scenario, kit_dir, seed=1)
    ref_out = _build_and_save(peft, scenario, ref_dir, seed=2)
    return scenario, Saved(kit_dir, kit_out, ref_dir, ref_out)


def _assert_no_forbidden(messages: list[str]) -> None:
    bad = [m for m in messages if any(f in m for f in FORBIDDEN_WARNINGS)]
    assert not bad, bad


# --------------------------------------------------------------------------------------------------
# tests


def test_adapters_change_outputs(saved: tuple[Scenario, Saved]) -> None:
    """Sanity of the setup: both adapters act (else the load tests below could not fail)."""
    scenario, s = saved
    base = _outputs(scenario.case.build(), scenario.case)
    assert (s.kit_out - base).abs().max() > 1e-3
    assert (s.ref_out - base).abs().max() > 1e-3


def test_peftkit_file_loads_in_reference(saved: tuple[Scenario, Saved]) -> None:
    """peftkit saves → the reference loads: same outputs, no missing-keys / unknown-config-keys warnings."""
    scenario, s = saved
    ref, messages = _load(peft, scenario, s.kit_dir)
    _assert_no_forbidden(messages)
    assert isinstance(ref, peft.PeftModel)
    torch.testing.assert_close(_outputs(ref, scenario.case), s.kit_out, atol=ATOL, rtol=0)


def test_reference_file_loads_in_peftkit(saved: tuple[Scenario, Saved]) -> None:
    """The reference saves → peftkit loads: same outputs, every tensor of the file consumed."""
    scenario, s = saved
    kit, messages = _load(peftkit, scenario, s.ref_dir)
    _assert_no_forbidden(messages)
    assert isinstance(kit, peftkit.PeftModel)
    if scenario.case.task_type is not None:
        assert type(kit).__name__.startswith("PeftModelFor")
    torch.testing.assert_close(_outputs(kit, scenario.case), s.ref_out, atol=ATOL, rtol=0)


def test_same_keys_shapes_and_config(saved: tuple[Scenario, Saved]) -> None:
    """Same safetensors keys and shapes (up to the reference's full embedding matrices) and config essentials."""
    scenario, s = saved
    kit_dir, ref_dir = _adapter_dir(s.kit_dir, scenario), _adapter_dir(s.ref_dir, scenario)
    if scenario.subfolder:  # non-default adapters live in <dir>/<name>/ only
        for root in (s.kit_dir, s.ref_dir):
            assert not os.path.exists(os.path.join(root, CONFIG_FILE))
            assert os.path.isfile(os.path.join(root, scenario.subfolder, WEIGHTS_FILE))
    kit_keys, ref_keys = _key_shapes(kit_dir), _key_shapes(ref_dir)
    extra = {k: ref_keys.pop(k) for k in scenario.ref_only_keys}
    assert kit_keys == ref_keys
    assert all(len(shape) == 2 and shape[0] == 128 for shape in extra.values()), extra  # (vocab, hidden)

    kit_cfg, ref_cfg = _read_config(kit_dir), _read_config(ref_dir)
    for key in ("peft_type", "task_type", "r", "lora_alpha", "bias", "lora_bias", "use_rslora", "lora_dropout",
                "init_lora_weights", "rank_pattern", "alpha_pattern", "inference_mode"):
        assert kit_cfg[key] == ref_cfg[key], key
    assert set(kit_cfg["target_modules"]) == set(ref_cfg["target_modules"])
    assert set(kit_cfg) == set(ref_cfg)  # the same field names: each library reads the other's without warnings
    if scenario.case_name == "gpt2-causal":  # the reference records the Conv1D layout it detected
        assert ref_cfg["fan_in_fan_out"] is True
    if scenario.case.task_type == "SEQ_CLS":
        assert set(ref_cfg["modules_to_save"]) >= {"classifier"}
        assert set(kit_cfg["modules_to_save"]) == set(ref_cfg["modules_to_save"])
        assert "base_model.model.classifier.weight" in kit_keys


def test_gpt2_fan_in_fan_out() -> None:
    """GPT-2 ``Conv1D`` (weight ``(in, out)``): peftkit detects the layout per layer (the user's config keeps
    ``fan_in_fan_out=False``) and, given the same A and B, its delta weight equals the reference's."""
    scenario = next(s for s in SCENARIOS if s.id == "gpt2-conv1d")
    ref = peft.get_peft_model(scenario.case.build(), peft.LoraConfig(**scenario.config_kwargs()))
    assert ref.peft_config["default"].fan_in_fan_out is True
    kit_config = peftkit.LoraConfig(**scenario.config_kwargs())
    kit = peftkit.get_peft_model(scenario.case.build(), kit_config)
    assert kit_config.fan_in_fan_out is False
    kit_layer = kit.base_model.model.transformer.h[0].attn.c_attn
    ref_layer = ref.base_model.model.transformer.h[0].attn.c_attn
    assert kit_layer.fan_in_fan_out is True
    with torch.no_grad():
        kit_layer.lora_A["default"].weight.copy_(ref_layer.lora_A["default"].weight)
        kit_layer.lora_B["default"].weight.copy_(ref_layer.lora_B["default"].weight)
    # peftkit's (B @ A).T for the Conv1D layout vs the reference's: the same rank-4 sum, maybe in another order
    torch.testing.assert_close(
        kit_layer.get_delta_weight("default"), ref_layer.get_delta_weight("default"), **fp_tol(torch.float32, 4)
    )


def test_merge_and_unload_agrees_across_libraries(saved: tuple[Scenario, Saved]) -> None:
    """A peftkit-saved adapter merged by the reference equals peftkit's own merge (and the unmerged outputs)."""
    scenario, s = saved
    ref, _ = _load(peft, scenario, s.kit_dir)
    kit, _ = _load(peftkit, scenario, s.kit_dir)
    ref_merged = ref.merge_and_unload()
    kit_merged = kit.merge_and_unload()
    assert not any(isinstance(m, peftkit.AdapterLayer) for m in kit_merged.modules())
    ref_out, kit_out = _outputs(ref_merged, scenario.case), _outputs(kit_merged, scenario.case)
    torch.testing.assert_close(kit_out, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(kit_out, s.kit_out, atol=ATOL, rtol=0)
