"""Lily (low-rank interconnected adaptation across layers): the layer against the formula written here, the
sharing of ``lily_A`` / ``lily_B`` across layers, mixed batches, merging refused, config errors, and interop both
ways with the reference (tiny Llama, BERT, an MLP).

The generic properties (identity, save/load, multi-adapter, errors) come from the conformance suite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from method_interop import check_interop_both_ways, interop_case
from models import tiny_llama
from numerics import fp_tol
from torch import nn

from peftkit import LilyConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peftkit.errors import ConfigError, UnmergeableMethodError, UnsupportedModuleError
from peftkit.methods.lily import LilyLayer, LilyMergeError, group_key

#: the formula in float64 against the layer in float32: a few ulp per term of the 16 + r + r-term reductions
TOL = fp_tol(torch.float32, 64)
ESSENTIALS = ("r", "stride_A", "num_B", "scaling", "init_weights", "layers_to_transform", "layers_pattern")


def _lily_layers(model: nn.Module) -> list[tuple[str, LilyLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LilyLayer)]


# ------------------------------------------------------------------------------------------------ plain math
def plain_lily(x: torch.Tensor, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, router: torch.Tensor,
               scaling: float) -> torch.Tensor:
    """The paper's / reference's formula in float64, token by token: ``h_t = A x_t``, ``p = mean_t softmax(R h_t)``,
    ``y_t = W x_t + b + scaling · Σ_e p_e (h_t B_e)`` with ``B_e = B[e r:(e + 1) r]: (r, out)``."""
    x, A, B, router = (t.detach().double() for t in (x, A, B, router))
    W, b = base.weight.detach().double(), base.bias.detach().double()
    tokens = x.reshape(-1, x.shape[-1])
    r, num_b = A.shape[0], router.shape[0]
    hidden = [A @ t for t in tokens]
    probs = torch.stack([torch.exp(router @ h) / torch.exp(router @ h).sum() for h in hidden]).mean(0)
    experts = [B[e * r:(e + 1) * r] for e in range(num_b)]
    out = [W @ t + b + scaling * sum(probs[e] * (h @ experts[e]) for e in range(num_b)) for t, h in zip(tokens, hidden)]
    return torch.stack(out).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("num_b", [2, 3])
def test_layer_matches_the_formula(num_b: int) -> None:
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 12)),
                           LilyConfig(r=4, num_B=num_b, scaling=0.7, init_weights=False, target_modules=["0"]))
    layer = model.base_model.model[0]
    x = torch.randn(3, 5, 16)
    expected = plain_lily(x, layer.get_base_layer(), layer.lily_A["default"].weight, layer.lily_B["default"].weight,
                          layer.lily_router["default"].weight, 0.7)
    torch.testing.assert_close(model(x).double(), expected, **TOL)
    # the router averages over the whole batch: another row changes the others' outputs (the method's definition)
    assert (model(x[:1]) - model(x)[:1]).abs().max() > 1e-6


def test_identity_at_init_and_shapes() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12))
    x = torch.randn(2, 16)
    expected = base(x)
    model = get_peft_model(base, LilyConfig(r=4, num_B=3, target_modules=["0"]))
    layer = model.base_model.model[0]
    assert layer.lily_A["default"].weight.shape == (4, 16)
    assert layer.lily_B["default"].weight.shape == (3 * 4, 12)
    assert layer.lily_router["default"].weight.shape == (3, 4)
    assert not layer.lily_B["default"].weight.any()
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)  # B = 0: the update adds exact zeros


# ------------------------------------------------------------------------------------------------ sharing
def test_layers_share_A_per_stride_and_B_per_target() -> None:
    """``stride_A=2`` on 4 layers: q_proj layers (0, 1) and (2, 3) share A; every q_proj shares one B; v_proj has
    its own modules; the parameter count is the reference's (shared tensors counted once)."""
    import peft

    llama = tiny_llama()
    llama.config.num_hidden_layers = 4
    targets = ["q_proj", "v_proj"]

    def build(lib: Any) -> nn.Module:
        torch.manual_seed(0)
        from transformers import LlamaForCausalLM

        return lib.get_peft_model(LlamaForCausalLM(llama.config).eval(),
                                  lib.LilyConfig(r=2, stride_A=2, num_B=2, target_modules=targets))

    ours = build(__import__("peftkit"))
    layers = dict(_lily_layers(ours))
    q = [layers[f"base_model.model.model.layers.{i}.self_attn.q_proj"] for i in range(4)]
    v = [layers[f"base_model.model.model.layers.{i}.self_attn.v_proj"] for i in range(4)]
    a = [layer.lily_A["default"] for layer in q]
    assert a[0] is a[1] and a[2] is a[3] and a[0] is not a[2]
    assert all(layer.lily_B["default"] is q[0].lily_B["default"] for layer in q)
    assert v[0].lily_B["default"] is not q[0].lily_B["default"] and v[0].lily_A["default"] is not a[0]
    ref = build(peft)
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    assert set(get_peft_model_state_dict(ours)) == set(peft.get_peft_model_state_dict(ref))


