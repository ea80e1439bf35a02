"""Signature parity with the reference (🤗 PEFT 0.21.2): issue 18, item 5.

For every name in ``peft.__all__`` that peftkit also exports, code written for the reference must run after the
import change. Compared:

- functions and classes (their constructors): ``inspect.signature``;
- config dataclasses: the ``__init__`` fields, by name and default (their order is not compared: nobody passes 40
  config fields positionally);
- the public methods of each class (``PeftModel`` and its task subclasses, the configs, the tuner classes
  ``LoraModel`` ..., the prompt encoders), including methods the reference has and peftkit lacks;
- enums: their members and values.

A peftkit signature is compatible with the reference's when

- every parameter of the reference exists in peftkit with the same name, kind and default (a default where the
  reference has none is fine: every call that works there works here);
- the reference's positional parameters are the first positional parameters of peftkit's, in the same order;
- peftkit takes ``*args`` / ``**kwargs`` where the reference does;
- peftkit's extra parameters have defaults, and are keyword-only when the reference takes ``*args`` (otherwise they
  come after all of the reference's positional parameters, which the second rule ensures).

Deliberate differences are listed in :data:`ALLOWED`, each with the reason. Names of ``peft.__all__`` that peftkit
does not export at all (methods not built yet) are listed in :data:`EXPECTED_MISSING`: when a method lands, remove
its names there (the test says which) and its signatures are checked from then on.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import inspect
import warnings
from typing import Any

import pytest
from torch import nn

import peftkit

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft = pytest.importorskip("peft")

REFERENCE_VERSION = "0.21.2"
_EMPTY = inspect.Parameter.empty

#: names of ``peft.__all__`` that peftkit does not export yet. Remove a name when it lands (issues 18-23).
EXPECTED_MISSING: frozenset[str] = frozenset({
    # other adapter methods (issues 20-23)
    "AdamssConfig", "AdamssModel", "BeftConfig", "BeftModel",
    "DeftConfig", "DeftModel", "FrodConfig",
    "FrodModel",
    "PeanutConfig", "PeanutModel", "PolyConfig", "PolyModel",
    "ShadowConfig", "ShadowModel", "SupertuningConfig", "SupertuningModel",
    "XLoraConfig", "XLoraModel", "find_kappa_target_modules",
    # other prompt-learning methods and their helpers (issues 20-23)
    "AdaptionPromptConfig", "AdaptionPromptModel", "CPTConfig", "CPTEmbedding", "CartridgeConfig",
    "CartridgeEncoder", "MultitaskPromptTuningConfig", "MultitaskPromptTuningInit", "compose_cartridge_adapters",
    "initialize_kv_prefix_from_past_key_values", "initialize_kv_prefix_from_text",
    "prompt_embeddings_from_past_key_values", "bloom_model_postprocess_past_key_value",
    "TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING",
})

#: ``"<Class or function>.<member>"`` glob -> why peftkit differs on purpose. ``<member>`` is ``__init__`` for a
#: constructor, ``()`` for a function's own signature, the method name otherwise. Keep it short.
ALLOWED: dict[str, str] = {
    # README "set_adapter(name)": an adapter keeps its own trainability unless inference_mode is given
    "*.set_adapter": "inference_mode defaults to None (keep the adapter's mode), not False (make it trainable)",
    # the reference's BaseTuner.inject_adapter(model, ...) re-reads self.peft_config; peftkit's tuner is
    # generic and takes the adapter's config (the plan/apply split of DESIGN.md); not a user entry point
    "*Model.inject_adapter": "takes the adapter's config instead of the model",
    # the reference's **kwargs only forward PeftModel.__init__'s autocast_adapter_dtype / low_cpu_mem_usage, which
    # the inherited __init__ lists explicitly (so every call that works there works here); TokenClassification's
    # peft_config=None default only fails later there
    "PeftModelFor*.__init__": "explicit PeftModel.__init__ parameters instead of **kwargs",
    # the reference spells out each task's inputs (input_ids, attention_mask, ..., task_ids); peftkit's task
    # forwards pass *args / **kwargs to the base model unchanged (any input it takes works) and list only the label
    # names, keyword-only, for Trainer's column check
    "PeftModelFor*.forward": "pass-through (*args, **kwargs) instead of the spelled-out inputs",
    # peftkit's tuner classes share one generic constructor (model, peft_config, adapter_name, ...); the reference's
    # AdaLoraModel names its second parameter `config`, positional calls bind the same
    "AdaLoraModel.__init__": "second parameter named peft_config, as every other tuner",
    "OSFModel.__init__": "second parameter named peft_config, as every other tuner",
    "UniLoraModel.__init__": "second parameter named peft_config, as every other tuner",
    "TinyLoraModel.__init__": "second parameter named peft_config, as every other tuner",
    # README: the reference's OSFModel.unmerge_adapter(*args, **kwargs) only raises NotImplementedError; peftkit
    # unmerges OSF adapters (subtracts their delta) like every other mergeable method
    "OSFModel.unmerge_adapter": "unmerges (the generic signature) where the reference always raises",
    # the reference's PeftMixedModel.save_pretrained raises NotImplementedError (safe_serialization=False there is
    # moot); peftkit saves each adapter, in safetensors by default as PeftModel.save_pretrained
    "PeftMixedModel.save_pretrained": "saves (safe_serialization=True) where the reference cannot save",
    # save-time internals of the reference's tuners: peftkit converts PiSSA/OLoRA adapters and trims AdaLoRA ranks
    # in its serialization (MethodSpec.convert_for_save / the AdaLoRA state-dict hooks)
    "*LoraModel.subtract_mutated_init": "save-time internal, done by peftkit's serialization",
    "AdaLoraModel.resize_state_dict_by_rank_pattern": "save-time internal, done by peftkit's serialization",
}


def _same_default(ref: Any, ours: Any) -> bool:
    """Defaults are equal: same value (enum members compare by value, ``True`` is not ``1``)."""
    if ref is _EMPTY or ours is _EMPTY:
        return ref is ours
    if isinstance(ref, enum.Enum) or isinstance(ours, enum.Enum):
        return str(getattr(ref, "value", ref)) == str(getattr(ours, "value", ours))
    if isinstance(ref, bool) != isinstance(ours, bool):
        return False
    if inspect.isfunction(ref) and inspect.isfunction(ours):  # peftkit's own copy of a default helper (EVA's
        return ref.__name__ == ours.__name__  # forward_fn_dict, ...): same name, same documented behaviour
    try:
        return bool(ref == ours)
    except Exception:  # noqa: BLE001 - e.g. tensors; treat as different
        return False


def compare_signatures(ref: Any, ours: Any) -> list[str]:
    """The ways ``ours`` is incompatible with ``ref`` (the rules of the module docstring); [] when compatible."""
    try:
        ref_sig = inspect.signature(ref)
    except (TypeError, ValueError):
        return []  # a builtin without a signature (exception classes): nothing to compare
    try:
        our_sig = inspect.signature(ours)
    except (TypeError, ValueError) as exc:
        return [f"no signature in peftkit ({exc})"]
    rp, op = ref_sig.parameters, our_sig.parameters
    var = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    problems = [f"missing {kind.description}" for kind in var
                if any(p.kind == kind for p in rp.values()) and not any(p.kind == kind for p in op.values())]
    ref_pos = [n for n, p in rp.items() if p.kind in positional]
    our_pos = [n for n, p in op.items() if p.kind in positional]
    if our_pos[: len(ref_pos)] != ref_pos:
        problems.append(f"positional parameters {ref_pos} in the reference, {our_pos} here")
    for name, p in rp.items():
        if p.kind in var:
            continue
        q = op.get(name)
        if q is None:
            problems.append(f"missing parameter {name!r}")
            continue
        if q.kind != p.kind:
            problems.append(f"{name!r} is {q.kind.description}, {p.kind.description} in the reference")
        if p.default is not _EMPTY and not _same_default(p.default, q.default):
            problems.append(f"{name!r} defaults to {q.default!r}, {p.default!r} in the reference")
    ref_varargs = any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in rp.values())
    for name, q in op.items():
        if name in rp or q.kind in var:
            continue
        if q.default is _EMPTY:
            problems.append(f"extra parameter {name!r} without a default")
        elif ref_varargs and q.kind != inspect.Parameter.KEYWORD_ONLY:
            problems.append(f"extra parameter {name!r} must be keyword-only (the reference takes *args)")
    return problems


def _init_fields(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.init:
            factory = f.default_factory
            out[f.name] = f.default if f.default is not dataclasses.MISSING else (
                factory() if factory is not dataclasses.MISSING else _EMPTY)
    return out


def compare_fields(ref: type, ours: type) -> list[str]:
    """Config dataclasses: every reference ``__init__`` field exists in peftkit with the same default."""
    if not dataclasses.is_dataclass(ours):
        return ["not a dataclass in peftkit"]
    ref_fields, our_fields = _init_fields(ref), _init_fields(ours)
    problems = []
    for name, default in ref_fields.items():
        if name not in our_fields:
            problems.append(f"missing field {name!r}")
        elif not _same_default(default, our_fields[name]) and not (
            dataclasses.is_dataclass(default) and dataclasses.asdict(default) == dataclasses.asdict(our_fields[name])
        ):
            problems.append(f"field {name!r} defaults to {our_fields[name]!r}, {default!r} in the reference")
    problems += [f"extra field {name!r} without a default" for name, d in our_fields.items()
                 if name not in ref_fields and d is _EMPTY]
    return problems


def _public_methods(ref: type) -> list[str]:
    """Public methods / properties of a reference class, without those it inherits unchanged from ``nn.Module`` or
    ``object`` (the same objects in both libraries)."""
    names = []
    for name in dir(ref):
        if name.startswith("_"):
            continue
        attr = inspect.getattr_static(ref, name)
        if not (inspect.isfunction(attr) or isinstance(attr, (classmethod, staticmethod, property))):
            continue
        if any(inspect.getattr_static(base, name, None) is attr for base in (nn.Module, object)):
            continue
        names.append(name)
    return names


def compare_name(name: str) -> dict[str, list[str]]:
    """``{"<name>.<member>": problems}`` for one exported name (only members with problems)."""
    ref, ours = getattr(peft, name), getattr(peftkit, name)
    found: dict[str, list[str]] = {}
    if not inspect.isclass(ref):
        if callable(ref):
            found[f"{name}.()"] = compare_signatures(ref, ours)
        return {k: v for k, v in found.items() if v}
    if not inspect.isclass(ours):
        return {f"{name}.__init__": [f"a class in the reference, a {type(ours).__name__} here"]}
    if issubclass(ref, enum.Enum):
        ref_members = {m.name: m.value for m in ref}
        our_members = {m.name: m.value for m in ours} if issubclass(ours, enum.Enum) else {}
        missing = sorted(set(ref_members.items()) - set(our_members.items()))
        return {f"{name}.members": [f"missing members {missing}"]} if missing else {}
    if dataclasses.is_dataclass(ref):
        found[f"{name}.__init__"] = compare_fields(ref, ours)
    else:
        found[f"{name}.__init__"] = compare_signatures(ref, ours)
    for method in _public_methods(ref):
        key = f"{name}.{method}"
        if not hasattr(ours, method):
            found[key] = ["missing method"]
        elif not isinstance(inspect.getattr_static(ref, method), property):
            found[key] = compare_signatures(getattr(ref, method), getattr(ours, method))
    return {k: v for k, v in found.items() if v}


def _allowed(key: str) -> str | None:
    return next((pattern for pattern in ALLOWED if fnmatch.fnmatchcase(key, pattern)), None)


SHARED = sorted(n for n in peft.__all__ if hasattr(peftkit, n))


def test_reference_version() -> None:
    """The committed lists are for this reference version; a new one needs a fresh look at both."""
    assert peft.__version__ == REFERENCE_VERSION


def test_missing_names_match_the_committed_list() -> None:
    """The reference names peftkit does not export are exactly :data:`EXPECTED_MISSING` (it shrinks as methods
    land: remove the names the message lists as landed)."""
    missing = {n for n in peft.__all__ if not hasattr(peftkit, n)}
    landed, new = sorted(EXPECTED_MISSING - missing), sorted(missing - EXPECTED_MISSING)
    assert not landed and not new, (f"now exported by peftkit, remove from EXPECTED_MISSING: {landed}; "
                                    f"missing but not listed: {new}")


@pytest.mark.parametrize("name", SHARED)
def test_signature_compatible(name: str) -> None:
    """Every member of ``name`` is compatible with the reference's, or allowed on purpose (:data:`ALLOWED`)."""
    problems = {key: found for key, found in compare_name(name).items() if _allowed(key) is None}
    assert not problems, "\n".join(f"{key}: {'; '.join(found)}" for key, found in problems.items())


