"""peftkit against the reference (🤗 PEFT 0.21.2), side by side in one run: train, generate, mixed, inject, io,
import, merge, moe, methods. Prints a table per case and a summary of the performance issue's "Done when" ratios.

How to run (from the repo root, with the project venv)::

    .venv/bin/python bench/run.py                                  # everything, both libraries (~30-40 min)
    .venv/bin/python bench/run.py --cases moe --rounds 6           # MoE training only (~2-3 min)
    .venv/bin/python bench/run.py --cases train,generate --json out.json
    .venv/bin/python bench/run.py --lib peftkit --cases inject,io  # one library (no cross-library ratios)
    .venv/bin/python bench/run.py --quick --json quick.json        # tiny shapes, 1 rep (CI smoke test, < 1 min)
    .venv/bin/python bench/run.py --cases methods --methods loha,ia3 --rounds 4   # some methods' training steps

Method (PERF_BASELINE.md; generic parts in ``harness.py``): every (case, library[, variant]) runs in a fresh
subprocess with 1 torch thread, so its peak RSS (VmHWM after a ``clear_refs`` reset) is its own; variants inside a
subprocess are interleaved per repetition after a warm-up; the compared subprocesses of a case run back to back in
rounds, the order reversed every other round (ABBA); times are process CPU time (primary) and wall time; every
ratio is a median of ratios measured side by side (per repetition inside a process, per round across processes).
``--quick`` runs all tasks of a library in one subprocess (start-up dominates tiny shapes), so its RSS numbers
are not clean; it exists to show that every case runs. Nothing here asserts on timings.

Cases (98M = Llama-style h768/ff2048/12 layers/12 heads/vocab 8192; LoRA r=16, alpha=32 on q,k,v,o,gate,up,down):

- ``train``: batch 4x256, loss on the inputs, AdamW on the trainable parameters, ``use_cache=False``. Variants:
  ``floor`` (frozen base, ``enable_input_require_grads``, no adapter, no optimizer), ``manual`` (hand-written
  plain-torch LoRA accumulating into the base output in place with ``addmm_``), ``full`` (full fine-tuning),
  per library ``d0`` / ``d0.1`` (lora_dropout 0 / 0.1) and ``bf16`` (dropout 0 under CPU bf16 autocast, against
  ``floor_bf16``), and ``compiled`` (dropout 0, ``torch.compile(model)``: inductor, ``--quick`` aot_eager; the
  warm-up step compiles and its wall time is ``compile_s``). Step time split into forward / backward / optimizer, peak RSS, RSS growth during training,
  bytes saved for backward (``saved_tensors_hooks``, unique storages, parameters excluded). Gradient check (``d0``
  and ``manual``): with random non-zero B, the LoRA A/B gradients on a 1x32 batch against a plain out-of-place
  LoRA with the same weights on a fresh copy of the base.
- ``generate``: batch 1, greedy, 64 new tokens after a 32-token prompt: ``base`` (unwrapped model), ``unmerged``
  adapter, ``merged`` (``merge_and_unload``), ``disabled`` (inside ``disable_adapter()``); tokens/s, ratio to base.
- ``mixed``: ``mixed_batch.py``'s per-row adapter routing (58M model, N adapters; see that file).
- ``inject``: ``get_peft_model`` on the 1.1B TinyLlama-shape model on the meta device and on the real 98M model,
  against a plain loop creating the same A/B tensors (floor).
- ``io``: ``save_pretrained`` vs raw ``safetensors.save_file`` of the same tensors; ``PeftModel.from_pretrained``
  on a fresh base vs raw ``load_file`` (the same adapter file for both libraries).
- ``import``: ``python -c "import peftkit"`` vs ``"import peft"`` (and ``pass``, ``import torch``), wall time.
- ``merge``: ``merge_and_unload`` vs raw ``W.addmm_(B, A, alpha=scaling)`` per target; max|merged - unmerged|.
- ``moe``: training a Mixtral-style MoE model built from ``MixtralConfig`` (h512/ff1024/2 layers/8 heads/8 experts,
  top-2, vocab 1000; batch 4x128, fp32, loss on the inputs, AdamW) with LoRA r=16, alpha=32 on q,k,v,o and, through
  ``target_parameters``, on ``experts.gate_up_proj`` / ``experts.down_proj`` (3-D parameters); ``floor`` (frozen
  base, no adapter) and one subprocess per library. Step time, peak RSS, saved activations, and the per-round
  peftkit / reference ratios. Cross-library check: every trainable tensor set from one seeded generator in name
  order in both libraries, then loss and LoRA gradients of a 1 x 32 batch compared (peftkit adds the expert update
  on the routed tokens, the reference materialises ``W + dW`` per forward).
- ``methods``: one training benchmark per entry of ``METHOD_CASES`` (name -> config for a library, the same fields in
  both): the m100 shape with 4 layers, batch 4x256, fp32, loss on the inputs, AdamW, ``use_cache=False``; LoRA and
  its variants r=16, alpha=32 on the seven projections, prompt methods 20 virtual tokens. Each (method, library) in
  its own subprocess, the two libraries of a method alternating ABBA over the rounds. Step time (fwd / bwd / opt),
  peak RSS, saved activations, peftkit / reference ratios (median of per-round ratios) and Done-when rows per method
  (time <= 1.0; peak RSS <= 0.9 for methods, informational for LoRA variants). A ``floor`` task per round (frozen
  base, ``enable_input_require_grads``, no adapter, no optimizer) gives each library's peak RSS above the frozen base
  and the ratio of those (``peak_rss_above_floor``): what the method itself costs, where the whole-process ratio is
  bounded by the base model both libraries share. ``--methods a,b`` runs a subset; a method peftkit lacks fails only
  its own task (``--quick`` runs only the methods peftkit registers).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import harness
import mixed_batch

LIBS = ("peftkit", "peft")
CASES = ("train", "generate", "mixed", "inject", "io", "import", "merge", "moe", "methods")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 16, 32
INDEPENDENT = "-"  # the "library" of variants that use neither library (floor, manual, full)
TRAIN_SHARED = ("floor", "manual", "full", "floor_bf16")
TRAIN_LIB = ("d0", "d0.1", "bf16", "compiled")
#: moe: LoRA on the attention projections and, through ``target_parameters``, on the experts' 3-D parameters
MOE_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MOE_TARGET_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")

SHAPES: dict[str, dict[str, Any]] = {
    "full": {
        "m100": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "vocab_size": 8192, "tokens": 256},
        "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
               "num_key_value_heads": 4, "vocab_size": 32000, "tokens": 256},
        "moe": {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 8,
                "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 1000, "batch": 4, "seq": 128},
        # methods: the m100 shape with 4 layers; "tokens" (max positions) leaves room for 20 virtual tokens
        "methods": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 12,
                    "vocab_size": 8192, "tokens": 512, "batch": 4, "seq": 256},
        "batch": 4, "seq": 256, "prompt": 32, "new_tokens": 64, "check_tokens": 32,
    },
    "quick": {
        "m100": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "vocab_size": 256, "tokens": 32},
        "1b": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 3, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 512, "tokens": 32},
        "moe": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 256, "batch": 2, "seq": 32},
        # ff 192: every method's block sizes divide it (OFT 32, BOFT 4 x 2 butterflies, MiSS 64, RoAd 64)
        "methods": {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "vocab_size": 256, "tokens": 256, "batch": 2, "seq": 32},
        "batch": 2, "seq": 32, "prompt": 8, "new_tokens": 8, "check_tokens": 16,
    },
}
REPS = {"train": 3, "generate": 3, "mixed": 3, "inject": 5, "io": 7, "merge": 5, "import": 5, "moe": 5, "methods": 3}

#: the issue's "Done when" rows: (key, label, target upper bound or None for an informational row)
DONE_WHEN: tuple[tuple[str, str, float | None], ...] = (
    ("train_peak_rss_d0", "train peak RSS peftkit/ref, lora_dropout 0", 0.82),
    ("train_peak_rss_d0.1", "train peak RSS peftkit/ref, lora_dropout 0.1", 0.75),
    ("train_step_time_d0", "train step time peftkit/ref, lora_dropout 0", 1.0),
    ("train_step_time_d0.1", "train step time peftkit/ref, lora_dropout 0.1", 0.93),
    ("train_step_time_compiled", "compiled train step time peftkit/ref, lora_dropout 0 (torch.compile)", 1.0),
    ("train_grad_max_abs_diff", "LoRA grads max|peftkit - plain implementation|", 1e-6),
    ("generate_unmerged_over_base_peftkit", "generate time/token unmerged/base, peftkit", 1.05),
    ("generate_unmerged_over_base_peft", "generate time/token unmerged/base, reference (1.10-1.14 measured)", None),
    ("from_pretrained", "from_pretrained peftkit/ref", 0.3),
    ("import", "import peftkit / import peft (wall)", 0.5),
    ("inject_meta", "get_peft_model on 1.1B meta, peftkit/ref", 0.3),
    ("moe_step_time", "MoE train step time peftkit/ref (LoRA on attention + experts)", 0.6),
    ("moe_peak_rss", "MoE train peak RSS peftkit/ref (LoRA on attention + experts)", 0.85),
)


# ============================================================================================ methods: the table
#: aLoRA's invocation sequence; ``method_batch`` writes it into every row at a quarter of the sequence, so the
#: adapter is active on the last three quarters of each row (both libraries find it in ``input_ids``)
ALORA_INVOCATION = (5, 6, 7)
PROMPT_VIRTUAL_TOKENS = 20
#: LN tuning adapts the norms (the reference's default targets for Llama), not the projections
LN_TARGETS = ("input_layernorm", "post_attention_layernorm", "norm")
#: BD-LoRA per the reference's guidance: column-sharded q,k,v,gate,up get a block-diagonal B, row-sharded o,down
#: a block-diagonal A
BDLORA = {"target_modules_bd_a": ["o_proj", "down_proj"], "target_modules_bd_b": ["q_proj", "k_proj", "v_proj",
                                                                                 "gate_proj", "up_proj"], "nblocks": 2}


def _targets() -> list[str]:
    return list(TARGETS)


def _cfg(lib: str, name: str, **kwargs: Any) -> Any:
    """``<lib>.<name>(**kwargs)``: the same config class name and fields in both libraries (an AttributeError where a
    library lacks the class, recorded as that method's error)."""
    return getattr(import_lib(lib), name)(**kwargs)


def _prompt(lib: str, name: str, **kwargs: Any) -> Any:
    return _cfg(lib, name, task_type="CAUSAL_LM", num_virtual_tokens=PROMPT_VIRTUAL_TOKENS, **kwargs)


#: name -> builds the config for library ``lib`` (``peftkit`` or ``peft``) with the same fields in both. LoRA and its
#: variants use r=16, alpha=32 on the seven projections (``lora`` is the reference row); sub-configs are given as
#: dicts, which both libraries convert. Arrow is not here: it routes among frozen task LoRAs loaded for inference
#: (its router has no trainable parameters), so it has no training step to measure. QALoRA needs a GPTQ-quantized
#: base, which these CPU benchmarks cannot build.
METHOD_CASES: dict[str, Callable[[str], Any]] = {
    # LoRA and its variants
    "lora": lambda lib: lora_config(lib),
    "dora": lambda lib: lora_config(lib, use_dora=True),
    "rslora": lambda lib: lora_config(lib, use_rslora=True),
    "alora": lambda lib: lora_config(lib, alora_invocation_tokens=list(ALORA_INVOCATION)),
    "bdlora": lambda lib: lora_config(lib, use_bdlora=dict(BDLORA)),
    "kasa": lambda lib: lora_config(lib, kasa_config={}),
    "velora": lambda lib: lora_config(lib, velora_config={"num_groups": 64}),
    "monteclora": lambda lib: lora_config(lib, monteclora_config={}),
    # existing methods
    "ia3": lambda lib: _cfg(lib, "IA3Config", target_modules=_targets(), feedforward_modules=["down_proj"],
                            task_type="CAUSAL_LM"),
    "loha": lambda lib: _cfg(lib, "LoHaConfig", r=RANK, alpha=ALPHA, target_modules=_targets(), task_type="CAUSAL_LM"),
    "lokr": lambda lib: _cfg(lib, "LoKrConfig", r=RANK, alpha=ALPHA, target_modules=_targets(), task_type="CAUSAL_LM"),
    "adalora": lambda lib: _cfg(lib, "AdaLoraConfig", init_r=RANK, target_r=8, lora_alpha=ALPHA, total_step=1000,
                                target_modules=_targets(), task_type="CAUSAL_LM"),
    "prompt_tuning": lambda lib: _prompt(lib, "PromptTuningConfig"),
    "p_tuning": lambda lib: _prompt(lib, "PromptEncoderConfig"),
    "prefix_tuning": lambda lib: _prompt(lib, "PrefixTuningConfig"),
    # issue 21's methods (shapes from the reference docs; all block sizes divide 768 and 2048)
    "oft": lambda lib: _cfg(lib, "OFTConfig", r=0, oft_block_size=32, target_modules=_targets(), task_type="CAUSAL_LM"),
    "boft": lambda lib: _cfg(lib, "BOFTConfig", boft_block_size=4, boft_n_butterfly_factor=2, target_modules=_targets(),
                             task_type="CAUSAL_LM"),
    "hra": lambda lib: _cfg(lib, "HRAConfig", r=8, target_modules=_targets(), task_type="CAUSAL_LM"),
    "miss": lambda lib: _cfg(lib, "MissConfig", r=64, target_modules=_targets(), task_type="CAUSAL_LM"),
    "road": lambda lib: _cfg(lib, "RoadConfig", variant="road_1", group_size=64, target_modules=_targets(),
                             task_type="CAUSAL_LM"),
    "psoft": lambda lib: _cfg(lib, "PsoftConfig", r=32, psoft_alpha=32, target_modules=_targets(), task_type="CAUSAL_LM"),
    "osf": lambda lib: _cfg(lib, "OSFConfig", target_modules=_targets(), task_type="CAUSAL_LM"),
    "ln_tuning": lambda lib: _cfg(lib, "LNTuningConfig", target_modules=list(LN_TARGETS), task_type="CAUSAL_LM"),
    # issue 22's methods (the reference docs' defaults)
    "vera": lambda lib: _cfg(lib, "VeraConfig", r=256, target_modules=_targets(), task_type="CAUSAL_LM"),
    "fourierft": lambda lib: _cfg(lib, "FourierFTConfig", n_frequency=1000, scaling=150.0, target_modules=_targets(),
                                  task_type="CAUSAL_LM"),
    "vblora": lambda lib: _cfg(lib, "VBLoRAConfig", r=4, num_vectors=256, vector_length=64, topk=2,  # 64: divides the quick shape too
                               target_modules=_targets(), task_type="CAUSAL_LM"),
    "randlora": lambda lib: _cfg(lib, "RandLoraConfig", r=32, randlora_alpha=640, target_modules=_targets(),
                                 task_type="CAUSAL_LM"),
    "shira": lambda lib: _cfg(lib, "ShiraConfig", r=32, target_modules=_targets(), task_type="CAUSAL_LM"),
    "c3a": lambda lib: _cfg(lib, "C3AConfig", block_size=64, target_modules=_targets(),  # 64: divides the quick shape too
                            task_type="CAUSAL_LM"),
    "delora": lambda lib: _cfg(lib, "DeloraConfig", r=8, delora_lambda=15, target_modules=_targets(),
                               task_type="CAUSAL_LM"),
    "hira": lambda lib: _cfg(lib, "HiraConfig", r=32, target_modules=_targets(), task_type="CAUSAL_LM"),
    "gralora": lambda lib: _cfg(lib, "GraloraConfig", r=32, alpha=64, gralora_k=2, target_modules=_targets(),
                                task_type="CAUSAL_LM"),
    "waveft": lambda lib: _cfg(lib, "WaveFTConfig", n_frequency=2592, scaling=25.0, wavelet_family="db1",
                               target_modules=_targets(), task_type="CAUSAL_LM"),
    "lily": lambda lib: _cfg(lib, "LilyConfig", r=32, stride_A=2, num_B=2, target_modules=_targets(),
                             task_type="CAUSAL_LM"),
    "glora": lambda lib: _cfg(lib, "GloraConfig", r=8, target_modules=_targets(), task_type="CAUSAL_LM"),
    "pvera": lambda lib: _cfg(lib, "PveraConfig", r=128, target_modules=_targets(), task_type="CAUSAL_LM"),
    "tinylora": lambda lib: _cfg(lib, "TinyLoraConfig", r=2, u=64, target_modules=_targets(),
                                 task_type="CAUSAL_LM"),
    "unilora": lambda lib: _cfg(lib, "UniLoraConfig", r=4, theta_d_length=256, target_modules=_targets(),
                                task_type="CAUSAL_LM"),
    # method entries: insert new ones directly above this line, in the issue's order
}
#: LoRA variants: the issue asks for step time only (peak RSS informational); the other methods: RSS too
LORA_VARIANTS = ("lora", "dora", "rslora", "alora", "bdlora", "kasa", "velora", "monteclora")
METHOD_TIME_TARGET, METHOD_RSS_TARGET = 1.0, 0.9


def landed_methods(names: Sequence[str] = tuple(METHOD_CASES)) -> list[str]:
    """The entries of ``names`` peftkit can run now: its config class exists, accepts the fields, and its
    ``peft_type`` is registered (issue 21's methods land one by one; the rest stay runnable with ``--methods``)."""
    import peftkit

    def runs(name: str) -> bool:
        try:
            peftkit.get_method(METHOD_CASES[name]("peftkit").peft_type)
        except Exception:  # noqa: BLE001 - any failure means "not available in peftkit yet"
            return False
        return True

    return [name for name in names if runs(name)]


# ============================================================================================ shared parts
def import_lib(lib: str) -> Any:
    """The library module under test (``peftkit`` or the reference ``peft``)."""
    if lib == "peftkit":
        import peftkit

        return peftkit
    import peft

    return peft


def build_model(shape: dict[str, Any], device: str | None = None) -> Any:
    """A Llama-style causal LM from ``LlamaConfig`` (seed 0, fp32, sdpa), in eval mode with frozen weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape.get("num_key_value_heads", shape["num_attention_heads"]),
        vocab_size=shape["vocab_size"], max_position_embeddings=max(256, shape["tokens"]), attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device) if device else contextlib.nullcontext():
        model = LlamaForCausalLM(config)
    model.eval()
    model.requires_grad_(False)
    return model


def lora_config(lib: str, **kwargs: Any) -> Any:
    """``LoraConfig(r=16, lora_alpha=32, target_modules=q..down, task_type=CAUSAL_LM, **kwargs)`` of ``lib``."""
    return import_lib(lib).LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), task_type="CAUSAL_LM",
                                      **kwargs)


def build_moe_model(shape: dict[str, Any]) -> Any:
    """A Mixtral-style MoE causal LM from ``MixtralConfig`` (seed 0, fp32, sdpa; experts stored as 3-D parameters
    ``gate_up_proj`` (E, 2*ff, h) and ``down_proj`` (E, h, ff)), in eval mode with frozen weights."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape.get("num_key_value_heads", shape["num_attention_heads"]),
        num_local_experts=shape["num_local_experts"], num_experts_per_tok=shape["num_experts_per_tok"],
        vocab_size=shape["vocab_size"], max_position_embeddings=max(256, shape["seq"]), attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    model.eval()
    model.requires_grad_(False)
    return model


def moe_lora_config(lib: str) -> Any:
    """``LoraConfig(r=16, lora_alpha=32)`` of ``lib`` on q,k,v,o and ``target_parameters`` on the experts."""
    return import_lib(lib).LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(MOE_TARGET_MODULES),
                                      target_parameters=list(MOE_TARGET_PARAMETERS), task_type="CAUSAL_LM")


