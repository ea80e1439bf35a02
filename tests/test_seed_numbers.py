"""The numbers quoted by the seed documents: mt0-large with LoRA r=8 trains 2,359,296 of 1,231,940,608 parameters,
and a LoRA r=16 on q_proj/v_proj of opt-350m saves an adapter_model.safetensors of about 6.3 MB.

Both models are built on the meta device (no memory, no init time); only adapter tensors are materialised."""

from __future__ import annotations

import re

import pytest
import torch
from models import CASES_BY_NAME
from torch import nn

from peftkit import LoraConfig, TaskType, get_peft_model
from peftkit.methods.lora.layers import LoraLayer

PRINT_LINE = re.compile(r"^trainable params: (\d{1,3}(?:,\d{3})*) \|\| all params: (\d{1,3}(?:,\d{3})*) \|\| "
                        r"trainable%: (\d+\.\d{4})$")


def _mt0_large_on_meta() -> nn.Module:
    from transformers import MT5Config, MT5ForConditionalGeneration

    config = MT5Config(vocab_size=250112, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24,
                       num_heads=16, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    with torch.device("meta"):
        model = MT5ForConditionalGeneration(config)
        # transformers 5.x's MT5Config forces tie_word_embeddings=True; mt0-large's checkpoint has its own LM head
        if model.lm_head.weight is model.shared.weight:
            model.lm_head.weight = nn.Parameter(torch.empty(250112, 1024))
    assert model.lm_head.weight is not model.shared.weight
    return model


def test_mt0_large_trainable_parameters(capsys):
    model = _mt0_large_on_meta()
    config = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, inference_mode=False, r=8, lora_alpha=32, lora_dropout=0.1)
    peft_model = get_peft_model(model, config)
    assert peft_model.get_nb_trainable_parameters() == (2_359_296, 1_231_940_608)
    n_layers = sum(isinstance(m, LoraLayer) for m in peft_model.modules())
    assert n_layers == 24 * 2 + 24 * 4  # q and v of every encoder self-attention and decoder self/cross-attention
    peft_model.print_trainable_parameters()
    out = capsys.readouterr().out
    assert out == "trainable params: 2,359,296 || all params: 1,231,940,608 || trainable%: 0.1915\n"


def _opt_350m_on_meta() -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                       vocab_size=50272, word_embed_proj_dim=512, max_position_embeddings=2048)
    with torch.device("meta"):
        return OPTForCausalLM(config)


def _materialise_adapters(model: nn.Module) -> None:
    """Give every LoRA A/B real CPU storage with the default init (A kaiming-uniform, B zero)."""
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            for name in layer.lora_A:
                layer.lora_A[name].to_empty(device="cpu")
                layer.lora_B[name].to_empty(device="cpu")
                nn.init.kaiming_uniform_(layer.lora_A[name].weight, a=5**0.5)
                nn.init.zeros_(layer.lora_B[name].weight)


def test_opt_350m_adapter_file_size(tmp_path, capsys):
    peft_model = get_peft_model(_opt_350m_on_meta(),
                                LoraConfig(task_type="CAUSAL_LM", r=16, target_modules=["q_proj", "v_proj"]))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert trainable == 24 * 2 * (16 * 1024 + 1024 * 16) == 1_572_864
    _materialise_adapters(peft_model)
    peft_model.save_pretrained(tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert 1_572_864 * 4 < size
    assert 6.2e6 < size < 6.4e6  # "6.3 MB"

    peft_model.print_trainable_parameters()
    line = capsys.readouterr().out.rstrip("\n")
    match = PRINT_LINE.fullmatch(line)
    assert match, line
    assert int(match[1].replace(",", "")) == trainable and int(match[2].replace(",", "")) == total
    assert float(match[3]) == pytest.approx(100 * trainable / total, abs=5e-5)


def test_print_format_small_model(capsys):
    peft_model = get_peft_model(CASES_BY_NAME["custom-mlp"].build(), LoraConfig(target_modules=["lin0"], r=4))
    # lin0: A (4, 10) + B (20, 4) = 120 trainable; base 10*20+20 + 20*2+2 = 262
    peft_model.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 120 || all params: 382 || trainable%: 31.4136\n"