def test_group_key_takes_the_longest_matching_target() -> None:
    """The reference's comment says "longest matching suffix"; its code takes the last match of a set's iteration
    order, which depends on the hash seed when two targets match. peftkit takes the longest."""
    shape = torch.Size([4, 4])
    assert group_key("layers.0.attn.q_proj", {"proj", "q_proj"}, shape) == ("q_proj", shape)
    assert group_key("layers.0.attn.q_proj", ".*proj", shape) == (".*proj", shape)
    assert group_key("layers.0.attn.q_proj", None, shape) == ("q_proj", shape)


def test_training_updates_the_shared_tensors_once() -> None:
    """A shared ``lily_B`` is one parameter: the optimizer sees it once and every layer sees the update."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LilyConfig(r=2, num_B=2, init_weights=False, target_modules=["q_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    assert len({id(p) for p in params}) == len(params)
    opt = torch.optim.SGD(params, lr=0.1)
    ids = torch.randint(3, 100, (2, 7))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    layers = [m for _, m in _lily_layers(model)]
    assert all(torch.equal(m.lily_B["default"].weight, layers[0].lily_B["default"].weight) for m in layers)  # one tensor


# ------------------------------------------------------------------------------------------------ behaviour
def test_mixed_batch_routes_each_adapter_over_its_own_rows() -> None:
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 12)),
                           LilyConfig(r=4, init_weights=False, target_modules=["0"]))
    model.add_adapter("other", LilyConfig(r=2, num_B=3, init_weights=False, target_modules=["0"]))
    model.eval()
    x = torch.randn(5, 16)
    names = ["default", "other", "default", "__base__", "other"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        for name in ("default", "other"):
            rows = [i for i, n in enumerate(names) if n == name]
            model.set_adapter(name)
            torch.testing.assert_close(mixed[rows], model(x[rows]), **TOL)
        with model.disable_adapter():
            torch.testing.assert_close(mixed[[3]], model(x[[3]]), **TOL)  # the base layer on 5 rows against 1


def test_merging_is_refused_as_the_reference_does() -> None:
    model = get_peft_model(nn.Sequential(nn.Linear(16, 12)), LilyConfig(r=4, target_modules=["0"]))
    for call in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(UnmergeableMethodError) as info:
            call()
        assert isinstance(info.value, NotImplementedError)
    with pytest.raises(LilyMergeError):
        model.base_model.model[0].merge()
    assert not model.base_model.model[0].merged_adapters


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"r": 0}, "r"), ({"stride_A": 0}, "stride_A"), ({"num_B": 1}, "num_B"), ({"scaling": "x"}, "scaling"),
    ({"init_weights": 1}, "init_weights"), ({"layers_pattern": "layers"}, "layers_pattern"),
])
def test_bad_config_values_raise_a_typed_error_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        LilyConfig(target_modules=["q_proj"], **kwargs)
    assert isinstance(info.value, ValueError) and field in str(info.value)


def test_non_linear_targets_are_refused() -> None:
    with pytest.raises(UnsupportedModuleError):
        get_peft_model(nn.Sequential(nn.Embedding(10, 4)), LilyConfig(r=2, target_modules=["0"]))


# ------------------------------------------------------------------------------------------------ interop
INTEROP = [
    pytest.param("llama-causal", {"r": 4}, id="llama"),
    pytest.param("llama-causal", {"r": 2, "stride_A": 2, "num_B": 3, "scaling": 0.5,
                                  "target_modules": ["q_proj", "v_proj", "down_proj"]}, id="llama-shared"),
    pytest.param("bert-feat", {"r": 4, "num_B": 2}, id="bert"),
    pytest.param("custom-mlp", {"r": 3, "target_modules": ["lin0", "lin1"]}, id="mlp"),
]


@pytest.mark.interop
@pytest.mark.parametrize(("case_name", "kwargs"), INTEROP)
def test_interop_both_ways(case_name: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    """Perturbed adapters: the files have the same keys (every layer's key, shared tensors included), shapes, dtypes
    and config essentials, and each library loads the other's file with the saver's outputs (1e-5)."""
    case = interop_case(case_name)
    kw = {"target_modules": list(case.target_modules), "task_type": case.task_type, **kwargs}
    ours, _ = check_interop_both_ways(case, lambda lib: lib.LilyConfig(**kw), tmp_path, markers=("lily_",),
                                      essentials=ESSENTIALS)
    loaded = PeftModel.from_pretrained(case.build().eval(), str(tmp_path / "ref"))
    for (_, a), (_, b) in zip(_lily_layers(ours), _lily_layers(loaded)):  # a load keeps the sharing structure
        assert (a.lily_B["default"] is _lily_layers(ours)[0][1].lily_B["default"]) == (
            b.lily_B["default"] is _lily_layers(loaded)[0][1].lily_B["default"])