class ManualLoRA:
    """Factory of the hand-written LoRA module (kept torch-free at import time).

    ``forward(x)``: ``out = x @ W^T + b`` on the flattened input, then ``out.addmm_(x @ A^T, B^T, alpha=s)`` (in
    place, ``in_place=True``; the floor a lean library can reach) or ``out + (x @ A^T) @ B^T * s`` (out of place:
    the plain definition the gradient check compares against). x: (..., in) -> (..., out).
    """

    _cls: Any = None

    @classmethod
    def make(cls, base: Any, A: Any, B: Any, scaling: float, in_place: bool) -> Any:
        if cls._cls is None:
            cls._cls = _define_manual_lora()
        return cls._cls(base, A, B, scaling, in_place)

    @classmethod
    def is_instance(cls, module: Any) -> bool:
        return cls._cls is not None and isinstance(module, cls._cls)


def _define_manual_lora() -> Any:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class _ManualLoRA(nn.Module):
        def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, scaling: float, in_place: bool) -> None:
            super().__init__()
            self.base, self.scaling, self.in_place = base, scaling, in_place
            self.lora_A = nn.Parameter(A)  # (r, in)
            self.lora_B = nn.Parameter(B)  # (out, r)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1])
            out = F.linear(flat, self.base.weight, self.base.bias)
            h = flat @ self.lora_A.t()
            if self.in_place:
                out.addmm_(h, self.lora_B.t(), alpha=self.scaling)
            else:
                out = out + (h @ self.lora_B.t()) * self.scaling
            return out.view(*x.shape[:-1], out.shape[-1])

    return _ManualLoRA


