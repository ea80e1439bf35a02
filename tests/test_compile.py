"""peftkit under ``torch.compile``.

- A compiled model has zero graph breaks (``torch._dynamo.explain``) in the training forward and in the no-grad
  forward, for every registered method's example configs on the tiny Llama (LoRA with and without dropout, DoRA,
  rsLoRA, biases; IA3; LoHa; LoKr with rank dropout; AdaLoRA; prompt tuning, p-tuning, prefix tuning), and for
  LoRA with several active adapters, and LoRA/DoRA on embeddings and convolutions: the eager fast paths (no-grad plans, the native kernel, the fused dropout
  autograd functions, identity caches) step aside while dynamo traces.
- A compiled LoRA model with ``lora_dropout > 0`` trains (it crashed in dynamo on the fused dropout function).
- Compiled training (inductor) gives the eager loss and gradients within 1e-5 (dropout 0).
- Compiled ``generate`` gives the eager greedy tokens.
- ``Trainer`` with ``torch_compile=True`` trains a LoRA adapter with dropout, without graph breaks.

Compiling is slow on small CPUs: graph breaks are counted with dynamo's own tracer (``explain``, no backend), and
only the numeric checks compile for real. Compiled hot-swap (no recompilation) is tested in test_hotswap.py.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from models import TASK_CASES, TaskCase

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.ops.lora_fused import add_lora_, dora_add_, linear_lora, lora_update_reference
from peftkit.registry import MethodSpec, all_methods

CASE: TaskCase = {c.name: c for c in TASK_CASES}["llama-causal"]


def _examples() -> list[Any]:
    out = []
    for spec in all_methods():
        for i, kwargs in enumerate(spec.example_configs):
            if kwargs.get("encoder_reparameterization_type") == "LSTM":
                continue  # dynamo does not trace nn.LSTM (torch's limitation; the reference uses nn.LSTM too)
            out.append(pytest.param(spec, dict(kwargs), id=f"{spec.peft_type}-{i}"))
    return out


def _build(spec: MethodSpec, kwargs: dict[str, Any]) -> PeftModel:
    config = {"task_type": CASE.task_type, **spec.non_identity_kwargs, **kwargs}
    if spec.kind != "prompt" and (spec.supported_kinds is None or "linear" in spec.supported_kinds):
        config["target_modules"] = list(CASE.target_modules)  # else the method's default (TrainableTokens: embedding)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_peft_model(CASE.build(), spec.config_cls(**config))


def _graph_breaks(model: torch.nn.Module, inputs: dict[str, torch.Tensor], grad: bool) -> list[str]:
    """The graph-break reasons dynamo reports for one forward of ``model`` (with or without autograd)."""
    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        explanation = torch._dynamo.explain(model)(**inputs)
    torch._dynamo.reset()
    return [f"{b.reason}".splitlines()[0] + f" at {b.user_stack[-1].filename}:{b.user_stack[-1].lineno}"
            if b.user_stack else f"{b.reason}" for b in explanation.break_reasons]


def _assert_no_breaks_in_training_and_no_grad(model: torch.nn.Module, inputs: dict) -> None:
    """Zero graph breaks in the training forward (train mode, grad) and in the eval ``no_grad`` forward."""
    model.train()
    assert _graph_breaks(model, inputs, grad=True) == []
    model.eval()
    assert _graph_breaks(model, inputs, grad=False) == []


@pytest.mark.slow
@pytest.mark.parametrize(("spec", "kwargs"), _examples())
def test_no_graph_breaks_in_training_and_no_grad_forward(spec, kwargs):
    model = _build(spec, kwargs)
    inputs = CASE.make_inputs(2)
    _assert_no_breaks_in_training_and_no_grad(model, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_no_graph_breaks_with_several_active_adapters(use_dora):
    torch.manual_seed(0)
    config = {"task_type": "CAUSAL_LM", "target_modules": "all-linear", "init_lora_weights": False}
    model = get_peft_model(CASE.build(), LoraConfig(**config, use_dora=use_dora))
    model.add_adapter("other", LoraConfig(**config, lora_dropout=0.1))
    model.base_model.set_adapter(["default", "other"])
    inputs = CASE.make_inputs(2)
    _assert_no_breaks_in_training_and_no_grad(model, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("case_name", ["custom-emb", "custom-conv2d"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_no_graph_breaks_on_embedding_and_conv_layers(case_name, use_dora):
    case = {c.name: c for c in TASK_CASES}[case_name]
    torch.manual_seed(0)
    config = LoraConfig(task_type=case.task_type, target_modules=list(case.target_modules), init_lora_weights=False,
                        lora_dropout=0.1, use_dora=use_dora)
    model = get_peft_model(case.build(), config)
    inputs = case.make_inputs(2)
    _assert_no_breaks_in_training_and_no_grad(model, inputs)


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_fused_ops_trace_in_one_graph_as_the_plain_reference(p):
    """``linear_lora`` / ``add_lora_`` (autograd functions, scratch buffers, their own mask draw in eager mode)
    compile with ``fullgraph=True`` (any graph break raises) to the plain formula; ``dora_add_`` declines."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(2, 3, 8, generator=gen), torch.randn(6, 8, generator=gen), torch.randn(6, generator=gen)
    A = torch.randn(4, 8, generator=gen, requires_grad=True)
    B = torch.randn(6, 4, generator=gen, requires_grad=True)

    def fused(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        return (linear_lora(x, W, b, A, B, 2.0, p), add_lora_(F.linear(x, W, b), x, A, B, 2.0, None, p),
                dora_add_(F.linear(x, W, b), x, A, B, 2.0, torch.ones(6), torch.ones(6), b))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        out_fused, out_add, out_dora = torch.compile(fused, backend="aot_eager", fullgraph=True)(x)
        torch.manual_seed(3)  # the same dropout masks: F.dropout from the default generator, in the same order
        expected = lora_update_reference(F.linear(x, W, b), x, A, B, 2.0, None, p)
    assert out_dora is None
    torch.testing.assert_close(out_fused, expected, atol=1e-6, rtol=1e-6)  # same ops, same order: float32 rounding
    if p == 0.0:
        torch.testing.assert_close(out_add, expected, atol=1e-6, rtol=1e-6)
    out_fused.sum().backward()
    assert A.grad is not None and B.grad is not None
    torch._dynamo.reset()


def test_compiled_training_with_dropout_runs():
    """The fused dropout autograd function used to crash dynamo (an intermediate aliasing an output)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = get_peft_model(CASE.build(), LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear",
                                                    lora_dropout=0.1, init_lora_weights=False)).train()
    inputs = CASE.make_inputs(2)
    compiled = torch.compile(model, backend="aot_eager")
    loss = compiled(**inputs).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    torch._dynamo.reset()


def _loss_and_grads(model: PeftModel, inputs: dict[str, torch.Tensor], run: Any = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of ``run`` (default: ``model``) on ``inputs`` and the gradients it leaves on ``model``'s parameters."""
    model.zero_grad(set_to_none=True)
    loss = (model if run is None else run)(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_compiled_training_matches_eager_loss_and_gradients():
    torch.manual_seed(0)
    model = get_peft_model(CASE.build(), LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear",
                                                    init_lora_weights=False)).train()
    inputs = CASE.make_inputs(2)
    eager_loss, eager_grads = _loss_and_grads(model, inputs)
    compiled = torch.compile(model)  # inductor: fuses and reorders the float32 ops (a few ulp over ~64-long sums)
    loss, grads = _loss_and_grads(model, inputs, compiled)
    torch._dynamo.reset()
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == eager_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_compiled_generate_gives_the_eager_greedy_tokens():
    torch.manual_seed(0)
    model = get_peft_model(CASE.build(), LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear",
                                                    init_lora_weights=False)).eval()
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": 4, "min_new_tokens": 4,
              "do_sample": False}
    expected = model.generate(**kwargs)  # eager: the no-grad plan and (when built) the native kernel
    inner = model.get_base_model()
    inner.forward = torch.compile(inner.forward, backend="aot_eager")
    try:
        out = model.generate(**kwargs)
    finally:
        del inner.forward
        torch._dynamo.reset()
    assert torch.equal(out, expected)  # integer token ids (greedy picks differ only at a near-tie of logits)


@pytest.mark.slow
def test_trainer_torch_compile_trains_with_dropout_without_graph_breaks(tmp_path):
    """``TrainingArguments(torch_compile=True)`` (Trainer compiles the model itself) trains a LoRA adapter with
    dropout: the adapter changes, the losses are finite, dynamo records no graph break, and the checkpoint holds
    the adapter only."""
    import datasets
    import transformers

    from peftkit.integrations import AdapterTrainer

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = get_peft_model(CASE.build(), LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear",
                                                    lora_dropout=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(3, 128, (8, 8), generator=torch.Generator().manual_seed(1)).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 8] * 8, "labels": ids})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, save_steps=3, logging_steps=1,
        learning_rate=1e-2, report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        torch_compile=True, torch_compile_backend="aot_eager")
    trainer = AdapterTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    torch._dynamo.reset()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert breaks == {}
    # every adapter tensor moved (an inequality: exact is the strict check here)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    assert sorted(os.listdir(tmp_path / "checkpoint-3")).count("adapter_model.safetensors") == 1
    assert not any(f.startswith("model.safetensors") for f in os.listdir(tmp_path / "checkpoint-3"))
