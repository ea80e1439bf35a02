"""Adapters on quantized bases (QLoRA): bitsandbytes 8-bit and 4-bit (nf4 / fp4, double quantization, float32 /
bfloat16 compute) and torchao int8 weight-only, on CPU.

Model level: a tiny Llama (hidden 64, intermediate 128, 2 layers, vocab 128) saved to disk and loaded with
``BitsAndBytesConfig``; LoRA trains through evaluation passes (the bitsandbytes 4-bit CPU repacking trap), saves the
same files as from a full-precision base, reloads with the same outputs in peftkit and in the reference, and merges
under the measured policy. Layer level: every quantization variant with LoRA, DoRA and IA3.

Merge bound (measured on this machine, stated in the README): merging re-quantizes, so the merged model's outputs
differ from the unmerged model's by a rounding of the same nature as the base's own quantization. The tests assert
``merged-vs-unmerged output diff <= K * (quantized-vs-float base output diff)`` on the same inputs, with
``K = MODEL_K`` for trained adapters on the tiny Llama (measured ratios: 8-bit ~0.1, nf4 ~0.4) and
``K = LAYER_K`` for random adapters (``init_lora_weights=False``: deltas as large as the weights, which grows the
quantization scales) on a single layer (measured ratios: 8-bit up to ~3.4, 4-bit up to ~2.0).
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from numerics import fp_tol
from safetensors.torch import load_file
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

import peftkit
from peftkit.errors import MergeError
from peftkit.layers.dispatch import QUANT_LINEAR, module_kind
from peftkit.quantization import QuantizedMergeWarning, backend_of, dense_weight

#: merged-vs-unmerged output difference allowed, in units of the base's own quantization error
MODEL_K = 4.0
LAYER_K = 5.0
#: half the largest gap between quantization levels, relative to the largest magnitude of the quantized weight:
#: int8 row-wise absmax (``1/254``, plus the float16 cast bitsandbytes makes first) and nf4 blockwise absmax
#: (largest code gap ``-0.6962 - (-1)``, halved)
HALF_STEP = {"8bit": 1 / 254 + 2**-11, "nf4": 0.1520}
#: peftkit and the reference compute the same quantized forward; they differ only by kernel choice and summation
REF_ATOL = 2e-4

MODEL_QUANT = {
    "8bit": {"load_in_8bit": True},
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32},
}
#: layer-level variants: "8bit" or (quant_type, double quantization, compute dtype)
LAYER_QUANT = {
    "8bit": "8bit",
    "nf4": ("nf4", False, torch.float32),
    "fp4": ("fp4", False, torch.float32),
    "nf4-dq-bf16": ("nf4", True, torch.bfloat16),
}


# ---------------------------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny-llama-64")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _load(path: Path, quant: str | None):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    if quant is None:
        return LlamaForCausalLM.from_pretrained(path).eval()
    config = BitsAndBytesConfig(**MODEL_QUANT[quant])
    return LlamaForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(input_ids=ids).logits.float()
    model.train(was)
    return out


def _lora_config(lib=peftkit, **kwargs):
    return lib.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **kwargs)


def _base_state(model) -> dict[str, torch.Tensor]:
    """Every non-adapter tensor of ``model`` (quantized storage included), cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def _train(model, steps: int, eval_between: bool) -> list[float]:
    """``steps`` AdamW steps on one batch; with ``eval_between`` an eval-mode no-grad forward before every step
    (what ``Trainer(eval_steps=1)`` does). Every trainable tensor must get a gradient at every step (the trap
    leaves them None; ``lora_A``'s is zero at the first step while ``B = 0``)."""
    ids = _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2)
    losses = []
    for _ in range(steps):
        if eval_between:
            _logits(model, _batch(1))
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert missing == [], f"no gradient after an eval pass: {missing[:4]}"
        assert any(p.grad.any() for p in params)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module", params=sorted(MODEL_QUANT))