def target_linears(model: Any) -> list[tuple[str, Any]]:
    """``(name, module)`` of every targeted ``nn.Linear`` (one ``named_modules`` walk)."""
    from torch import nn

    return [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS and isinstance(m, nn.Linear)]


def inject_manual(model: Any, weights: dict[str, tuple[Any, Any]] | None = None, in_place: bool = True) -> int:
    """Replace every target Linear by a hand-written LoRA (the plain-torch floor of injection).

    Without ``weights``: A kaiming-uniform (a=sqrt(5)) and B zeros, created like the libraries do; with
    ``weights[name] = (A, B)``: those tensors (copied). Freezes the base first; returns the number of modules.
    """
    import torch
    from torch import nn

    model.requires_grad_(False)
    found = target_linears(model)
    for name, lin in found:
        w = lin.weight
        if weights is None:
            A = torch.empty(RANK, lin.in_features, device=w.device, dtype=w.dtype)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            B = torch.zeros(lin.out_features, RANK, device=w.device, dtype=w.dtype)
        else:
            A, B = (t.detach().clone() for t in weights[name])
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, ManualLoRA.make(lin, A, B, ALPHA / RANK, in_place))
    return len(found)


def adapter_tensors(model: Any) -> dict[str, tuple[Any, Any, float]]:
    """``{base-model module name: (A (r, in), B (out, r), scaling)}`` of a library-wrapped or manual LoRA model."""
    out = {}
    for name, m in model.named_modules():
        key = name.removeprefix("base_model.model.")
        if ManualLoRA.is_instance(m):
            out[key] = (m.lora_A, m.lora_B, m.scaling)
        elif hasattr(m, "lora_A") and hasattr(m.lora_A, "keys") and "default" in m.lora_A:
            out[key] = (m.lora_A["default"].weight, m.lora_B["default"].weight, float(m.scaling["default"]))
    return out


def token_batch(vocab: int, rows: int, tokens: int, seed: int = 4321) -> Any:
    import torch

    return torch.randint(0, vocab, (rows, tokens), generator=torch.Generator().manual_seed(seed))