def test_allow_list_entries_are_used() -> None:
    """Each :data:`ALLOWED` entry still matches a difference: a fixed one must leave the list."""
    keys = [key for name in SHARED for key in compare_name(name)]
    unused = [pattern for pattern in ALLOWED if not any(fnmatch.fnmatchcase(key, pattern) for key in keys)]
    assert not unused, f"remove from ALLOWED (no longer different): {unused}"


def test_comparison_rules() -> None:
    """The checker itself: a missing parameter, another default, a renamed or reordered positional parameter,
    a required extra and a missing **kwargs are reported; keyword-only extras and added defaults are not."""

    def ref(a: int, b: int = 1, *, c: object = None, **kwargs: object) -> None: ...

    def same(a: int = 0, b: int = 1, d: int = 2, *, c: object = None, e: int = 3, **kw: object) -> None: ...

    def worse(b: int, a: int, *, c: object = 0, f: int) -> None: ...

    assert compare_signatures(ref, same) == []
    problems = " | ".join(compare_signatures(ref, worse))
    for expected in ("missing variadic keyword", "positional parameters", "'c' defaults to 0",
                     "extra parameter 'f' without a default"):
        assert expected in problems


# ---------------------------------------------------------------------------------------------------------------
# the behaviour behind the signatures this test made peftkit add (each failed before: the name did not exist)


