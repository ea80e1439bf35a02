"""Every architecture transformers builds tiny from a config: LoRA with ``all-linear`` and with the default targets.

For each model type of :mod:`arch_models` (causal LM, seq2seq, encoder with a classification head, image
classification) and each of ``target_modules="all-linear"`` / ``target_modules=None`` (the model type's defaults):

- ``test_train_save_reload``: peftkit's ``get_peft_model`` runs forward and backward, every trainable parameter gets
  a gradient, and ``save_pretrained`` + ``PeftModel.from_pretrained`` on a fresh copy of the base reproduces the
  outputs bitwise (same code path on the same tensors, so exact equality is the right check).
- ``test_same_targets_as_reference``: the reference (🤗 PEFT) adapts the same modules, trains the same parameters
  (names and shapes) and raises where peftkit raises (peftkit with a typed :class:`peftkit.PeftError`), except for
  the differences on purpose listed in :data:`DIFFERENCES`.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest
import torch
from arch_models import ARCH_CASES, ArchCase
from numerics import TINY_MODEL_REDUCTION, fp_tol

import peftkit

TARGETS = {"all-linear": "all-linear", "default": None}

_WIDER_TABLE = ("peftkit's default target_modules table also covers this model type (same attention names as a "
                "listed type); the reference has no entry and raises 'Please specify target_modules'")
_CONVERSION_EMPTIES_DEFAULTS = ("the reference's MoE conversion turns target_modules=None into an empty set before "
                                "its default table is read, so it raises; peftkit applies its table (attention)")

#: ``(model_type, targets) -> reason`` where peftkit differs from the reference on purpose
DIFFERENCES: dict[tuple[str, str], str] = {
    **{(t, "default"): _WIDER_TABLE for t in (
        "blenderbot", "blenderbot-small", "m2m_100", "marian", "mbart", "pegasus", "plbart", "umt5", "camembert",
        "distilbert", "ernie", "esm", "megatron-bert", "mobilebert", "rembert", "roc_bert", "xlm-roberta-xl",
        "cohere", "granite", "olmo", "olmo2", "phi3", "qwen2_moe", "starcoder2", "whisper", "xglm", "gpt_oss",
        "phimoe",
    )},
    **{(t, "default"): _CONVERSION_EMPTIES_DEFAULTS for t in (
        "mixtral", "qwen3_moe", "olmoe", "glm4_moe", "qwen3_next", "minimax", "flex_olmo", "deepseek_v2",
        "deepseek_v3",
    )},
    **{(t, "all-linear"): "all-linear leaves out its nn.Linear-subclass router, whose forward returns a tuple; the "
       "reference wraps it and fails on the first forward" for t in ("llama4_text", "phimoe")},
    ("deepseek_v4", "all-linear"): "all-linear leaves out DeepseekV4GroupedLinear (o_a_proj), an nn.Linear subclass "
    "computing a grouped projection; the reference wraps it and fails on the first forward",
    ("jamba", "all-linear"): "all-linear leaves out dt_proj, whose weight the Mamba mixer reads directly (never "
    "calling the module); the reference adapts it and the adapter never takes part",
    ("distilbert", "all-linear"): "modules_to_save matches whole name segments: 'classifier' does not select "
    "pre_classifier (an all-linear target); the reference's suffix rule does and raises TypeError",
}

#: ``model_type -> (regex over parameter names, reason)``: adapted modules that the test's forward does not use, so
#: their adapter weights get no gradient (the model computes them only for other inputs)
UNUSED_IN_FORWARD: dict[str, tuple[str, str]] = {
    "encoder-decoder": (r"\.encoder\.pooler\.", "EncoderDecoderModel does not use its BERT encoder's pooler"),
    "big_bird": (r"\.bert\.pooler\.", "BigBird's classification head reads the sequence output, not the pooler"),
    "esm": (r"\.contact_head\.", "ESM's contact head runs only when contacts are requested"),
    "luke": (r"entity|w2e_|e2w_|e2e_", "LUKE's entity embeddings and entity-aware attention need entity_ids"),
    "led": (r"_global\.", "LED's global-attention projections run only with a global_attention_mask"),
    "siglip": (r"\.vision_model\.head\.", "SigLIP's image classifier mean-pools; the attention-pooling head is unused"),
    **dict.fromkeys(("trocr", "whisper"), (r"\.encoder_attn\.",
                                           "the decoder-only model skips cross-attention without encoder states")),
    "deepseek_v4": (r"\.compressor\.", "the KV compressor runs only for sequences longer than its window"),
    "hy_v4": (r"\.indexer\.", "the sparse-attention indexer selects blocks only for long sequences"),
}


def _params(case: ArchCase, targets: str) -> Any:
    return pytest.param(case, targets, id=f"{case.model_type}-{targets}")


MATRIX = [_params(case, targets) for case in ARCH_CASES for targets in TARGETS]
REFERENCE_MATRIX = [_params(case, targets) for case in ARCH_CASES for targets in TARGETS]


def _config(lib: Any, case: ArchCase, targets: str) -> Any:
    """``LoraConfig(r=2, lora_alpha=4)`` of ``lib`` (peftkit or peft) with B != 0 (``init_lora_weights=False``)."""
    return lib.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS[targets], task_type=case.task_type,
                          init_lora_weights=False)


def _output(model: torch.nn.Module, case: ArchCase) -> torch.Tensor:
    out = model(**case.inputs())
    return out.logits if getattr(out, "logits", None) is not None else out[0]


def _trainable(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def _peftkit_model(case: ArchCase, targets: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peftkit.get_peft_model(case.build(), _config(peftkit, case, targets))


@pytest.mark.parametrize(("case", "targets"), MATRIX)
def test_train_save_reload(case: ArchCase, targets: str, tmp_path) -> None:
    try:
        model = _peftkit_model(case, targets)
    except peftkit.PeftError:
        return  # a typed refusal; test_same_targets_as_reference checks that the reference refuses too
    _output(model, case).float().square().mean().backward()
    unused = UNUSED_IN_FORWARD.get(case.model_type, (r"(?!)", ""))[0]
    trained = [n for n, p in model.named_parameters() if p.requires_grad and not re.search(unused, n)]
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None and n in trained]
    assert trained and not missing, f"trainable parameters without a gradient: {missing}"
    with torch.no_grad():
        expected = _output(model, case)
    model.save_pretrained(tmp_path)
    # trainable load: the same code path as the trained model on the same tensors, so the outputs are bitwise equal
    got = _output_after_load(case, tmp_path, is_trainable=True)
    assert torch.equal(got, expected), (got - expected).abs().max()
    # inference load: frozen adapters take the no-grad fast path (another summation order): float32 over the
    # tiny models' reduction lengths
    got = _output_after_load(case, tmp_path, is_trainable=False)
    torch.testing.assert_close(got, expected, **fp_tol(torch.float32, TINY_MODEL_REDUCTION))


def _output_after_load(case: ArchCase, path: Any, is_trainable: bool) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peftkit.PeftModel.from_pretrained(case.build(), path, is_trainable=is_trainable)
    with torch.no_grad():
        return _output(loaded, case)


def _reference(case: ArchCase, targets: str) -> dict[str, Any] | BaseException:
    """What the reference does: ``{"modules", "trainable", "target_parameters"}``, or the exception it raises."""
    import peft

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(case.build(), _config(peft, case, targets))
    except Exception as error:  # noqa: BLE001 - any refusal of the reference is compared below
        return error
    return {
        "modules": set(model.base_model.targeted_module_names),
        "parameters": set(getattr(model.base_model, "targeted_parameter_names", None) or ()),
        "trainable": _trainable(model),
        "target_parameters": model.peft_config["default"].target_parameters,
    }


@pytest.mark.interop
@pytest.mark.parametrize(("case", "targets"), REFERENCE_MATRIX)
def test_same_targets_as_reference(case: ArchCase, targets: str) -> None:
    """Same adapted modules and trainable parameters (names and shapes), or both refuse (peftkit with a typed
    error); a pair listed in :data:`DIFFERENCES` must differ (so that the list stays true)."""
    reference = _reference(case, targets)
    difference = DIFFERENCES.get((case.model_type, targets))
    try:
        model = _peftkit_model(case, targets)
    except peftkit.PeftError as error:
        assert isinstance(reference, BaseException) or difference, (
            f"peftkit raises {error!r} where the reference adapts {sorted(reference['modules'])}")
        return
    if isinstance(reference, BaseException):
        assert difference, f"the reference raises {reference!r}, peftkit adapts {model.base_model.targeted_module_names}"
        return
    ours = {"modules": set(model.base_model.targeted_module_names),
            "parameters": set(model.base_model.targeted_parameter_names), "trainable": _trainable(model),
            "target_parameters": set(getattr(model.peft_config["default"], "target_parameters", None) or ())}
    reference["target_parameters"] = set(reference["target_parameters"] or ())
    if difference:
        assert ours != reference, "listed in DIFFERENCES but peftkit and the reference agree"
        return
    assert ours["target_parameters"] == reference["target_parameters"]
    assert ours["modules"] == reference["modules"]
    assert ours["parameters"] == reference["parameters"]
    assert ours["trainable"] == reference["trainable"]


# --------------------------------------------------------------------------------------------------
# modules an adapter cannot work on: tuple-returning "linear" routers, weights that Mamba mixers read directly

_CASES = {case.model_type: case for case in ARCH_CASES}


def _lora(targets: Any, case: ArchCase) -> peftkit.LoraConfig:
    return peftkit.LoraConfig(r=2, lora_alpha=4, target_modules=targets, task_type=case.task_type)


@pytest.mark.parametrize(("model_type", "router"), [("llama4_text", "feed_forward.router"), ("phimoe", "mlp.router")])
def test_all_linear_leaves_out_tuple_routers(model_type: str, router: str) -> None:
    """Llama 4's and Phi-MoE's routers subclass ``nn.Linear`` but return a tuple: all-linear leaves them out (the
    reference wraps them and fails on the first forward), and naming them is a typed error at injection."""
    case = _CASES[model_type]
    model = peftkit.get_peft_model(case.build(), _lora("all-linear", case))
    names = model.base_model.targeted_module_names
    assert not any(n.endswith(router) for n in names) and any(n.endswith("q_proj") for n in names)
    assert torch.isfinite(_output(model, case)).all()
    with pytest.raises(peftkit.UnsupportedModuleError, match=r"router.*tuple"):
        peftkit.get_peft_model(case.build(), _lora(["router"] if model_type == "llama4_text" else ["mlp.router"], case))


@pytest.mark.parametrize("model_type", ["mamba", "mamba2", "falcon_h1", "nemotron_h", "falcon_mamba"])
@pytest.mark.parametrize("target", ["out_proj", "conv1d"])
def test_mamba_fused_kernel_modules_refused(model_type: str, target: str) -> None:
    """As the reference (``ValueError``): the fused CUDA kernel of a Mamba mixer reads ``out_proj`` / ``conv1d``
    weights directly, so an adapter there would be skipped on GPU. ``in_proj`` is fine."""
    case = _CASES[model_type]
    with pytest.raises(peftkit.UnsupportedModuleError, match=rf"{target}.*{model_type}") as info:
        peftkit.get_peft_model(case.build(), _lora([target], case))
    assert isinstance(info.value, ValueError)
    model = peftkit.get_peft_model(case.build(), _lora(["in_proj"], case))
    assert model.base_model.targeted_module_names


@pytest.mark.parametrize("model_type", ["mamba", "falcon_mamba", "jamba"])
def test_dt_proj_read_directly(model_type: str) -> None:
    """These mixers compute ``dt_proj.weight @ x`` without calling ``dt_proj`` (on every device), so an adapter on
    it would never be used: naming it is refused, and all-linear leaves it out (the reference adapts it silently)."""
    case = _CASES[model_type]
    with pytest.raises(peftkit.UnsupportedModuleError, match="dt_proj"):
        peftkit.get_peft_model(case.build(), _lora(["dt_proj"], case))
    if model_type == "jamba":
        model = peftkit.get_peft_model(case.build(), _lora("all-linear", case))
        names = model.base_model.targeted_module_names
        assert not any(n.endswith("dt_proj") for n in names) and any(n.endswith("x_proj") for n in names)


@pytest.mark.parametrize("config", [peftkit.IA3Config(target_modules=["out_proj"], feedforward_modules=[]),
                                    peftkit.LoHaConfig(target_modules=["out_proj"]),
                                    peftkit.LoKrConfig(target_modules=["dt_proj"])], ids=["ia3", "loha", "lokr"])
def test_mamba_refusal_covers_every_method(config: Any) -> None:
    """The fused kernel bypasses any wrapper, so every method is refused (the reference checks LoRA-like ones)."""
    with pytest.raises(peftkit.UnsupportedModuleError, match=r"mixer\.(out|dt)_proj"):
        peftkit.get_peft_model(_CASES["mamba"].build(), config)