# ============================================================================================ worker: train
def task_train(lib: str, variant: str, ctx: argparse.Namespace) -> dict[str, Any]:
    """One training variant (see the module docstring): per-step times, peak RSS, saved bytes, gradient check."""
    import torch

    shape = SHAPES[ctx.size]
    harness.reset_peak_rss()
    rss_start = harness.current_rss_mb()
    model = build_model(shape["m100"])
    model.train()
    if variant.startswith("floor"):
        model.enable_input_require_grads()
    elif variant == "manual":
        torch.manual_seed(1)
        inject_manual(model)
    elif variant == "full":
        model.requires_grad_(True)
    else:
        mod = import_lib(lib)
        torch.manual_seed(1)
        model = mod.get_peft_model(model, lora_config(lib, lora_dropout=0.1 if variant == "d0.1" else 0.0))
        model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    run = model
    if variant == "compiled":  # compiled by the warm-up step below (untimed; its wall time is reported)
        # an empty inductor cache per process, as a user's first run: otherwise whichever library runs second
        # reuses the kernels the first compiled for the shared base model, and compile_s compares caches
        cache = tempfile.mkdtemp(prefix="bench-inductor-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        run = torch.compile(model, backend=ctx.compile_backend)
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    ids = token_batch(shape["m100"]["vocab_size"], shape["batch"], shape["seq"])
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if variant.endswith("bf16") else contextlib.nullcontext

    def forward() -> Any:
        with autocast():
            return run(input_ids=ids, labels=ids, use_cache=False).loss

    step = train_step(forward, opt)
    rss_ready = harness.current_rss_mb()
    compile_s = None
    if variant == "compiled":  # the warm-up step compiles; no saved-tensor hooks (dynamo would trace them)
        saved_mb = None
        compile_s = sum(t.wall for t in step().values())
    else:
        saved_mb = saved_activation_mb(model, forward, opt)  # the warm-up step
    steps = timed_steps(step, ctx.reps)
    peak = harness.peak_rss_mb()
    out = {"steps": steps, "peak_rss_mb": peak, "rss_start_mb": rss_start, "rss_ready_mb": rss_ready,
           "rss_growth_mb": None if peak is None or rss_ready is None else peak - rss_ready,
           "saved_activation_mb": saved_mb, "trainable_params": sum(p.numel() for p in params),
           "compile_s": compile_s}
    if variant in ("d0", "manual"):
        del opt
        out["grad_check"] = grad_check(model, shape)
    return out


def train_step(forward: Callable[[], Any], opt: Any) -> Callable[[], dict[str, harness.Timing]]:
    """One training step (forward -> scalar loss, backward, ``opt.step`` + ``zero_grad`` where ``opt`` is given),
    returning the CPU / wall :class:`harness.Timing` of each part: ``{"fwd", "bwd", "opt"}``."""

    def step() -> dict[str, harness.Timing]:
        t_fwd, loss = harness.timed(forward)
        t_bwd, _ = harness.timed(loss.backward)
        del loss
        t_opt = harness.Timing(0.0, 0.0)
        if opt is not None:
            t_opt, _ = harness.timed(lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
        return {"fwd": t_fwd, "bwd": t_bwd, "opt": t_opt}

    return step


def timed_steps(step: Callable[[], dict[str, harness.Timing]], reps: int) -> dict[str, dict[str, list[float]]]:
    """``reps`` timed calls of ``step``: ``{"fwd" | "bwd" | "opt" | "step": {"cpu": [s, ...], "wall": [s, ...]}}``."""
    steps: dict[str, dict[str, list[float]]] = {k: {"cpu": [], "wall": []} for k in ("fwd", "bwd", "opt", "step")}
    for _ in range(reps):
        parts = step()
        for clk in ("cpu", "wall"):
            for k, t in parts.items():
                steps[k][clk].append(getattr(t, clk))
            steps["step"][clk].append(sum(getattr(t, clk) for t in parts.values()))
    return steps


def saved_activation_mb(model: Any, forward: Callable[[], Any], opt: Any) -> float:
    """One (untimed, warm-up) training step; returns MB of the unique non-parameter storages saved for backward."""
    import torch

    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.sparse_coo:  # the reference's SHiRA saves a sparse COO ΔW: count its parts
            pack(t._indices()), pack(t._values())
            return t
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    del loss
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return sum(saved.values()) / 2**20


def grad_check(model: Any, shape: dict[str, Any]) -> dict[str, float]:
    """LoRA gradients of ``model`` against a plain out-of-place LoRA with the same weights (random non-zero B).

    Both run a 1 x ``check_tokens`` batch with the loss on the inputs; returns max|dA|, |dB| over all modules,
    the largest gradient entry (scale), the loss difference and the module count.
    """
    import torch

    gen = torch.Generator().manual_seed(99)
    tensors = adapter_tensors(model)
    with torch.no_grad():
        for _, B, _ in tensors.values():
            B.copy_(torch.randn(B.shape, generator=gen) * 0.02)
    ids = token_batch(shape["m100"]["vocab_size"], 1, shape["check_tokens"], seed=77)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    plain = build_model(shape["m100"])
    plain.train()
    inject_manual(plain, {k: (A, B) for k, (A, B, _) in tensors.items()}, in_place=False)
    plain_tensors = adapter_tensors(plain)
    plain_loss = plain(input_ids=ids, labels=ids, use_cache=False).loss
    plain_loss.backward()
    diff, scale = 0.0, 0.0
    for name, (A, B, _) in tensors.items():
        pA, pB, _ = plain_tensors[name]
        diff = max(diff, float((A.grad - pA.grad).abs().max()), float((B.grad - pB.grad).abs().max()))
        scale = max(scale, float(A.grad.abs().max()), float(B.grad.abs().max()))
    return {"max_abs_diff": diff, "max_abs_grad": scale, "loss_diff": abs(loss.item() - plain_loss.item()),
            "modules": len(tensors)}


# ============================================================================================ worker: moe
def task_moe(lib: str, ctx: argparse.Namespace) -> dict[str, Any]:
    """MoE training (see the module docstring): ``lib`` is a library (LoRA on attention and experts) or
    ``INDEPENDENT`` (the floor: frozen base, ``enable_input_require_grads``, no adapter, no optimizer).

    Per-step times, peak RSS, bytes saved for backward; for a library, the cross-library check's file.
    """
    import torch

    shape = SHAPES[ctx.size]["moe"]
    harness.reset_peak_rss()
    rss_start = harness.current_rss_mb()
    model = build_moe_model(shape)
    model.train()
    if lib == INDEPENDENT:
        model.enable_input_require_grads()
    else:
        torch.manual_seed(1)
        model = import_lib(lib).get_peft_model(model, moe_lora_config(lib))
        model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if lib != INDEPENDENT else None
    ids = token_batch(shape["vocab_size"], shape["batch"], shape["seq"])

    def forward() -> Any:
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    rss_ready = harness.current_rss_mb()
    saved_mb = saved_activation_mb(model, forward, opt)  # the warm-up step
    steps = timed_steps(train_step(forward, opt), ctx.reps)
    peak = harness.peak_rss_mb()
    out = {"steps": steps, "peak_rss_mb": peak, "rss_start_mb": rss_start, "rss_ready_mb": rss_ready,
           "rss_growth_mb": None if peak is None or rss_ready is None else peak - rss_ready,
           "saved_activation_mb": saved_mb, "trainable_params": sum(p.numel() for p in params)}
    if lib != INDEPENDENT:
        del opt
        out["check_file"] = moe_cross_check(model, shape, ctx, lib)
    return out


def moe_cross_check(model: Any, shape: dict[str, Any], ctx: argparse.Namespace, lib: str) -> str:
    """Set every trainable tensor from one seeded generator in name order (both libraries name and shape them
    alike, so they get the same values), run a 1 x ``check_tokens`` batch forward and backward, and save
    ``{"loss": float, "grads": {name: tensor}, "params": {name: shape}}`` for the driver to compare across libraries
    (peftkit applies the expert update on the routed tokens, the reference on a materialised ``W + dW``)."""
    import torch

    gen = torch.Generator().manual_seed(99)
    named = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for _, p in named:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    ids = token_batch(shape["vocab_size"], 1, SHAPES[ctx.size]["check_tokens"], seed=77)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    path = Path(ctx.workdir) / f"moe-check-{lib}-{time.time_ns()}.pt"
    torch.save({"loss": loss.item(), "grads": {n: p.grad.detach().clone() for n, p in named},
                "params": {n: list(p.shape) for n, p in named}}, path)
    return str(path)


# ============================================================================================ worker: methods
def method_batch(method: str, shape: dict[str, Any]) -> Any:
    """Token ids (batch, seq) of the ``methods`` case; for ``alora`` with the invocation sequence in every row."""
    ids = token_batch(shape["vocab_size"], shape["batch"], shape["seq"])
    if method == "alora":
        at = shape["seq"] // 4
        ids[:, at:at + len(ALORA_INVOCATION)] = ids.new_tensor(ALORA_INVOCATION)
    return ids


def task_methods(lib: str, method: str, ctx: argparse.Namespace) -> dict[str, Any]:
    """One training step benchmark of ``METHOD_CASES[method]`` in ``lib`` (see the module docstring): the
    ``methods``-shape Llama (fp32), ``get_peft_model`` with the method's config, AdamW on the trainable parameters,
    loss on the inputs, ``use_cache=False``. Per-step CPU / wall times (fwd / bwd / opt), peak RSS, bytes saved for
    backward (the warm-up step), trainable parameters and the warm-up loss."""
    import torch

    shape = SHAPES[ctx.size]["methods"]
    harness.reset_peak_rss()
    rss_start = harness.current_rss_mb()
    model = build_model(shape)
    model.train()
    torch.manual_seed(1)
    if method == "floor":  # frozen base, backward through every layer, no adapter and no optimizer
        model.requires_grad_(False)
        model.enable_input_require_grads()
    else:
        model = import_lib(lib).get_peft_model(model, METHOD_CASES[method](lib))
        model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    ids = method_batch(method, shape)
    losses: list[float] = []

    def forward() -> Any:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        if not losses:
            losses.append(loss.item())
        return loss

    rss_ready = harness.current_rss_mb()
    saved_mb = saved_activation_mb(model, forward, opt)  # the warm-up step
    steps = timed_steps(train_step(forward, opt), ctx.reps)
    peak = harness.peak_rss_mb()
    return {"steps": steps, "peak_rss_mb": peak, "rss_start_mb": rss_start, "rss_ready_mb": rss_ready,
            "rss_growth_mb": None if peak is None or rss_ready is None else peak - rss_ready,
            "saved_activation_mb": saved_mb, "trainable_params": sum(p.numel() for p in params),
            "first_loss": losses[0]}


# ============================================================================================ worker: other cases
def task_generate(lib: str, ctx: argparse.Namespace) -> dict[str, Any]:
    """Greedy decoding, batch 1: base / unmerged / merged / disabled, interleaved (see the module docstring)."""
    import torch

    mod = import_lib(lib)
    shape = SHAPES[ctx.size]
    adapter = str(Path(ctx.workdir) / "gen" / "a0")
    harness.reset_peak_rss()
    base = build_model(shape["m100"])
    unmerged = mod.PeftModel.from_pretrained(build_model(shape["m100"]), adapter)
    merged = mod.PeftModel.from_pretrained(build_model(shape["m100"]), adapter).merge_and_unload()
    for m in (unmerged, merged):
        m.eval()
        m.requires_grad_(False)
    prompt = token_batch(shape["m100"]["vocab_size"], 1, shape["prompt"], seed=11)
    n_new = shape["new_tokens"]

    def gen(m: Any) -> Any:
        return m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                          min_new_tokens=n_new, do_sample=False, pad_token_id=0)

    def disabled() -> Any:
        with unmerged.disable_adapter():
            return gen(unmerged)

    variants = {"base": lambda: gen(base), "unmerged": lambda: gen(unmerged), "merged": lambda: gen(merged),
                "disabled": disabled}
    kept: dict[str, list[int]] = {}
    with torch.inference_mode():
        times = harness.interleaved_reps(variants, ctx.reps, warmup=1,
                                         on_warmup=lambda n, v: kept.__setitem__(n, v[0, prompt.shape[1]:].tolist()))
    return {"times": times, "new_tokens": n_new, "tokens": kept, "peak_rss_mb": harness.peak_rss_mb()}


def task_mixed(lib: str, count: int, ctx: argparse.Namespace) -> dict[str, Any]:
    """``mixed_batch.run_count`` for one library and adapter count; logits go to a file for the cross check."""
    import torch

    shape = mixed_batch.QUICK if ctx.size == "quick" else mixed_batch.FULL
    roots = [Path(ctx.workdir) / "mixed" / f"a{i}" for i in range(count)]
    input_ids = token_batch(shape["vocab_size"], shape["rows"], shape["tokens"])
    case = mixed_batch.run_count(import_lib(lib).PeftModel, shape, roots, count, input_ids, ctx.reps,
                                 mixed_batch.probe_positions(shape["tokens"]))
    logits_file = Path(ctx.workdir) / f"mixed-logits-{lib}-{count}-{time.time_ns()}.pt"
    torch.save(case.pop("logits"), logits_file)
    return {**case, "logits_file": str(logits_file), "rows": shape["rows"], "tokens": shape["tokens"]}


def task_inject(lib: str, ctx: argparse.Namespace) -> dict[str, Any]:
    """``get_peft_model`` vs the plain injection loop: 1.1B on meta, 98M real (a fresh model per call, untimed)."""
    mod = import_lib(lib)
    shape = SHAPES[ctx.size]
    out: dict[str, Any] = {}
    for where, shp, device in (("meta_1b", shape["1b"], "meta"), ("real_100m", shape["m100"], None)):
        template = None if device == "meta" else build_model(shp)

        def fresh(shp: dict[str, Any] = shp, device: str | None = device, template: Any = template) -> Any:
            return build_model(shp, device=device) if template is None else copy.deepcopy(template)

        variants = {lib: lambda m: mod.get_peft_model(m, lora_config(lib)), "floor": inject_manual}
        times = harness.interleaved_reps(variants, ctx.reps, warmup=1, setup={lib: fresh, "floor": fresh})
        out[where] = {"times": times, "modules": len(target_linears(fresh())), "lib_key": lib}
        del template
        gc.collect()
    return out


def task_io(lib: str, ctx: argparse.Namespace) -> dict[str, Any]:
    """``save_pretrained`` / ``from_pretrained`` of one adapter file vs raw safetensors save/load of its tensors."""
    from safetensors.torch import load_file, save_file

    mod = import_lib(lib)
    shape = SHAPES[ctx.size]
    src = Path(ctx.workdir) / "gen" / "a0"
    src_file = src / "adapter_model.safetensors"
    template = build_model(shape["m100"])
    loaded = mod.PeftModel.from_pretrained(copy.deepcopy(template), str(src))
    file_tensors = load_file(str(src_file))
    out_root = Path(tempfile.mkdtemp(prefix=f"io-{lib}-", dir=ctx.workdir))
    counter = iter(range(10**6))

    def fresh_dir() -> Path:
        return out_root / str(next(counter))

    variants = {
        "save_pretrained": lambda d: loaded.save_pretrained(str(d)),
        "save_file": lambda d: (d.mkdir(parents=True), save_file(file_tensors, str(d / "adapter_model.safetensors"))),
        "from_pretrained": lambda base: mod.PeftModel.from_pretrained(base, str(src)),
        "load_file": lambda: load_file(str(src_file)),
    }
    setup = {"save_pretrained": fresh_dir, "save_file": fresh_dir, "from_pretrained": lambda: copy.deepcopy(template)}
    times = harness.interleaved_reps(variants, ctx.reps, warmup=1, setup=setup)
    state = mod.get_peft_model_state_dict(loaded)
    diff = max(float((state[k] - v).abs().max()) for k, v in file_tensors.items())
    saved_file = next(out_root.glob("*/adapter_model.safetensors"))
    resaved = load_file(str(saved_file))
    resave_diff = max(float((resaved[k] - v).abs().max()) for k, v in file_tensors.items())
    return {"times": times, "loaded_vs_file_max_abs_diff": diff, "resaved_vs_file_max_abs_diff": resave_diff,
            "adapter_bytes": src_file.stat().st_size, "tensors": len(file_tensors),
            "adapter_params": sum(t.numel() for t in file_tensors.values())}


def task_merge(lib: str, ctx: argparse.Namespace) -> dict[str, Any]:
    """``merge_and_unload`` vs raw ``addmm_`` of the same A/B; max|merged - unmerged| logits."""
    import torch
    from safetensors.torch import load_file

    mod = import_lib(lib)
    shape = SHAPES[ctx.size]
    src = Path(ctx.workdir) / "gen" / "a0"
    template = build_model(shape["m100"])
    tensors = load_file(str(src / "adapter_model.safetensors"))
    pairs = [(k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"), v,
              tensors[k.replace("lora_A", "lora_B")]) for k, v in tensors.items() if k.endswith("lora_A.weight")]
    scaling = ALPHA / RANK

    def raw_merge(model: Any) -> Any:
        with torch.no_grad():
            for name, A, B in pairs:
                model.get_submodule(name).weight.addmm_(B, A, alpha=scaling)
        return model

    def fresh_peft() -> Any:
        return mod.PeftModel.from_pretrained(copy.deepcopy(template), str(src))

    kept: dict[str, Any] = {}
    times = harness.interleaved_reps(
        {"merge_and_unload": lambda m: m.merge_and_unload(), "addmm": raw_merge}, ctx.reps, warmup=1,
        setup={"merge_and_unload": fresh_peft, "addmm": lambda: copy.deepcopy(template)},
        on_warmup=kept.__setitem__)
    ids = token_batch(shape["m100"]["vocab_size"], 2, shape["check_tokens"], seed=5)
    with torch.inference_mode():
        unmerged = fresh_peft()(input_ids=ids, use_cache=False).logits
        merged = kept["merge_and_unload"](input_ids=ids, use_cache=False).logits
        raw = kept["addmm"](input_ids=ids, use_cache=False).logits
        base = template(input_ids=ids, use_cache=False).logits
    return {"times": times, "modules": len(pairs), "merged_vs_unmerged_max_abs_diff": float((merged - unmerged).abs().max()),
            "merged_vs_raw_max_abs_diff": float((merged - raw).abs().max()),
            "adapter_effect": float((unmerged - base).abs().max())}


def run_task(spec: str, ctx: argparse.Namespace) -> dict[str, Any]:
    """Dispatch ``case:lib:variant`` to its task function."""
    case, lib, variant = spec.split(":")
    if case == "train":
        return task_train(lib, variant, ctx)
    if case == "mixed":
        return task_mixed(lib, int(variant), ctx)
    if case == "moe":
        return task_moe(lib, ctx)
    if case == "methods":
        return task_methods(lib, variant, ctx)
    return {"generate": task_generate, "inject": task_inject, "io": task_io, "merge": task_merge}[case](lib, ctx)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run the tasks in ``args.tasks`` in order; a failing task records its traceback instead of a result."""
    harness.worker_setup(args.threads)
    results: dict[str, Any] = {}
    for spec in args.tasks:
        try:
            results[spec] = run_task(spec, args)
        except Exception:  # noqa: BLE001 - reported by the driver, which exits non-zero
            results[spec] = {"error": traceback.format_exc()}
        gc.collect()
    return {"tasks": results, "machine": harness.machine_info()}


# ============================================================================================ driver: import
def run_import(libs: Sequence[str], reps: int, warmup: int) -> dict[str, Any]:
    """Wall and CPU time of ``python -c <stmt>`` in fresh interpreters, statements interleaved per repetition."""
    stmts = {"pass": "pass", "torch": "import torch", **{lib: f"import {lib}" for lib in libs}}
    # after the timed statement the child prints its peak RSS (microseconds; not in the statement's own cost)
    peak = "\nprint([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    out: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": [], "maxrss_mb": []} for k in stmts}
    names = list(stmts)
    for i in range(warmup + reps):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            sample, stdout = harness.time_command([sys.executable, "-c", stmts[name] + peak])
            if i >= warmup:
                out[name]["wall"].append(sample["wall"])
                out[name]["cpu"].append(sample["cpu"])
                out[name]["maxrss_mb"].append(int(stdout.split()[-1]) / 1024)
    return {"times": out}


# ============================================================================================ driver: plan and run
def task_specs(case: str, libs: Sequence[str], counts: Sequence[int], methods: Sequence[str] = ()) -> list[list[str]]:
    """The task groups of one case: each inner list is compared side by side (one subprocess per task)."""
    if case == "methods":  # one group per method: its two libraries alternate ABBA over the rounds
        floor = [[f"methods:{INDEPENDENT}:floor"]] if methods else []  # once per round: the memory floor
        return floor + [[f"methods:{lib}:{m}" for lib in libs] for m in methods]
    if case == "train":
        specs = [f"train:{INDEPENDENT}:{v}" for v in TRAIN_SHARED[:3]]
        for variant in TRAIN_LIB[:2]:
            specs += [f"train:{lib}:{variant}" for lib in libs]
        specs += [f"train:{INDEPENDENT}:floor_bf16", *(f"train:{lib}:bf16" for lib in libs)]
        specs += [f"train:{lib}:compiled" for lib in libs]
        return [specs]
    if case == "mixed":
        return [[f"mixed:{lib}:{n}" for lib in libs] for n in counts]
    if case == "moe":
        return [[f"moe:{INDEPENDENT}:floor", *(f"moe:{lib}:-" for lib in libs)]]
    return [[f"{case}:{lib}:-" for lib in libs]]


def plan_jobs(cases: Sequence[str], libs: Sequence[str], counts: Sequence[int], quick: bool,
              reps: int | None, train_variants: Sequence[str] = (), methods: Sequence[str] = ()) -> list[list[harness.Job]]:
    """Worker jobs grouped for :func:`harness.run_rounds`; ``--quick`` packs each library's tasks in one job."""
    groups = [g for case in cases if case != "import" for g in task_specs(case, libs, counts, methods)]
    if train_variants:  # keep only these train variants (e.g. "compiled")
        keep = set(train_variants)
        groups = [[s for s in g if not s.startswith("train:") or s.rsplit(":", 1)[1] in keep] for g in groups]
        groups = [g for g in groups if g]
    if quick:
        per_lib: dict[str, list[str]] = {lib: [] for lib in libs}
        for spec in (s for g in groups for s in g):
            lib = spec.split(":")[1]
            per_lib[libs[0] if lib == INDEPENDENT else lib].append(spec)
        jobs = [harness.Job(tuple(specs), ["--reps", str(reps or 1), "--tasks", *specs])
                for specs in per_lib.values() if specs]
        return [jobs] if jobs else []
    return [[harness.Job((spec,), ["--reps", str(reps or REPS[spec.split(":")[0]]), "--tasks", spec]) for spec in g]
            for g in groups]


def prepare_workdir(workdir: Path, cases: Sequence[str], counts: Sequence[int], quick: bool) -> None:
    """Adapter files both libraries load: ``gen/a0`` (98M shape, random A and B) and ``mixed/a{i}``."""
    size = "quick" if quick else "full"
    if {"generate", "io", "merge"} & set(cases):
        mixed_batch.write_adapters(SHAPES[size]["m100"], 1, workdir / "gen", seed=2024)
    if "mixed" in cases:
        mixed_batch.write_adapters(mixed_batch.QUICK if quick else mixed_batch.FULL, max(counts), workdir / "mixed")


def split_results(raw: harness.RoundResults) -> dict[str, list[dict[str, Any]]]:
    """``{task spec: [result of round 0, round 1, ...]}`` from the jobs' results."""
    out: dict[str, list[dict[str, Any]]] = {}
    for key, rounds in raw.results.items():
        for spec in key:
            out[spec] = [r["tasks"][spec] for r in rounds]
    return out


# ============================================================================================ summaries
def pooled(runs: Sequence[dict[str, Any]], *path: str) -> list[float]:
    """Samples at ``path`` (e.g. "times", "base", "cpu") of every round, concatenated in round order."""
    out: list[float] = []
    for run in runs:
        node: Any = run
        for key in path:
            node = node[key]
        out.extend(node)
    return out


def per_round(runs: Sequence[dict[str, Any]], *path: str) -> list[list[float]]:
    rounds = []
    for run in runs:
        node: Any = run
        for key in path:
            node = node[key]
        rounds.append(node)
    return rounds


def safe(fn: Callable[[], float]) -> float | None:
    """``fn()``, or None where its inputs are missing (a library not run, a failed task)."""
    try:
        return fn()
    except (KeyError, ValueError, TypeError, ZeroDivisionError):
        return None


def train_row(rr: list[dict[str, Any]], floor: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Summary row of one training task over its rounds: median step / part times (CPU s), wall step time, peak
    RSS, RSS growth, saved MB, compile time, trainable parameters, ratios to ``floor`` (None: not run)."""
    row = {f"{k}_s": safe(lambda k=k: harness.median(pooled(rr, "steps", k, "cpu"))) for k in ("step", "fwd", "bwd", "opt")}
    row["step_wall_s"] = safe(lambda: harness.median(pooled(rr, "steps", "step", "wall")))
    for key in ("peak_rss_mb", "rss_growth_mb", "saved_activation_mb", "compile_s"):
        row[key] = safe(lambda key=key: harness.median(r[key] for r in rr))
    row["trainable_params"] = safe(lambda: rr[0]["trainable_params"])
    row["time_over_floor"] = safe(lambda: harness.per_round_ratio(per_round(rr, "steps", "step", "cpu"),
                                                                  per_round(floor, "steps", "step", "cpu")))
    row["peak_rss_over_floor"] = safe(lambda: harness.median_ratio([r["peak_rss_mb"] for r in rr],
                                                                   [r["peak_rss_mb"] for r in floor]))
    return row


def lib_ratios(ours: list[dict[str, Any]] | None, ref: list[dict[str, Any]] | None) -> dict[str, float | None]:
    """peftkit / reference of two training tasks run side by side: step / forward / backward time (per-round
    ratios of CPU medians), peak RSS and saved activations (median of per-round ratios); None where not run."""
    def time_ratio(part: str) -> float | None:
        return safe(lambda: harness.per_round_ratio(per_round(ours, "steps", part, "cpu"),
                                                    per_round(ref, "steps", part, "cpu")))

    return {
        "step_time": time_ratio("step"), "fwd_time": time_ratio("fwd"), "bwd_time": time_ratio("bwd"),
        "peak_rss": safe(lambda: harness.median_ratio([x["peak_rss_mb"] for x in ours], [x["peak_rss_mb"] for x in ref])),
        "saved_activations": safe(lambda: harness.median_ratio([x["saved_activation_mb"] for x in ours],
                                                               [x["saved_activation_mb"] for x in ref])),
    }


def summarize_train(res: dict[str, list[dict[str, Any]]], libs: Sequence[str]) -> dict[str, Any]:
    names = [f"{INDEPENDENT}:{v}" for v in TRAIN_SHARED] + [f"{lib}:{v}" for v in TRAIN_LIB for lib in libs]
    runs = {n: res[f"train:{n}"] for n in names if f"train:{n}" in res}
    rows: dict[str, Any] = {}
    for name, rr in runs.items():
        row = train_row(rr, runs.get(f"{INDEPENDENT}:floor_bf16" if name.endswith("bf16") else f"{INDEPENDENT}:floor"))
        if "grad_check" in rr[0]:
            row["grad_max_abs_diff"] = max(r["grad_check"]["max_abs_diff"] for r in rr)
            row["grad_max_abs"] = max(r["grad_check"]["max_abs_grad"] for r in rr)
        rows[name] = row
    ratios = {variant: lib_ratios(runs.get(f"peftkit:{variant}"), runs.get(f"peft:{variant}")) for variant in TRAIN_LIB}
    return {"variants": rows, "peftkit_over_ref": ratios}


def summarize_moe(res: dict[str, list[dict[str, Any]]], libs: Sequence[str]) -> dict[str, Any]:
    """MoE training rows (floor and each library), peftkit / reference ratios with the per-round step-time and
    peak-RSS ratios, and the cross-library check (loss and LoRA gradients with the same adapter weights)."""
    import torch

    names = [f"{INDEPENDENT}:floor", *(f"{lib}:-" for lib in libs)]
    runs = {n: res[f"moe:{n}"] for n in names if f"moe:{n}" in res and "error" not in res[f"moe:{n}"][0]}
    rows = {name.replace(":-", ""): train_row(rr, runs.get(f"{INDEPENDENT}:floor")) for name, rr in runs.items()}
    out: dict[str, Any] = {"variants": rows}
    ours, ref = runs.get("peftkit:-"), runs.get("peft:-")
    if ours is None or ref is None:
        return out
    ratios: dict[str, Any] = lib_ratios(ours, ref)
    ratios["step_time_per_round"] = [harness.median(o["steps"]["step"]["cpu"]) / harness.median(r["steps"]["step"]["cpu"])
                                     for o, r in zip(ours, ref)]
    ratios["peak_rss_per_round"] = [o["peak_rss_mb"] / r["peak_rss_mb"] for o, r in zip(ours, ref)]
    out["peftkit_over_ref"] = ratios
    a = torch.load(ours[0]["check_file"], weights_only=True)
    b = torch.load(ref[0]["check_file"], weights_only=True)
    same = a["params"] == b["params"]
    out["check"] = {
        "same_trainable_tensors": same,
        "trainable_params_equal": ours[0]["trainable_params"] == ref[0]["trainable_params"],
        "loss_abs_diff": abs(a["loss"] - b["loss"]),
        "grad_max_abs_diff": max(float((a["grads"][k] - b["grads"][k]).abs().max()) for k in a["grads"]) if same else None,
        "grad_max_abs": max(float(g.abs().max()) for g in a["grads"].values()),
        "expert_grad_max_abs": max(float(g.abs().max()) for k, g in a["grads"].items() if ".experts." in k),
    }
    return out


def summarize_methods(res: dict[str, list[dict[str, Any]]], libs: Sequence[str], methods: Sequence[str]) -> dict[str, Any]:
    """Per method: each library's row (median step / part times, peak RSS, saved MB, trainable parameters), the
    peftkit / reference ratios (step, forward, backward, optimizer time: median of per-round ratios of CPU medians;
    peak RSS, saved activations: median of per-round ratios), the per-round step-time ratios, and the first error
    line of a library whose task failed (e.g. a method not in peftkit yet)."""
    out: dict[str, Any] = {}
    floor = res.get(f"methods:{INDEPENDENT}:floor")
    floor_ok = floor if floor and all("error" not in r for r in floor) else None
    for method in methods:
        runs = {lib: res.get(f"methods:{lib}:{method}") for lib in libs}
        ok = {lib: rr for lib, rr in runs.items() if rr and all("error" not in r for r in rr)}
        entry: dict[str, Any] = {"libs": {lib: train_row(rr, None) for lib, rr in ok.items()},
                                 "errors": {lib: rr[0]["error"].strip().splitlines()[-1] for lib, rr in runs.items()
                                            if rr and "error" in rr[0]}}
        for row in entry["libs"].values():
            for key in ("time_over_floor", "peak_rss_over_floor"):
                row.pop(key)
        for lib, rr in ok.items():  # what the method adds to the frozen base's peak RSS (MB)
            entry["libs"][lib]["peak_rss_above_floor_mb"] = safe(lambda rr=rr: harness.median(
                r["peak_rss_mb"] - f["peak_rss_mb"] for r, f in zip(rr, floor_ok)))
        if {"peftkit", "peft"} <= set(ok):
            ours, ref = ok["peftkit"], ok["peft"]
            ratios: dict[str, Any] = lib_ratios(ours, ref)
            ratios["opt_time"] = safe(lambda ours=ours, ref=ref: harness.per_round_ratio(
                per_round(ours, "steps", "opt", "cpu"), per_round(ref, "steps", "opt", "cpu")))
            ratios["step_time_per_round"] = [harness.median(o["steps"]["step"]["cpu"]) /
                                             harness.median(r["steps"]["step"]["cpu"]) for o, r in zip(ours, ref)]
            ratios["peak_rss_per_round"] = [o["peak_rss_mb"] / r["peak_rss_mb"] for o, r in zip(ours, ref)]
            # the same ratio over what each library adds above the frozen base's peak (per round, then median)
            ratios["peak_rss_above_floor"] = safe(lambda ours=ours, ref=ref: harness.median(
                (o["peak_rss_mb"] - f["peak_rss_mb"]) / (r["peak_rss_mb"] - f["peak_rss_mb"])
                for o, r, f in zip(ours, ref, floor_ok)))
            entry["peftkit_over_ref"] = ratios
            entry["trainable_params_equal"] = ours[0]["trainable_params"] == ref[0]["trainable_params"]
        out[method] = entry
    return out


def summarize_generate(res: dict[str, list[dict[str, Any]]], libs: Sequence[str]) -> dict[str, Any]:
    variants = ("base", "unmerged", "merged", "disabled")
    out: dict[str, Any] = {"libs": {}, "peftkit_over_ref": {}}
    for lib in libs:
        rr = res.get(f"generate:{lib}:-")
        if not rr or "times" not in rr[0]:
            continue
        n = rr[0]["new_tokens"]
        entry: dict[str, Any] = {
            "tokens_per_s": {v: n / harness.median(pooled(rr, "times", v, "cpu")) for v in variants},
            "tokens_per_s_wall": {v: n / harness.median(pooled(rr, "times", v, "wall")) for v in variants},
            "over_base": {v: harness.median_ratio(pooled(rr, "times", v, "cpu"), pooled(rr, "times", "base", "cpu"))
                          for v in variants[1:]},
            "unmerged_tokens_equal_merged": rr[0]["tokens"]["unmerged"] == rr[0]["tokens"]["merged"],
            "disabled_tokens_equal_base": rr[0]["tokens"]["disabled"] == rr[0]["tokens"]["base"],
        }
        entry["ms_per_token"] = {v: 1000 / tps for v, tps in entry["tokens_per_s"].items()}
        out["libs"][lib] = entry
    if {"peftkit", "peft"} <= set(out["libs"]):
        ours, ref = res["generate:peftkit:-"], res["generate:peft:-"]
        out["peftkit_over_ref"] = {v: harness.per_round_ratio(per_round(ours, "times", v, "cpu"),
                                                              per_round(ref, "times", v, "cpu")) for v in variants}
        out["unmerged_tokens_equal_across_libs"] = ours[0]["tokens"]["unmerged"] == ref[0]["tokens"]["unmerged"]
    return out


def summarize_mixed(res: dict[str, list[dict[str, Any]]], libs: Sequence[str], counts: Sequence[int]) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for n in counts:
        entry: dict[str, Any] = {"tokens_per_s": {}, "mixed_over_single": {}, "single_over_base": {}}
        for lib in libs:
            rr = res.get(f"mixed:{lib}:{n}")
            if not rr or "times" not in rr[0]:
                continue
            n_tok = rr[0]["rows"] * rr[0]["tokens"]
            entry["tokens_per_s"][lib] = {v: n_tok / harness.median(pooled(rr, "times", v, "cpu"))
                                          for v in mixed_batch.VARIANTS}
            entry["mixed_over_single"][lib] = harness.median_ratio(pooled(rr, "times", "mixed", "cpu"),
                                                                   pooled(rr, "times", "single", "cpu"))
            entry["single_over_base"][lib] = harness.median_ratio(pooled(rr, "times", "single", "cpu"),
                                                                  pooled(rr, "times", "base", "cpu"))
        if {"peftkit", "peft"} <= set(entry["tokens_per_s"]):
            ours, ref = res[f"mixed:peftkit:{n}"], res[f"mixed:peft:{n}"]
            entry["peftkit_over_ref_mixed_time"] = harness.per_round_ratio(per_round(ours, "times", "mixed", "cpu"),
                                                                           per_round(ref, "times", "mixed", "cpu"))
            a = torch.load(ours[0]["logits_file"], weights_only=True)
            b = torch.load(ref[0]["logits_file"], weights_only=True)
            entry["max_abs_diff_mixed_logits"] = float((a["mixed"] - b["mixed"]).abs().max())
        out[str(n)] = entry
    return out


def summarize_pairs(res: dict[str, list[dict[str, Any]]], case: str, libs: Sequence[str],
                    pairs: dict[str, tuple[str, str]], sub: str | None = None) -> dict[str, Any]:
    """Generic summary of a case whose tasks time (variant, floor) pairs: medians, each/floor, peftkit/ref.

    ``pairs[label] = (variant, floor)``; a variant named ``"{lib}"`` is the library's own name in that task.
    """
    out: dict[str, Any] = {"libs": {}, "peftkit_over_ref": {}}

    def times(rr: list[dict[str, Any]], name: str, lib: str) -> list[list[float]]:
        return [(r[sub] if sub else r)["times"][lib if name == "{lib}" else name]["cpu"] for r in rr]

    for lib in libs:
        rr = res.get(f"{case}:{lib}:-")
        if not rr or "error" in rr[0]:
            continue
        entry: dict[str, Any] = {}
        for label, (variant, floor) in pairs.items():
            v, f = times(rr, variant, lib), times(rr, floor, lib)
            entry[label] = {"s": harness.median(x for r in v for x in r), "floor_s": harness.median(x for r in f for x in r),
                            "over_floor": harness.median_ratio([x for r in v for x in r], [x for r in f for x in r])}
        out["libs"][lib] = entry
    if {"peftkit", "peft"} <= set(out["libs"]):
        ours, ref = res[f"{case}:peftkit:-"], res[f"{case}:peft:-"]
        for label, (variant, _) in pairs.items():
            out["peftkit_over_ref"][label] = harness.per_round_ratio(times(ours, variant, "peftkit"),
                                                                     times(ref, variant, "peft"))
    return out


def summarize_import(data: dict[str, Any], libs: Sequence[str]) -> dict[str, Any]:
    t = data["times"]
    out: dict[str, Any] = {"median_wall_s": {k: harness.median(v["wall"]) for k, v in t.items()},
                           "median_cpu_s": {k: harness.median(v["cpu"]) for k, v in t.items()},
                           "median_maxrss_mb": {k: harness.median(v["maxrss_mb"]) for k, v in t.items()}}
    if set(LIBS) <= set(libs):
        out["peftkit_over_peft_wall"] = harness.median_ratio(t["peftkit"]["wall"], t["peft"]["wall"])
        out["peftkit_over_peft_cpu"] = harness.median_ratio(t["peftkit"]["cpu"], t["peft"]["cpu"])
    for lib in libs:
        out[f"{lib}_over_torch_wall"] = harness.median_ratio(t[lib]["wall"], t["torch"]["wall"])
    return out


def summarize(res: dict[str, list[dict[str, Any]]], imports: dict[str, Any] | None, cases: Sequence[str],
              libs: Sequence[str], counts: Sequence[int], methods: Sequence[str] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "train" in cases:
        out["train"] = summarize_train(res, libs)
    if "generate" in cases:
        out["generate"] = summarize_generate(res, libs)
    if "mixed" in cases:
        out["mixed"] = summarize_mixed(res, libs, counts)
    if "inject" in cases:
        out["inject"] = {where: summarize_pairs(res, "inject", libs, {"get_peft_model": ("{lib}", "floor")}, sub=where)
                         for where in ("meta_1b", "real_100m")}
    if "io" in cases:
        out["io"] = summarize_pairs(res, "io", libs, {"save_pretrained": ("save_pretrained", "save_file"),
                                                      "from_pretrained": ("from_pretrained", "load_file")})
    if "merge" in cases:
        out["merge"] = summarize_pairs(res, "merge", libs, {"merge_and_unload": ("merge_and_unload", "addmm")})
    if "moe" in cases:
        out["moe"] = summarize_moe(res, libs)
    if "methods" in cases:
        out["methods"] = summarize_methods(res, libs, methods)
    if imports is not None:
        out["import"] = summarize_import(imports, libs)
    return out


def done_when(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's "Done when" rows with value, target and PASS / MISS (informational, never asserted)."""
    def get(*path: str) -> Any:
        node: Any = summary
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    variants = get("train", "variants") or {}
    grads = [v["grad_max_abs_diff"] for k, v in variants.items() if k.startswith("peftkit:") and "grad_max_abs_diff" in v]
    values = {
        "train_peak_rss_d0": get("train", "peftkit_over_ref", "d0", "peak_rss"),
        "train_peak_rss_d0.1": get("train", "peftkit_over_ref", "d0.1", "peak_rss"),
        "train_step_time_d0": get("train", "peftkit_over_ref", "d0", "step_time"),
        "train_step_time_d0.1": get("train", "peftkit_over_ref", "d0.1", "step_time"),
        "train_step_time_compiled": get("train", "peftkit_over_ref", "compiled", "step_time"),
        "train_grad_max_abs_diff": max(grads) if grads else None,
        "generate_unmerged_over_base_peftkit": get("generate", "libs", "peftkit", "over_base", "unmerged"),
        "generate_unmerged_over_base_peft": get("generate", "libs", "peft", "over_base", "unmerged"),
        "from_pretrained": get("io", "peftkit_over_ref", "from_pretrained"),
        "import": get("import", "peftkit_over_peft_wall"),
        "inject_meta": get("inject", "meta_1b", "peftkit_over_ref", "get_peft_model"),
        "moe_step_time": get("moe", "peftkit_over_ref", "step_time"),
        "moe_peak_rss": get("moe", "peftkit_over_ref", "peak_rss"),
    }
    rows = []
    for key, label, target in DONE_WHEN:
        value = values[key]
        status = "n/a" if value is None else "info" if target is None else "PASS" if value <= target else "MISS"
        rows.append({"key": key, "label": label, "value": value, "target": target, "status": status})
    return rows + method_rows(summary.get("methods", {}))


def method_rows(methods: dict[str, Any]) -> list[dict[str, Any]]:
    """Done-when rows of the ``methods`` case: per method, step time peftkit/ref (<= 1.0) and peak RSS peftkit/ref
    (<= 0.9; informational for the LoRA variants, where the issue sets no RSS target); ``n/a`` where a task failed."""
    rows = []
    for method, entry in methods.items():
        ratios = entry.get("peftkit_over_ref", {})
        rss_target = None if method in LORA_VARIANTS else METHOD_RSS_TARGET
        for key, label, target in (("step_time", "train step time", METHOD_TIME_TARGET),
                                   ("peak_rss", "train peak RSS", rss_target)):
            value = ratios.get(key)
            status = "n/a" if value is None else "info" if target is None else "PASS" if value <= target else "MISS"
            rows.append({"key": f"methods_{key}:{method}", "label": f"methods: {method} {label} peftkit/ref",
                         "value": value, "target": target, "status": status})
    return rows


# ============================================================================================ report
def report(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    table = harness.markdown_table
    out: list[str] = []
    if "train" in summary:
        t = summary["train"]
        out.append("\n## train (CPU s per step; ratios to the fp32 or bf16 floor)\n")
        cols = ("step_s", "fwd_s", "bwd_s", "opt_s", "step_wall_s", "peak_rss_mb", "rss_growth_mb",
                "saved_activation_mb", "time_over_floor", "peak_rss_over_floor", "grad_max_abs_diff", "compile_s")
        out.append(table(["variant", *cols], [[name, *(row.get(c) for c in cols)] for name, row in t["variants"].items()]))
        out.append("\npeftkit / reference (per-round ratios):\n")
        keys = ("step_time", "fwd_time", "bwd_time", "peak_rss", "saved_activations")
        out.append(table(["variant", *keys], [[v, *(r[k] for k in keys)] for v, r in t["peftkit_over_ref"].items()]))
    if "generate" in summary:
        g = summary["generate"]
        out.append("\n## generate (batch 1, greedy; tokens/s on CPU time; time ratio to base)\n")
        vs = ("base", "unmerged", "merged", "disabled")
        out.append(table(["library", *vs, "ms/token unmerged", "unmerged/base", "merged/base", "disabled/base"],
                         [[lib, *(e["tokens_per_s"][v] for v in vs), e["ms_per_token"]["unmerged"],
                           *(e["over_base"][v] for v in vs[1:])] for lib, e in g["libs"].items()]))
        if g["peftkit_over_ref"]:
            out.append("\npeftkit/ref time: " + ", ".join(f"{k} {harness.fmt(v)}" for k, v in g["peftkit_over_ref"].items())
                       + f"; unmerged tokens equal across libraries: {g['unmerged_tokens_equal_across_libs']}")
    if "mixed" in summary:
        out.append("\n## mixed (per-row adapter routing; tokens/s on CPU time)\n")
        hdr = ["N", "library", "single", "mixed", "base", "mixed/single (time)", "single/base (time)"]
        body = [[n, lib, *(tps[v] for v in mixed_batch.VARIANTS), e["mixed_over_single"][lib], e["single_over_base"][lib]]
                for n, e in summary["mixed"].items() for lib, tps in e["tokens_per_s"].items()]
        out.append(table(hdr, body))
        out.append("\n" + "; ".join(f"N={n}: peftkit/ref mixed time {harness.fmt(e.get('peftkit_over_ref_mixed_time'))}, "
                                    f"max|logit diff| {harness.fmt(e.get('max_abs_diff_mixed_logits'))}"
                                    for n, e in summary["mixed"].items()))
    for case, title in (("inject", "inject (get_peft_model vs plain loop; CPU s)"), ("io", "io (CPU s)"),
                        ("merge", "merge (CPU s)")):
        if case not in summary:
            continue
        out.append(f"\n## {title}\n")
        parts = summary[case] if case == "inject" else {"": summary[case]}
        body = []
        for where, s in parts.items():
            for lib, entry in s["libs"].items():
                for label, e in entry.items():
                    body.append([f"{label} {where}".strip(), lib, e["s"], e["floor_s"], e["over_floor"],
                                 s["peftkit_over_ref"].get(label, "-")])
        out.append(table(["operation", "library", "s", "floor s", "each/floor", "peftkit/ref"], body))
    if "import" in summary:
        imp = summary["import"]
        out.append("\n## import (fresh interpreter, wall s)\n")
        out.append(table(["statement", "wall s", "cpu s", "maxrss MB"],
                         [[k, v, imp["median_cpu_s"][k], imp["median_maxrss_mb"][k]]
                          for k, v in imp["median_wall_s"].items()]))
    if "moe" in summary:
        m = summary["moe"]
        out.append("\n## moe (Mixtral-style, LoRA on q,k,v,o + experts.gate_up_proj/down_proj; CPU s per step)\n")
        cols = ("step_s", "fwd_s", "bwd_s", "opt_s", "step_wall_s", "peak_rss_mb", "rss_growth_mb",
                "saved_activation_mb", "time_over_floor", "peak_rss_over_floor", "trainable_params")
        out.append(table(["variant", *cols], [[name, *(row.get(c) for c in cols)] for name, row in m["variants"].items()]))
        if "peftkit_over_ref" in m:
            r = m["peftkit_over_ref"]
            keys = ("step_time", "fwd_time", "bwd_time", "peak_rss", "saved_activations")
            out.append("\npeftkit / reference (median over rounds):\n")
            out.append(table(list(keys), [[r[k] for k in keys]]))
            out.append("\nper round: step time " + ", ".join(harness.fmt(v) for v in r["step_time_per_round"])
                       + "; peak RSS " + ", ".join(harness.fmt(v) for v in r["peak_rss_per_round"]))
            c = m["check"]
            out.append(f"same adapter weights in both libraries: |loss diff| {harness.fmt(c['loss_abs_diff'])}, "
                       f"max|grad diff| {harness.fmt(c['grad_max_abs_diff'])} (max|grad| {harness.fmt(c['grad_max_abs'])}, "
                       f"experts {harness.fmt(c['expert_grad_max_abs'])}); trainable params equal: "
                       f"{c['trainable_params_equal']}")
    if "methods" in summary:
        out.extend(report_methods(summary["methods"]))
    out.append("\n## Done when (informational; never asserted)\n")
    out.append(table(["ratio", "value", "target", "status"],
                     [[r["label"], r["value"], "-" if r["target"] is None else f"<= {r['target']:g}", r["status"]]
                      for r in rows]))
    return "\n".join(out)


def report_methods(methods: dict[str, Any]) -> list[str]:
    """The ``methods`` section: per method and library the step time (fwd / bwd / opt), peak RSS, saved MB and
    trainable parameters, then the peftkit / reference ratios, then the failed tasks' last error lines."""
    out = ["\n## methods (training step per method, 4-layer m100 shape, CPU s per step)\n"]
    cols = ("step_s", "fwd_s", "bwd_s", "opt_s", "step_wall_s", "peak_rss_mb", "peak_rss_above_floor_mb",
            "saved_activation_mb", "trainable_params")
    out.append(harness.markdown_table(["method", "library", *cols], [[m, lib, *(row.get(c) for c in cols)]
                                                                    for m, e in methods.items()
                                                                    for lib, row in e["libs"].items()]))
    keys = ("step_time", "fwd_time", "bwd_time", "opt_time", "peak_rss", "peak_rss_above_floor", "saved_activations")
    body = []
    for m, e in methods.items():
        r = e.get("peftkit_over_ref")
        if r is None:
            body.append([m, *(None for _ in keys), "-", "-"])
            continue
        body.append([m, *(r[k] for k in keys), ", ".join(harness.fmt(v) for v in r["step_time_per_round"]),
                     e["trainable_params_equal"]])
    out.append("\npeftkit / reference (median of per-round ratios):\n")
    out.append(harness.markdown_table(["method", *keys, "step time per round", "same trainable params"], body))
    failed = [f"{m} ({lib}): {line}" for m, e in methods.items() for lib, line in e["errors"].items()]
    if failed:
        out.append("\nfailed tasks: " + "; ".join(failed))
    return out


# ============================================================================================ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lib", choices=("peftkit", "peft", "both"), default="both")
    parser.add_argument("--cases", type=str, default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 rep, 1 round (CI smoke test)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per subprocess (default per case)")
    parser.add_argument("--rounds", type=int, default=None, help="subprocess rounds (default 2; quick 1)")
    parser.add_argument("--counts", type=int, nargs="+", default=None, help="mixed: adapter counts (default 1 4 16)")
    parser.add_argument("--json", type=str, default=None, help="write settings, summary and raw results here")
    parser.add_argument("--tasks", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=tuple(SHAPES), default="full", help=argparse.SUPPRESS)
    parser.add_argument("--train-variants", default=None,
                        help="train: comma-separated subset of the variants (e.g. floor,compiled); default all")
    parser.add_argument("--methods", default=None,
                        help=f"methods case: comma-separated subset of {','.join(METHOD_CASES)} (default all; "
                             "--quick: those peftkit registers now)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the train 'compiled' variant (default inductor; quick aot_eager)")
    harness.add_worker_args(parser)
    return parser.parse_args(argv)


def select_methods(option: str | None, quick: bool) -> list[str]:
    """``--methods``: the named entries of ``METHOD_CASES`` (unknown names exit with the allowed ones); default all,
    and with ``--quick`` only those peftkit can run now (:func:`landed_methods`), so the CI smoke test stays green
    while issue 21's methods land."""
    if option is None:
        return landed_methods() if quick else list(METHOD_CASES)
    names = [m.strip() for m in option.split(",") if m.strip()]
    unknown = sorted(set(names) - set(METHOD_CASES))
    if unknown or not names:
        raise SystemExit(f"--methods: unknown {unknown or option!r}; allowed: {', '.join(METHOD_CASES)}")
    return names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.reps = args.reps or 1
        harness.write_result(args.result, worker(args))
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise SystemExit(f"--cases: unknown {unknown}; allowed: {', '.join(CASES)}")
    libs = list(LIBS) if args.lib == "both" else [args.lib]
    methods = select_methods(args.methods, args.quick) if "methods" in cases else []
    counts = args.counts or ([1, 4] if args.quick else [1, 4, 16])
    rounds = args.rounds or (1 if args.quick else 2)
    size = "quick" if args.quick else "full"
    backend = args.compile_backend or ("aot_eager" if args.quick else "inductor")  # quick: no C++ compile
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="peftkit-bench-") as tmp:
        workdir = Path(tmp)
        prepare_workdir(workdir, cases, counts, args.quick)
        train_variants = [v.strip() for v in (args.train_variants or "").split(",") if v.strip()]
        groups = plan_jobs(cases, libs, counts, args.quick, args.reps, train_variants, methods)
        for group in groups:
            for job in group:
                job.args += ["--workdir", str(workdir), "--size", size, "--compile-backend", backend]
        raw = harness.run_rounds(Path(__file__), groups, rounds, threads=args.threads, log=log)
        res = split_results(raw)
        imports = None
        if "import" in cases:
            imp_reps = args.reps or (1 if args.quick else REPS["import"])
            imports = run_import(libs, imp_reps, warmup=0 if args.quick else 1)
            log("import done")
        errors = {spec: rr[i]["error"] for spec, rr in res.items() for i in range(len(rr)) if "error" in rr[i]}
        summary = summarize(res, imports, cases, libs, counts, methods)
    rows = done_when(summary)
    settings = {"cases": cases, "libs": libs, "size": size, "shapes": SHAPES[size], "rounds": rounds,
                "reps": args.reps or ({c: 1 for c in CASES} if args.quick else REPS), "counts": counts,
                "methods": methods, "threads": args.threads, "compile_backend": backend, "rank": RANK, "lora_alpha": ALPHA, "targets": list(TARGETS),
                "machine": harness.machine_info(), "total_s": time.perf_counter() - started}
    print(f"# peftkit bench: {json.dumps({k: settings[k] for k in ('cases', 'libs', 'size', 'rounds', 'reps')})}")
    print(f"# machine: {settings['machine']}; total {settings['total_s']:.0f} s")
    print(report(summary, rows))
    for spec, err in errors.items():
        print(f"\nERROR in {spec}:\n{err}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "done_when": rows, "cases": summary,
                                               "errors": errors, "raw": res, "import_raw": imports}, indent=1,
                                              default=str))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