def test_from_json_file_takes_the_reference_parameter(tmp_path) -> None:
    """``from_json_file(path_json_file=..., **kwargs)`` as the reference (extra keywords are ignored there too)."""
    peftkit.LoraConfig(r=4).save_pretrained(tmp_path)
    data = peftkit.LoraConfig.from_json_file(path_json_file=tmp_path / "adapter_config.json", unused=1)
    assert data["r"] == 4 and data == peft.LoraConfig.from_json_file(str(tmp_path / "adapter_config.json"))


def test_lora_runtime_config_is_accepted_and_never_saved(tmp_path) -> None:
    """``runtime_config=LoraRuntimeConfig(...)`` is accepted (default ``ephemeral_gpu_offload=False``), kept on
    copies, never written to ``adapter_config.json``; anything else is refused naming the field."""
    config = peftkit.LoraConfig(runtime_config=peftkit.LoraRuntimeConfig(ephemeral_gpu_offload=True))
    assert peftkit.LoraConfig().runtime_config == peftkit.LoraRuntimeConfig(ephemeral_gpu_offload=False)
    assert config.copy(r=4).runtime_config.ephemeral_gpu_offload is True
    assert "runtime_config" not in config.to_dict()
    config.save_pretrained(tmp_path)
    assert "runtime_config" not in (tmp_path / "adapter_config.json").read_text()
    assert peft.LoraConfig.from_pretrained(tmp_path).runtime_config.ephemeral_gpu_offload is False
    with pytest.raises(TypeError, match="runtime_config"):  # a ConfigError too
        peftkit.LoraConfig(runtime_config={"ephemeral_gpu_offload": True})