def trained(request, tiny_dir, tmp_path_factory):
    """``(quant, peft model, losses, base tensors before training, saved adapter dir)`` for LoRA trained 6 steps
    on the quantized tiny Llama with an eval pass before every step."""
    quant = request.param
    torch.manual_seed(0)
    model = peftkit.prepare_model_for_kbit_training(_load(tiny_dir, quant), use_gradient_checkpointing=False)
    peft_model = peftkit.get_peft_model(model, _lora_config())
    before = _base_state(peft_model)
    losses = _train(peft_model, steps=6, eval_between=True)
    out_dir = tmp_path_factory.mktemp(f"adapter-{quant}")
    peft_model.save_pretrained(out_dir)
    return quant, peft_model, losses, before, out_dir


# ---------------------------------------------------------------------------------------------------- model level
def test_import_peftkit_does_not_import_quantization_libraries():
    code = "import sys, peftkit\nprint(sorted(m for m in ('bitsandbytes', 'torchao') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_quantized_linears_dispatch_to_quantized_lora_layers(trained):
    quant, peft_model, *_ = trained
    expected = {"8bit": "bnb 8bit", "nf4": "bnb 4bit"}[quant]
    statuses = peft_model.get_layer_status()
    assert len(statuses) == 4  # q_proj and v_proj of 2 layers
    assert {s.quantization_backend for s in statuses} == {expected}
    assert peft_model.get_model_status().quantization_backend == expected
    base = peft_model.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj
    assert module_kind(q_proj) == QUANT_LINEAR and backend_of(q_proj.get_base_layer()).name == expected
    assert (q_proj.in_features, q_proj.out_features) == (64, 64)


def test_training_through_eval_passes_changes_only_the_adapter(trained):
    _, peft_model, losses, before, _ = trained
    assert losses[-1] < losses[0] - 0.05, losses
    after = _base_state(peft_model)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)


def test_saved_files_match_a_full_precision_save(trained, tiny_dir, tmp_path):
    quant, _, _, _, out_dir = trained
    fp_model = peftkit.get_peft_model(_load(tiny_dir, None), _lora_config())
    fp_model.save_pretrained(tmp_path)
    q_tensors, fp_tensors = load_file(out_dir / "adapter_model.safetensors"), load_file(
        tmp_path / "adapter_model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in q_tensors.items()} == {
        k: (v.shape, v.dtype) for k, v in fp_tensors.items()}
    q_cfg = json.loads((out_dir / "adapter_config.json").read_text())
    fp_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert q_cfg == fp_cfg
    card = (out_dir / "README.md").read_text()
    assert "## Training procedure" in card
    assert "The following `bitsandbytes` quantization config was used during training:" in card
    flag = "load_in_8bit" if quant == "8bit" else "load_in_4bit"
    assert f"- {flag}: True" in card
    assert "bitsandbytes" not in (tmp_path / "README.md").read_text()


def test_reload_on_fresh_quantized_base_gives_same_outputs(trained, tiny_dir):
    quant, peft_model, _, _, out_dir = trained
    ids = _batch(2)
    expected = _logits(peft_model, ids)
    reloaded = peftkit.PeftModel.from_pretrained(_load(tiny_dir, quant), out_dir)
    torch.testing.assert_close(_logits(reloaded, ids), expected, atol=1e-5, rtol=0)
    base_only = _logits(_load(tiny_dir, quant), ids)
    assert (expected - base_only).abs().max() > 1e-3  # the adapter did change the outputs


def test_reference_loads_the_adapter_on_the_same_quantized_base(trained, tiny_dir):
    peft = pytest.importorskip("peft")
    quant, peft_model, _, _, out_dir = trained
    ids = _batch(2)
    ref = peft.PeftModel.from_pretrained(_load(tiny_dir, quant), str(out_dir))
    for module in ref.modules():  # same kernel as peftkit: no CPU inference repacking of 4-bit weights
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        ref_logits = ref.eval()(input_ids=ids).logits.float()
    torch.testing.assert_close(ref_logits, _logits(peft_model, ids), atol=REF_ATOL, rtol=0)


