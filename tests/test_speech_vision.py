"""Speech and vision models: Whisper through the seq2seq wrapper and ``AutoPeftModel``, a ViT image classifier with
LoRA on its attention and a trained head (``modules_to_save``), and a diffusers-style UNet block (Conv2d + attention
from plain torch modules) trained DreamBooth-style with LoRA / LoHa / LoKr. Interop with the reference both ways.

The reference's ``PeftModelForSeq2SeqLM.forward`` passes ``input_ids=None`` and ``inputs_embeds=None`` to the base
model explicitly; ``WhisperForConditionalGeneration.forward`` has no such parameters, collects them in ``**kwargs``
and hands them to its decoder together with ``input_ids=decoder_input_ids``: ``TypeError: got multiple values for
keyword argument 'input_ids'`` for every forward (its ``generate`` works). peftkit's wrapper passes inputs through.
"""

from __future__ import annotations

import logging

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from models import UNetBlock, tiny_vit, tiny_whisper, unet_inputs, vit_inputs, whisper_inputs
from numerics import TINY_MODEL_REDUCTION, fp_tol

from peftkit import (
    AutoPeftModel,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    ModulesToSaveWrapper,
    PeftModel,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    get_peft_model,
    get_peft_model_state_dict,
)

peft = pytest.importorskip("peft")