def test_tuner_state_dict_selects_the_targets() -> None:
    """``LoraModel(model, config, adapter_name, low_cpu_mem_usage, state_dict)``: with a state dict the adapter
    targets the modules its keys name, not ``config.target_modules`` (as the reference)."""
    from models import MLP

    state = {"lin1.lora_A.weight": None, "lin1.lora_B.weight": None}  # keys of the model's own state dict
    tuner = peftkit.LoraModel(MLP(), peftkit.LoraConfig(target_modules=["lin0"]), "default", False, state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference warns that config and state dict disagree
        ref = peft.LoraModel(MLP(), peft.LoraConfig(target_modules=["lin0"]), "default", False, state)
    ours = sorted(n for n, _ in tuner.model.named_modules() if n.endswith("lora_A"))
    assert ours == sorted(n for n, _ in ref.model.named_modules() if n.endswith("lora_A")) == ["lin1.lora_A"]


def test_get_model_config() -> None:
    """``LoraModel.get_model_config(model)``: the model's config as a dict, ``{"model_type": "custom"}`` without."""
    from models import MLP, tiny_llama

    assert peftkit.LoraModel.get_model_config(MLP()) == {"model_type": "custom"}
    llama = tiny_llama()
    ours = peftkit.LoraModel.get_model_config(llama)
    assert ours == peft.LoraModel.get_model_config(llama) and ours["model_type"] == "llama"


@pytest.mark.parametrize("config_name", ["LoraConfig", "IA3Config", "LoHaConfig", "LoKrConfig"])
def test_supports_lora_conversion_as_the_reference(config_name: str) -> None:
    """``PeftModel.supports_lora_conversion()`` / ``LoraModel.supports_lora_conversion()`` answer as the
    reference's for each method on the same model."""
    from models import MLP

    kwargs = {"target_modules": ["lin0", "lin1"]}
    if config_name == "IA3Config":
        kwargs["feedforward_modules"] = ["lin1"]
    ours = peftkit.get_peft_model(MLP(), getattr(peftkit, config_name)(**kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(MLP(), getattr(peft, config_name)(**kwargs))
    assert ours.supports_lora_conversion() == ref.supports_lora_conversion()
    assert ours.base_model.supports_lora_conversion() == ref.base_model.supports_lora_conversion()


def test_supports_lora_conversion_false_for_prompt_learning() -> None:
    """A prompt-learning adapter cannot become a LoRA."""
    from models import tiny_llama

    config = peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    assert peftkit.get_peft_model(tiny_llama(), config).supports_lora_conversion() is False


def test_prepare_inputs_for_generation_takes_task_ids() -> None:
    """Causal-LM and seq2seq models accept the reference's ``task_ids`` keyword (used by multitask prompt tuning
    only, ignored by the other methods there and here) and return the base model's inputs."""
    import torch
    from models import tiny_llama, tiny_t5

    ids = torch.tensor([[5, 6, 7]])
    # a positional id tensor is the decoder's input for seq2seq models
    for base, task, key in ((tiny_llama(), "CAUSAL_LM", "input_ids"), (tiny_t5(), "SEQ_2_SEQ_LM", "decoder_input_ids")):
        model = peftkit.get_peft_model(base, peftkit.LoraConfig(task_type=task, target_modules=["q", "q_proj"]))
        inputs = model.prepare_inputs_for_generation(ids, task_ids=None)
        assert torch.equal(inputs[key], ids)


def test_prefix_encoder_load_prompt_embeddings() -> None:
    """``PrefixEncoder.load_prompt_embeddings`` copies a flattened prefix ``(nvt, layers * 2 * dim)``; a projection
    head or a wrong shape is refused (ValueError, as the reference)."""
    import torch

    config = peftkit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, token_dim=4, num_layers=2,
                                        num_attention_heads=2, num_transformer_submodules=1)
    encoder = peftkit.PrefixEncoder(config)
    prefix = torch.randn(3, 2 * 2 * 4)
    encoder.load_prompt_embeddings(prefix)
    assert torch.equal(encoder(prefix=torch.arange(3)), prefix)  # an embedding lookup: exact
    with pytest.raises(ValueError, match="shape"):
        encoder.load_prompt_embeddings(torch.randn(3, 5))
    projected = peftkit.PrefixEncoder(config.copy(prefix_projection=True))
    with pytest.raises(ValueError, match="prefix_projection"):
        projected.load_prompt_embeddings(prefix)