def _quant_error(tiny_dir: Path, quant: str, ids: torch.Tensor) -> float:
    """Max abs difference between the quantized and the float32 base's logits."""
    return (_logits(_load(tiny_dir, quant), ids) - _logits(_load(tiny_dir, None), ids)).abs().max().item()


def test_merge_requantizes_and_reports_an_error_within_the_quantization_error(trained, tiny_dir):
    quant, _, _, _, out_dir = trained
    ids = _batch(3)
    model = peftkit.PeftModel.from_pretrained(_load(tiny_dir, quant), out_dir)
    unmerged = _logits(model, ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged_model = model.merge_and_unload()
    reports = [w.message.report for w in caught if isinstance(w.message, QuantizedMergeWarning)]
    assert len(reports) == 1
    report = reports[0]
    assert len(report.records) == 4 and report.backends == [backend_of(
        merged_model.model.layers[0].self_attn.q_proj).name]
    assert 0 < report.max_output_error and 0 < report.max_weight_error
    assert "dequantize -> add -> re-quantize" in str(caught[0].message) or any(
        "re-quantize" in str(w.message) for w in caught)
    assert model.base_model.merge_report is report
    merged = _logits(merged_model, ids)
    diff = (merged - unmerged).abs().max().item()
    bound = MODEL_K * _quant_error(tiny_dir, quant, ids)
    assert 0 < diff <= bound, (diff, bound)
    for record in report.records:  # each re-quantized weight is within half a quantization step of the intended one
        layer = merged_model.get_submodule(record.layer)
        half_step = HALF_STEP[quant] * dense_weight(layer).abs().max().item()
        assert record.weight_error <= half_step, (record, half_step)
    assert not any(isinstance(m, peftkit.AdapterLayer) for m in merged_model.modules())
    assert backend_of(merged_model.model.layers[1].self_attn.v_proj) is not None  # still quantized


def test_merge_and_unload_dequantize_returns_a_full_precision_model(trained, tiny_dir):
    quant, _, _, _, out_dir = trained
    ids = _batch(3)
    model = peftkit.PeftModel.from_pretrained(_load(tiny_dir, quant), out_dir)
    unmerged = _logits(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantizedMergeWarning)  # nothing is re-quantized
        dense = model.merge_and_unload(dequantize=True)
    linears = [m for m in dense.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in linears)
    assert not hasattr(dense.config, "quantization_config") and not getattr(dense, "is_quantized", False)
    diff = (_logits(dense, ids) - unmerged).abs().max().item()
    # 4-bit kernels dequantize the weight, so the dense model computes the same; 8-bit also quantizes activations
    tol = 1e-4 if quant == "nf4" else MODEL_K * _quant_error(tiny_dir, quant, ids)
    assert diff <= tol, (diff, tol)


def test_trainer_trains_a_peftkit_model_on_a_quantized_base(tiny_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = peftkit.prepare_model_for_kbit_training(_load(tiny_dir, "8bit"), use_gradient_checkpointing=False)
    peft_model = peftkit.get_peft_model(model, _lora_config(init_lora_weights="gaussian"))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    rows = _batch(4)
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=peft_model, args=args, train_dataset=data)
    trainer.train()
    assert trainer.state.global_step == 2
    after = dict(peft_model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before)


def test_prepare_model_for_kbit_training(tiny_dir):
    model = _load(tiny_dir, "nf4")
    with torch.no_grad():
        model.model.norm.weight.data = model.model.norm.weight.data.to(torch.bfloat16)
    out = peftkit.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert out is model
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32  # half-precision non-quantized params upcast
    assert model.is_gradient_checkpointing
    emb = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert emb.requires_grad  # reentrant checkpointing needs the inputs to require grad
    q = model.model.layers[0].self_attn.q_proj
    assert q.support_avx512bf16_for_cpu is False  # the CPU repacking trap is turned off


def test_adapter_trains_after_an_eval_pass_made_before_wrapping(tiny_dir):
    """An eval-mode no-grad forward before ``get_peft_model`` may already have repacked the 4-bit weights for CPU
    inference (on CPUs with AVX512-BF16); wrapping undoes it, and gradients reach every adapter tensor."""
    model = _load(tiny_dir, "nf4")
    _logits(model, _batch(1))
    peft_model = peftkit.get_peft_model(model, _lora_config(init_lora_weights=False))
    packed = [m for m in peft_model.modules()
              if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]
    assert packed == []
    losses = _train(peft_model, steps=2, eval_between=True)
    assert losses[1] < losses[0]


# ---------------------------------------------------------------------------------------------------- layer level
class _Net(nn.Module):
    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _bnb_layer(variant: str | tuple, dense: nn.Linear) -> nn.Module:
    if variant == "8bit":
        layer = bnb.nn.Linear8bitLt(dense.in_features, dense.out_features, bias=True, has_fp16_weights=False,
                                    threshold=0.0)
        layer.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        quant_type, double, compute = variant
        layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=True, compute_dtype=compute,
                                  compress_statistics=double, quant_type=quant_type)
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                         compress_statistics=double, module=layer)
    layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")