# Outputs of two models (loaded vs trained, merged vs unmerged, peftkit vs the reference) run other kernels on
# other buffers: float32 over the tiny models' reductions (Whisper, ViT), or over the UNet block's path (3x3 convs
# over 4, 32, 32 and 32 channels, attention over 32 channels and 64 positions)
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)
UNET_TOL = fp_tol(torch.float32, 9 * 4 + 9 * 32 * 3 + 4 * 32 + 64)
ATOL = TOL["atol"]
WHISPER_LORA = {"target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8}
VIT_LORA = {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["classifier"], "r": 4, "lora_alpha": 8}
UNET_CONVS = ["conv_in", "resnet.conv1", "resnet.conv2", "conv_out"]
UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(autouse=True)
def _quiet_transformers():
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _unet() -> UNetBlock:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNetBlock()


def _assert_reloaded(loaded: PeftModel, original: PeftModel, got: torch.Tensor, expected: torch.Tensor,
                     tol: dict[str, float]) -> None:
    """A save/load round trip copies every adapter tensor bit for bit; the outputs of the two models (``got``,
    ``expected``) then agree to ``tol``: the same math on other buffers need not pick the same kernels on
    every CPU (an AVX2 machine's BLAS differed in the last bit)."""
    saved, reloaded = get_peft_model_state_dict(original), get_peft_model_state_dict(loaded)
    assert reloaded.keys() == saved.keys()
    for key, tensor in saved.items():
        assert torch.equal(reloaded[key], tensor), key
    torch.testing.assert_close(got, expected, **tol)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def _train(model: torch.nn.Module, loss_fn, steps: int, lr: float) -> list[float]:
    """``steps`` AdamW steps on the trainable parameters; the losses seen before each step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------------------------------------ Whisper


def test_reference_seq2seq_wrapper_breaks_on_whisper_peftkit_passes_inputs_through():
    inputs = whisper_inputs(2)
    ref = peft.get_peft_model(tiny_whisper(), peft.LoraConfig(task_type="SEQ_2_SEQ_LM", **WHISPER_LORA))
    with pytest.raises(TypeError, match="multiple values for keyword argument 'input_ids'"):
        ref(**inputs)

    base = tiny_whisper().eval()
    with torch.no_grad():
        expected = base(**inputs)
    pm = get_peft_model(base, LoraConfig(task_type="SEQ_2_SEQ_LM", **WHISPER_LORA)).eval()
    assert type(pm) is PeftModelForSeq2SeqLM
    with torch.no_grad():
        out = pm(**inputs)
    # LoRA starts as the identity: the wrapped model computes the base model's logits and loss
    torch.testing.assert_close(out.logits, expected.logits, **TOL)
    torch.testing.assert_close(out.loss, expected.loss, **TOL)
    with torch.no_grad():  # decoder_input_ids instead of labels works too
        out = pm(input_features=inputs["input_features"], decoder_input_ids=inputs["labels"])
    assert out.logits.shape == (2, inputs["labels"].shape[1], base.config.vocab_size)


def test_whisper_training_steps_lower_the_loss_and_change_only_lora():
    pm = get_peft_model(tiny_whisper(), LoraConfig(task_type="SEQ_2_SEQ_LM", **WHISPER_LORA))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    # q_proj and v_proj of 2 encoder self-attn, 2 decoder self-attn and 2 decoder cross-attn layers, A and B each
    assert len(trainable) == 24 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = _snapshot(pm)
    inputs = whisper_inputs(4)
    losses = _train(pm, lambda m: m(**inputs).loss, steps=6, lr=2e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    assert _changed(pm, before) == trainable


def test_whisper_generate_with_lora_unmerged_equals_merged():
    base = tiny_whisper().eval()
    features = whisper_inputs(2)["input_features"]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "return_dict_in_generate": True, "output_scores": True}
    with torch.no_grad():
        base_out = base.generate(input_features=features, **kwargs)
    pm = get_peft_model(base, LoraConfig(task_type="SEQ_2_SEQ_LM", init_lora_weights=False, **WHISPER_LORA)).eval()
    with torch.no_grad():
        unmerged = pm.generate(input_features=features, **kwargs)
        merged = pm.merge_and_unload().generate(input_features=features, **kwargs)
    assert len(unmerged.scores) == 5 and unmerged.sequences.shape[0] == 2
    # the adapter acts during generation ...
    assert (torch.stack(unmerged.scores) - torch.stack(base_out.scores)).abs().max() > 1e-3
    # ... and merged weights give the same tokens and scores
    assert torch.equal(merged.sequences, unmerged.sequences)
    torch.testing.assert_close(torch.stack(merged.scores), torch.stack(unmerged.scores), **TOL)


@pytest.mark.parametrize(
    ("task_type", "auto_cls", "peft_cls"),
    [
        ("SEQ_2_SEQ_LM", AutoPeftModelForSeq2SeqLM, PeftModelForSeq2SeqLM),
        ("SEQ_2_SEQ_LM", AutoPeftModel, PeftModelForSeq2SeqLM),
        (None, AutoPeftModel, PeftModel),
    ],
    ids=["seq2seq-auto-seq2seq", "seq2seq-auto", "no-task-auto"],
)
def test_whisper_save_and_auto_load(tmp_path, task_type, auto_cls, peft_cls):
    """``AutoModelForSeq2SeqLM`` does not know Whisper: peftkit falls back to ``AutoModelForSpeechSeq2Seq``
    (task SEQ_2_SEQ_LM) or uses the saved ``auto_mapping`` (no task)."""
    from transformers import WhisperForConditionalGeneration

    base = tiny_whisper()
    base.save_pretrained(tmp_path / "base")
    config = LoraConfig(task_type=task_type, init_lora_weights=False, base_model_name_or_path=str(tmp_path / "base"),
                        **WHISPER_LORA)
    pm = get_peft_model(base, config).eval()
    inputs = whisper_inputs(2)
    with torch.no_grad():
        expected = pm(**inputs).logits
    pm.save_pretrained(tmp_path / "adapter")

    loaded = auto_cls.from_pretrained(tmp_path / "adapter")
    assert type(loaded) is peft_cls
    assert type(loaded.get_base_model()) is WhisperForConditionalGeneration
    with torch.no_grad():
        _assert_reloaded(loaded, pm, loaded(**inputs).logits, expected, TOL)


def test_whisper_interop_with_reference_plain_wrapper(tmp_path):
    """The reference's plain ``PeftModel`` (no task type) works with Whisper: files go both ways."""
    inputs = whisper_inputs(2)
    pm = get_peft_model(tiny_whisper(), LoraConfig(init_lora_weights=False, **WHISPER_LORA)).eval()
    pm.save_pretrained(tmp_path / "peftkit")
    ref = peft.get_peft_model(tiny_whisper(), peft.LoraConfig(init_lora_weights=False, **WHISPER_LORA)).eval()
    ref.save_pretrained(tmp_path / "reference")
    with torch.no_grad():
        by_ref = peft.PeftModel.from_pretrained(tiny_whisper(), tmp_path / "peftkit").eval()(**inputs).logits
        by_peftkit = PeftModel.from_pretrained(tiny_whisper(), tmp_path / "reference")(**inputs).logits
        torch.testing.assert_close(by_ref, pm(**inputs).logits, **TOL)
        torch.testing.assert_close(by_peftkit, ref(**inputs).logits, **TOL)


# ------------------------------------------------------------------------------------------------ ViT


def _vit_loss(model) -> torch.Tensor:
    return model(**vit_inputs(8)).loss


def _trained_vit() -> tuple[PeftModel, dict[str, torch.Tensor], list[float]]:
    pm = get_peft_model(tiny_vit(), LoraConfig(**VIT_LORA))
    before = _snapshot(pm)
    return pm, before, _train(pm, _vit_loss, steps=6, lr=2e-2)


def test_vit_lora_attention_and_trained_head():
    pm, before, losses = _trained_vit()
    head = pm.get_base_model().classifier
    assert isinstance(head, ModulesToSaveWrapper)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    head_params = {"base_model.model.classifier.modules_to_save.default.weight",
                   "base_model.model.classifier.modules_to_save.default.bias"}
    lora_params = trainable - head_params
    assert head_params <= trainable
    assert len(lora_params) == 8 and all(".lora_A." in n or ".lora_B." in n for n in lora_params)
    assert losses[-1] < losses[0] - 0.1, losses
    # the head copy and the adapters trained; the base, including the original head, is untouched
    assert _changed(pm, before) == trainable
    assert torch.equal(head.original_module.weight, before["base_model.model.classifier.original_module.weight"])


def test_vit_save_load_exact_and_file_keys(tmp_path):
    pm, _, _ = _trained_vit()
    pm.eval().save_pretrained(tmp_path)
    keys = set(safetensors.torch.load_file(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert len(keys) == 10
    inputs = vit_inputs(3)
    loaded = PeftModel.from_pretrained(tiny_vit(), tmp_path)
    with torch.no_grad():
        _assert_reloaded(loaded, pm, loaded(**inputs).logits, pm(**inputs).logits, TOL)


def test_vit_interop_with_reference_both_ways(tmp_path):
    inputs = vit_inputs(3)
    pm, _, _ = _trained_vit()
    pm.eval().save_pretrained(tmp_path / "peftkit")
    by_ref = peft.PeftModel.from_pretrained(tiny_vit(), tmp_path / "peftkit").eval()

    ref = peft.get_peft_model(tiny_vit(), peft.LoraConfig(init_lora_weights=False, **VIT_LORA))
    with torch.no_grad():  # a head that differs from the base's
        ref.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    ref.eval().save_pretrained(tmp_path / "reference")
    by_peftkit = PeftModel.from_pretrained(tiny_vit(), tmp_path / "reference")
    with torch.no_grad():
        torch.testing.assert_close(by_ref(**inputs).logits, pm(**inputs).logits, **TOL)
        torch.testing.assert_close(by_peftkit(**inputs).logits, ref(**inputs).logits, **TOL)
        assert (ref(**inputs).logits - tiny_vit().eval()(**inputs).logits).abs().max() > 1e-2


def test_vit_seq_cls_task_trains_head_and_auto_loads_image_classifier(tmp_path):
    """With ``task_type="SEQ_CLS"`` the head joins ``modules_to_save`` by itself, and the Auto class falls back from
    ``AutoModelForSequenceClassification`` (which does not know ViT) to ``AutoModelForImageClassification``."""
    from transformers import ViTForImageClassification

    base = tiny_vit()
    base.save_pretrained(tmp_path / "base")
    config = LoraConfig(task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        base_model_name_or_path=str(tmp_path / "base"))
    pm = get_peft_model(base, config)
    assert type(pm) is PeftModelForSequenceClassification
    assert isinstance(pm.get_base_model().classifier, ModulesToSaveWrapper)
    _train(pm, _vit_loss, steps=2, lr=2e-2)
    pm.eval().save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    assert type(loaded.get_base_model()) is ViTForImageClassification
    inputs = vit_inputs(3)
    with torch.no_grad():
        _assert_reloaded(loaded, pm, loaded(**inputs).logits, pm(**inputs).logits, TOL)


# ------------------------------------------------------------------------------------------------ UNet block

UNET_CONFIGS = {
    "lora": lambda: LoraConfig(target_modules=UNET_CONVS + UNET_ATTENTION, r=4, lora_alpha=4),
    "loha": lambda: LoHaConfig(target_modules=["resnet.conv1", "resnet.conv2"], r=4, alpha=4),
    "lokr": lambda: LoKrConfig(target_modules=["resnet.conv1", "resnet.conv2"], r=4, alpha=4),
}
UNET_ADAPTER_LAYERS = {"lora": 8, "loha": 2, "lokr": 2}


def _denoising_loss(model) -> torch.Tensor:
    """DreamBooth-style objective: predict the noise added to fixed latents (MSE)."""
    latents = unet_inputs(4)["x"]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(11))
    return F.mse_loss(model(x=latents + noise), noise)


@pytest.mark.parametrize("method", list(UNET_CONFIGS))
def test_unet_block_dreambooth_style_training(tmp_path, method):
    pm = get_peft_model(_unet(), UNET_CONFIGS[method]())
    layers = [m for m in pm.modules() if hasattr(m, "adapter_layer_names")]
    assert len(layers) == UNET_ADAPTER_LAYERS[method]
    before = _snapshot(pm)
    losses = _train(pm, _denoising_loss, steps=8, lr=5e-2)
    assert losses[-1] < 0.9 * losses[0], losses
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert _changed(pm, before) == trainable  # the base stays frozen

    inputs = unet_inputs(3)
    pm.eval()
    with torch.no_grad():
        expected = pm(**inputs)
        assert (expected - _unet()(**inputs)).abs().max() > 1e-3  # training moved the outputs
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_unet(), tmp_path)
    with torch.no_grad():
        _assert_reloaded(loaded, pm, loaded(**inputs), expected, UNET_TOL)
        merged = loaded.merge_and_unload()
        assert not any(hasattr(m, "adapter_layer_names") for m in merged.modules())
        torch.testing.assert_close(merged(**inputs), expected, **UNET_TOL)


def test_unet_block_lora_interop_with_reference_both_ways(tmp_path):
    kwargs = {"target_modules": UNET_CONVS + UNET_ATTENTION, "r": 4, "lora_alpha": 8, "init_lora_weights": False}
    inputs = unet_inputs(2)
    pm = get_peft_model(_unet(), LoraConfig(**kwargs)).eval()
    pm.save_pretrained(tmp_path / "peftkit")
    ref = peft.get_peft_model(_unet(), peft.LoraConfig(**kwargs)).eval()
    ref.save_pretrained(tmp_path / "reference")
    ref_keys = set(safetensors.torch.load_file(tmp_path / "reference" / "adapter_model.safetensors"))
    assert set(safetensors.torch.load_file(tmp_path / "peftkit" / "adapter_model.safetensors")) == ref_keys
    ref_loaded = peft.PeftModel.from_pretrained(_unet(), tmp_path / "peftkit").eval()
    with torch.no_grad():
        by_ref = ref_loaded(**inputs)
        by_peftkit = PeftModel.from_pretrained(_unet(), tmp_path / "reference")(**inputs)
        torch.testing.assert_close(by_ref, pm(**inputs), **UNET_TOL)
        torch.testing.assert_close(by_peftkit, ref(**inputs), **UNET_TOL)
        # both libraries merge peftkit's adapter (LoRA on Conv2d and Linear) into the same weights
        merged = pm.merge_and_unload()
        merged_by_ref = ref_loaded.merge_and_unload()
        for name, tensor in merged_by_ref.state_dict().items():
            # W + scaling * (B @ A): rank 4 terms per element, by each library's own merge
            torch.testing.assert_close(merged.state_dict()[name], tensor, **fp_tol(torch.float32, 4 + 1))