def _torchao_layer(dense: nn.Linear, config_name: str = "Int8WeightOnlyConfig") -> nn.Module:
    torchao_quant = pytest.importorskip("torchao.quantization")
    net = _Net(nn.Linear(dense.in_features, dense.out_features))
    net.lin.load_state_dict(dense.state_dict())
    torchao_quant.quantize_(net, getattr(torchao_quant, config_name)())
    return net.lin


def _quantized(variant: str, dense: nn.Linear) -> nn.Module:
    return _torchao_layer(dense) if variant == "torchao-int8" else _bnb_layer(LAYER_QUANT[variant], dense)


METHOD_CONFIGS = {
    "lora": lambda: peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], init_lora_weights=False),
    "dora": lambda: peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], init_lora_weights=False,
                                       use_dora=True),
    "ia3": lambda: peftkit.IA3Config(target_modules=["lin"], feedforward_modules=[], init_ia3_weights=False),
    "randlora": lambda: peftkit.RandLoraConfig(r=4, randlora_alpha=1, target_modules=["lin"], init_weights=False),
}
LAYER_CASES = [(v, "lora") for v in [*LAYER_QUANT, "torchao-int8"]] + [
    ("8bit", "dora"), ("8bit", "ia3"), ("nf4", "ia3"), ("nf4-dq-bf16", "dora"), ("torchao-int8", "dora"),
    ("torchao-int8", "ia3"), ("8bit", "randlora"), ("nf4", "randlora")]


@pytest.mark.parametrize(("variant", "method"), LAYER_CASES, ids=[f"{v}-{m}" for v, m in LAYER_CASES])
def test_layer_trains_merges_within_bound_and_unmerges(variant, method):
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    x = torch.randn(16, 64)
    with torch.no_grad():
        quant_error = (_quantized(variant, dense)(x) - dense(x)).abs().max().item()
    model = peftkit.get_peft_model(_Net(_quantized(variant, dense)), METHOD_CONFIGS[method]())
    with torch.no_grad():  # DoRA: magnitudes away from the norms, so merging rescales rows
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=torch.Generator().manual_seed(1)))
    layer = model.base_model.model.lin
    assert module_kind(layer) == QUANT_LINEAR
    model.train()
    model(x).pow(2).mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.any() for _, p in trainable)
    assert all(("lora_" in n or "ia3_" in n) for n, _ in trainable)

    model.eval()
    with torch.no_grad():
        unmerged = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter()
    (report,) = [w.message.report for w in caught if isinstance(w.message, QuantizedMergeWarning)]
    assert [r.layer for r in report.records] == ["lin"]
    with torch.no_grad():
        merged = model(x)
    diff = (merged - unmerged).abs().max().item()
    assert diff <= LAYER_K * quant_error, (diff, quant_error)
    # the report measured the same thing on its own probe batch: same order of magnitude
    assert report.max_output_error <= LAYER_K * quant_error * 2
    assert layer.merged_adapters == ["default"]
    model.unmerge_adapter()
    with torch.no_grad():
        restored = model(x)
    assert (restored - unmerged).abs().max().item() <= LAYER_K * quant_error


def test_lora_on_quantized_layer_is_identity_at_init():
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    for variant in [*LAYER_QUANT, "torchao-int8"]:
        base = _Net(_quantized(variant, dense))
        # train mode throughout: bitsandbytes picks other kernels in eval mode (8-bit inference path, 4-bit CPU
        # repacking), which would differ from the training kernels by rounding
        with torch.no_grad():
            expected = base(x)
        model = peftkit.get_peft_model(base, peftkit.LoraConfig(r=4, target_modules=["lin"]))
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)


def test_torchao_merge_refuses_what_it_cannot_requantize():
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    lin = _torchao_layer(dense, "Int8DynamicActivationInt8WeightConfig")
    model = peftkit.get_peft_model(_Net(lin), METHOD_CONFIGS["lora"]())
    weight_before = model.base_model.model.lin.get_base_layer().weight
    with pytest.raises(MergeError, match="torchao: cannot re-quantize weights of type Int8Tensor"):
        model.merge_and_unload()
    layer = model.base_model.model.lin
    assert layer.merged_adapters == [] and layer.get_base_layer().weight is weight_before
    x = torch.randn(4, 64)
    with torch.no_grad():
        # the merged model computes the dequantized weight plus the update. The int8 forward is no reference for
        # that: oneDNN's int8 GEMM on AVX2 without VNNI saturates 16-bit partial sums (0.39 off with
        # ONEDNN_MAX_CPU_ISA=AVX2), so the expected output is computed in float32 from the dequantized weight
        base = layer.get_base_layer()
        expected = F.linear(x, dense_weight(base) + layer.get_delta_weight("default"), base.bias)
        dense_model = model.merge_and_unload(dequantize=True)
    assert type(dense_model.lin) is nn.Linear
    with torch.no_grad():  # another summation order over 64 inputs plus rank 8
        torch.testing.assert_close(dense_model(x), expected, **fp_tol(torch.float32, 64 + 8))


def test_loha_refuses_quantized_layers():
    lin = _bnb_layer("8bit", nn.Linear(64, 32))
    with pytest.raises(peftkit.UnsupportedModuleError):
        peftkit.get_peft_model(_Net(lin), peftkit.LoHaConfig(target_modules=["lin"]))


def test_merge_report_measures_an_inactive_adapter_against_its_own_output():
    """Merging an adapter that is not active: "before" must include it, or the report would show the whole adapter
    effect instead of the rounding."""
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    x = torch.randn(16, 64)
    with torch.no_grad():
        quant_error = (_bnb_layer("8bit", dense)(x) - dense(x)).abs().max().item()
    model = peftkit.get_peft_model(_Net(_bnb_layer("8bit", dense)), METHOD_CONFIGS["lora"]())
    model.add_adapter("other", METHOD_CONFIGS["lora"]())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter(["other"])
    (report,) = [w.message.report for w in caught if isinstance(w.message, QuantizedMergeWarning)]
    assert [(r.layer, r.adapter) for r in report.records] == [("lin", "other")]
    with torch.no_grad():
        adapter_effect = (x @ model.base_model.model.lin.get_delta_weight("other").T).abs().max().item()
    assert report.max_output_error <= LAYER_K * quant_error < adapter_effect / 10


def test_merge_warning_rebuilds_from_its_message() -> None:
    """``warnings`` consumers (pytest-xdist) rebuild a warning as ``cls(*warning.args)``: that must work and keep the
    text, with ``report`` None when only the message is known."""
    from peftkit.quantization import QuantizedMergeReport
    from peftkit.quantization.merge import QuantizedMergeRecord

    record = QuantizedMergeRecord(layer="lin", adapter="default", backend="bnb_8bit", output_error=0.5,
                                  weight_error=0.25)
    original = QuantizedMergeWarning(QuantizedMergeReport(records=[record]))
    rebuilt = QuantizedMergeWarning(*original.args)
    assert str(rebuilt) == str(original) and rebuilt.report is None and original.report is not None
