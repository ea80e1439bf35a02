"""Non-data-driven LoRA initialisations (issue 20, item 1): ``init_lora_weights`` = ``"orthogonal"``, ``"mica"`` and
``"loftq"`` (with ``LoftQConfig``), and ``replace_lora_weights_loftq`` on a bitsandbytes 4-bit base.

Reference semantics (🤗 PEFT 0.21.2 ``lora.layer.LoraLayer.orthogonal_init`` / ``mica_init`` / ``loftq_init``,
``utils.loftq_utils``):

- orthogonal: ``Q = qr(N(0,1): (r, r))``; ``A = (N: (in, r/2) @ Q[0::2]).T / 10``, ``B = N: (r/2, out).T @ Q[1::2] /
  10``; ``B @ A = 0`` (identity at init), the base weight untouched, ``r`` even;
- MiCA: ``B`` = the left singular vectors of the ``r`` smallest singular values of ``W``, ``A = 0``, ``B`` frozen;
- LoftQ: alternate NF4/int8 quantization of ``W - B @ A`` and a rank-``r`` SVD of ``W - Q``; the base weight becomes
  ``Q`` (dequantized).

The reference's LoftQ hard-codes a ``"cuda"``/``"xpu"`` compute device, so on this CPU-only machine it cannot run as
installed. The tests run the reference's own ``loftq_init`` / ``_loftq_init_new`` source with only that device
string replaced by ``"cpu"`` (:func:`_reference_on_cpu`): the algorithm and the bitsandbytes calls are the reference's.
"""

from __future__ import annotations

import copy
import inspect
import json
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from numerics import fp_tol
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.errors import ConfigError
from peftkit.methods.lora.init import orthogonal_factors
from peftkit.methods.lora.loftq import loftq_factors
from peftkit.ops.quant import int8_roundtrip, nf4_roundtrip, nf4_roundtrip_reference

WEIGHTS = "adapter_model.safetensors"
#: float32 comparisons across libraries: the longest reduction of the MLP below is 64 + 48 + 64 + rank terms
TOL = fp_tol(torch.float32, 192)


class Net(nn.Module):
    """``x: (N, 64) -> (N, 32)`` through Linear 64->48, ReLU, Linear 48->32.

    Both weights have 64 input columns: bitsandbytes 0.50.2's CPU ``dequantize_4bit`` kernel (which the reference's
    LoftQ uses here) disagrees with its own quantizer's flat 64-value blocks when a row is shorter than a block
    (e.g. a ``(32, 48)`` weight); its generic kernel and peftkit agree (``test_nf4_roundtrip_...``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 48)
        self.b = nn.Linear(48, 64)
        self.c = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(torch.relu(self.a(x))))


class EmbNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.lin = nn.Linear(16, 8)
        self.conv = nn.Conv1d(16, 8, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(ids))


def _net(seed: int = 0) -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Net().eval()


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(5, 64, generator=torch.Generator().manual_seed(seed))


def _reference_on_cpu(name: str) -> Any:
    """The reference's ``peft.utils.loftq_utils.<name>`` with its compute device string ``"cuda"`` replaced by
    ``"cpu"`` (and the no-op device-cache clearing dropped): everything else is its own code."""
    loftq_utils = pytest.importorskip("peft.utils.loftq_utils")
    source = inspect.getsource(getattr(loftq_utils, name))
    device = '"xpu" if is_xpu_available() else "cuda"'
    assert source.count(device) == 1, "the reference's loftq code changed: update _reference_on_cpu"
    patched = source.replace(device, '"cpu"').replace("clear_device_cache()", "")
    namespace = dict(vars(loftq_utils))
    exec(textwrap.dedent(patched), namespace)  # noqa: S102 (the installed reference's own source)
    return namespace[name]


@pytest.fixture
def reference_loftq_on_cpu(monkeypatch):
    """Make the reference's LoRA layers use the CPU version of its ``loftq_init``."""
    pytest.importorskip("bitsandbytes")
    import peft.tuners.lora.layer as ref_layer

    monkeypatch.setattr(ref_layer, "loftq_init", _reference_on_cpu("loftq_init"))


def _config(lib: Any, init: str, **kwargs: Any) -> Any:
    extra = {"loftq_config": lib.LoftQConfig(loftq_bits=4, loftq_iter=2)} if init == "loftq" else {}
    return lib.LoraConfig(r=4, lora_alpha=4, target_modules=["a", "c"], init_lora_weights=init, **extra, **kwargs)


def _perturb(model: nn.Module, seed: int = 3) -> None:
    """Move the adapter away from its init (as training would), the same way in both libraries."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


# ============================================================================================ orthogonal
def _plain_orthogonal(r: int, n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's ``orthogonal_init`` written out: QR of a Gaussian (r, r), odd rows to A, even rows to B."""
    X = torch.randn(r, r)
    Q, _ = torch.linalg.qr(X)
    A = (torch.randn(n_in, r // 2) @ Q[0::2, :]).T / 10.0
    B = torch.randn(r // 2, n_out).T @ Q[1::2, :] / 10.0
    return A, B


def test_orthogonal_factors_follow_the_plain_algorithm_and_cancel():
    torch.manual_seed(7)
    A, B = orthogonal_factors(6, 64, 48)
    torch.manual_seed(7)
    A_plain, B_plain = _plain_orthogonal(6, 64, 48)
    assert A.shape == (6, 64) and B.shape == (48, 6)
    torch.testing.assert_close(A, A_plain, atol=0, rtol=0)  # same ops on the same draws
    torch.testing.assert_close(B, B_plain, atol=0, rtol=0)  # same ops on the same draws
    # the rows of A lie in span(Q[0::2]) and those of B.T in span(Q[1::2]), orthogonal subspaces: B @ A = 0
    assert A.abs().max() > 1e-3 and B.abs().max() > 1e-3
    torch.testing.assert_close(B @ A, torch.zeros(48, 64), **fp_tol(torch.float32, 6))


def test_orthogonal_draws_match_the_reference_layer_with_the_same_seed():
    peft = pytest.importorskip("peft")
    ref = peft.get_peft_model(_net(), peft.LoraConfig(r=4, lora_alpha=4, target_modules=["a"]))
    layer = ref.base_model.model.a
    torch.manual_seed(11)
    layer.orthogonal_init("default")
    torch.manual_seed(11)
    A, B = orthogonal_factors(4, 64, 48)
    torch.testing.assert_close(layer.lora_A["default"].weight, A, atol=0, rtol=0)  # same function, same seed
    torch.testing.assert_close(layer.lora_B["default"].weight, B, atol=0, rtol=0)  # same function, same seed


def test_orthogonal_is_identity_at_init_and_leaves_the_base_untouched():
    base = _net()
    model = peftkit.get_peft_model(copy.deepcopy(base), _config(peftkit, "orthogonal"))
    for name in ("a", "c"):
        layer = getattr(model.base_model.model, name)
        assert torch.equal(layer.get_base_layer().weight, getattr(base, name).weight)
        assert layer.lora_A["default"].weight.abs().max() > 0 and layer.lora_B["default"].weight.abs().max() > 0
    torch.testing.assert_close(model(_x()), base(_x()), **TOL)


def test_orthogonal_needs_an_even_rank_and_a_linear_layer():
    with pytest.raises(ConfigError, match="even rank"):
        peftkit.get_peft_model(_net(), peftkit.LoraConfig(r=3, target_modules=["a"], init_lora_weights="orthogonal"))
    assert issubclass(ConfigError, ValueError)  # the reference raises ValueError
    with pytest.raises(ConfigError, match="orthogonal"):
        peftkit.get_peft_model(EmbNet(), peftkit.LoraConfig(r=2, target_modules=["conv"],
                                                            init_lora_weights="orthogonal"))
    # embeddings: the reference falls back to its standard embedding init (A = 0, B ~ N(0, 1))
    model = peftkit.get_peft_model(EmbNet(), peftkit.LoraConfig(r=2, target_modules=["emb"],
                                                                init_lora_weights="orthogonal"))
    emb = model.base_model.model.emb
    assert torch.equal(emb.lora_embedding_A["default"], torch.zeros(2, 20))
    assert emb.lora_embedding_B["default"].abs().max() > 0


# ============================================================================================ MiCA
def test_mica_takes_the_minor_left_singular_vectors_and_zero_A():
    base = _net()
    model = peftkit.get_peft_model(copy.deepcopy(base), _config(peftkit, "mica"))
    for name in ("a", "c"):
        layer = getattr(model.base_model.model, name)
        W = getattr(base, name).weight.detach()
        U = torch.linalg.svd(W.double(), full_matrices=False)[0]
        B = layer.lora_B["default"].weight.detach().double()
        # subspace equality (sign-free): B spans the left singular vectors of the 4 smallest singular values
        torch.testing.assert_close(B @ B.T, U[:, -4:] @ U[:, -4:].T, atol=1e-5, rtol=0)
        torch.testing.assert_close(B.T @ B, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
        assert torch.equal(layer.lora_A["default"].weight, torch.zeros(4, W.shape[1]))
        assert torch.equal(layer.get_base_layer().weight, getattr(base, name).weight)  # the base is unchanged
    torch.testing.assert_close(model(_x()), base(_x()), atol=0, rtol=0)  # A = 0: exactly the base output


def test_mica_trains_A_only_through_adapter_switches():
    model = peftkit.get_peft_model(_net(), _config(peftkit, "mica"))
    model.add_adapter("other", peftkit.LoraConfig(r=2, target_modules=["a"]))
    model.set_adapter("other")
    model.set_adapter("default")
    with model.disable_adapter():
        pass
    layer = model.base_model.model.a
    assert layer.lora_A["default"].weight.requires_grad
    assert not layer.lora_B["default"].weight.requires_grad
    B_before = layer.lora_B["default"].weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(_x()).pow(2).mean().backward()
        opt.step()
    assert layer.lora_B["default"].weight.grad is None
    assert torch.equal(layer.lora_B["default"].weight, B_before)
    assert layer.lora_A["default"].weight.abs().max() > 0  # A trained


def test_mica_trainable_parameters_and_B_match_the_reference():
    peft = pytest.importorskip("peft")
    ref = peft.get_peft_model(_net(), _config(peft, "mica"))
    ours = peftkit.get_peft_model(_net(), _config(peftkit, "mica"))
    names = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert names(ours) == names(ref) and all("lora_A" in n for n in names(ours))
    for name in ("a", "c"):
        B_ref = getattr(ref.base_model.model, name).lora_B["default"].weight.detach()
        B_ours = getattr(ours.base_model.model, name).lora_B["default"].weight.detach()
        # same LAPACK call on the same data; compare the projectors anyway, singular vectors have a free sign
        torch.testing.assert_close(B_ours @ B_ours.T, B_ref @ B_ref.T, atol=1e-5, rtol=0)


def test_mica_rejects_a_rank_above_the_layer_size_and_non_linear_targets():
    with pytest.raises(ConfigError, match="mica"):
        peftkit.get_peft_model(_net(), peftkit.LoraConfig(r=40, target_modules=["c"], rank_pattern={"c": 40},
                                                          init_lora_weights="mica"))
    with pytest.raises(ConfigError, match="MiCA"):
        peftkit.get_peft_model(EmbNet(), peftkit.LoraConfig(r=2, target_modules=["conv"], init_lora_weights="mica"))


def test_mica_on_embeddings_matches_the_reference_both_ways(tmp_path):
    """``lora_embedding_B`` = the minor left singular vectors of ``W.T: (dim, num_embeddings)``, ``A = 0``, B frozen;
    files load in either library with the same outputs."""
    peft = pytest.importorskip("peft")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = EmbNet()
    ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(0))
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["emb", "lin"], "init_lora_weights": "mica"}
    ours = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(**config))
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    emb, ref_emb = ours.base_model.model.emb, ref.base_model.model.emb
    B = emb.lora_embedding_B["default"].detach().double()
    U = torch.linalg.svd(base.emb.weight.detach().double().T, full_matrices=False)[0]
    torch.testing.assert_close(B @ B.T, U[:, -4:] @ U[:, -4:].T, atol=1e-5, rtol=0)  # sign-free subspace check
    B_ref = ref_emb.lora_embedding_B["default"].detach().double()
    torch.testing.assert_close(B @ B.T, B_ref @ B_ref.T, atol=1e-5, rtol=0)
    assert torch.equal(emb.lora_embedding_A["default"], torch.zeros(4, 20))
    assert not emb.lora_embedding_B["default"].requires_grad and emb.lora_embedding_A["default"].requires_grad
    names = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert names(ours) == names(ref)
    torch.testing.assert_close(ours(ids), base(ids), atol=0, rtol=0)  # A = 0
    for src, dst_lib, name in ((ours, peft, "ours"), (ref, peftkit, "ref")):
        _perturb(src)
        src.save_pretrained(tmp_path / name)
        loaded = dst_lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name)
        torch.testing.assert_close(loaded(ids), src(ids), **fp_tol(torch.float32, 32))


# ============================================================================================ LoftQ math
def _plain_loftq(W: torch.Tensor, r: int, bits: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoftQ written out in float64 with the loop quantizer: returns ``(Q, B @ A)``."""
    W = W.double()
    residual = W
    for step in range(iters):
        Q = (nf4_roundtrip_reference(residual.float()).double() if bits == 4
             else int8_roundtrip(residual.float()).double())
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        low_rank = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        if step + 1 < iters:
            residual = W - low_rank
    return Q, low_rank


def test_nf4_roundtrip_matches_the_loop_reference_and_bitsandbytes():
    W = torch.randn(48, 70, generator=torch.Generator().manual_seed(0))  # 3360 values: the last block is short
    fast = nf4_roundtrip(W)
    torch.testing.assert_close(fast, nf4_roundtrip_reference(W), atol=1e-6, rtol=0)  # float64 vs float32 scaling
    bnb = pytest.importorskip("bitsandbytes")
    packed, state = bnb.functional.quantize_4bit(W, blocksize=64, compress_statistics=False, quant_type="nf4")
    # another library's kernel: one rounding of the scale multiply apart at most
    torch.testing.assert_close(fast, bnb.functional.dequantize_4bit(packed, state), **fp_tol(torch.float32, 1))


def test_int8_roundtrip_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    W = torch.randn(16, 40, generator=torch.Generator().manual_seed(0))
    q = bnb.nn.Int8Params(W.clone(), requires_grad=False).to("cpu")
    torch.testing.assert_close(int8_roundtrip(W), bnb.functional.int8_vectorwise_dequant(q.data, q.SCB),
                               **fp_tol(torch.float32, 1))  # another library's kernel (scale order may differ)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_factors_follow_the_plain_alternating_algorithm(bits, iters):
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(2))
    A, B, Q = loftq_factors(W, 4, bits, iters)
    Q_plain, low_rank = _plain_loftq(W, 4, bits, iters)
    # float32 SVD and products against float64: a few ulp per term of the 64-long reductions
    torch.testing.assert_close(Q.double(), Q_plain, atol=1e-5, rtol=0)
    torch.testing.assert_close((B @ A).double(), low_rank, atol=1e-5, rtol=0)
    # LoftQ's point: Q + B @ A is closer to W than Q alone
    assert torch.linalg.norm(W - Q - B @ A) < torch.linalg.norm(W - nf4_roundtrip(W) if bits == 4 else W - Q)


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_factors_equal_the_reference_loftq_init(bits):
    pytest.importorskip("bitsandbytes")
    reference = _reference_on_cpu("loftq_init")
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(4))
    Q_ref, A_ref, B_ref = reference(W.clone(), num_bits=bits, reduced_rank=4, num_iter=2)
    A, B, Q = loftq_factors(W, 4, bits, 2)
    torch.testing.assert_close(Q, Q_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(A, A_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(B, B_ref, atol=1e-5, rtol=0)


def test_loftq_model_replaces_the_base_by_Q_and_sets_the_factors():
    base = _net()
    model = peftkit.get_peft_model(copy.deepcopy(base), _config(peftkit, "loftq"))
    for name in ("a", "c"):
        layer = getattr(model.base_model.model, name)
        A, B, Q = loftq_factors(getattr(base, name).weight.detach(), 4, 4, 2)
        # the same function on the same weight: the same kernels on the same data
        torch.testing.assert_close(layer.get_base_layer().weight, Q, atol=0, rtol=0)  # (see above)
        torch.testing.assert_close(layer.lora_A["default"].weight, A, atol=0, rtol=0)  # (see above)
        torch.testing.assert_close(layer.lora_B["default"].weight, B, atol=0, rtol=0)  # (see above)
    # lora_alpha == r (scaling 1): the adapted model is nearer the unquantized one than the quantized base alone
    x = _x()
    with model.disable_adapter():
        quantized_only = model(x)
    assert (model(x) - base(x)).norm() < (quantized_only - base(x)).norm()


def test_loftq_config_validation_and_json():
    with pytest.raises(ConfigError, match="loftq_config"):
        peftkit.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ConfigError, match="loftq_bits"):
        peftkit.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 3})
    with pytest.raises(ConfigError, match="loftq_iter"):
        peftkit.LoraConfig(init_lora_weights="loftq", loftq_config=peftkit.LoftQConfig(loftq_iter=0))
    with pytest.raises(ConfigError, match="loftq_config"):
        peftkit.LoraConfig(init_lora_weights="loftq", loftq_config={"bits": 4})
    config = peftkit.LoraConfig(init_lora_weights="loftq", loftq_config=peftkit.LoftQConfig(loftq_bits=8))
    assert config.loftq_config == {"loftq_bits": 8, "loftq_iter": 1}  # stored as a dict, as the reference
    assert json.loads(json.dumps(config.to_dict()))["loftq_config"] == {"loftq_bits": 8, "loftq_iter": 1}
    with pytest.raises(ConfigError, match="LoftQ initialise"):
        peftkit.get_peft_model(EmbNet(), peftkit.LoraConfig(target_modules=["emb"], init_lora_weights="loftq",
                                                            loftq_config={"loftq_bits": 4}))


# ============================================================================================ interop, save/load
INITS = ["orthogonal", "mica", "loftq"]


@pytest.mark.parametrize("init", INITS)
def test_peftkit_save_load_round_trip(init, tmp_path):
    base = _net()
    model = peftkit.get_peft_model(copy.deepcopy(base), _config(peftkit, init))
    _perturb(model)
    expected = model(_x())
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(_x()), expected, atol=0, rtol=0)  # same tensors, same kernels
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == init


@pytest.mark.parametrize("init", INITS)
def test_reference_loads_peftkit_adapter(init, tmp_path, request):
    peft = pytest.importorskip("peft")
    if init == "loftq":
        request.getfixturevalue("reference_loftq_on_cpu")
    base = _net()
    ours = peftkit.get_peft_model(copy.deepcopy(base), _config(peftkit, init))
    _perturb(ours)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    theirs = load_file(tmp_path / WEIGHTS)
    assert sorted(theirs) == sorted(k.replace(".default", "") for k in ref.state_dict() if "lora_" in k)
    torch.testing.assert_close(ref(_x()), ours(_x()), **TOL)


@pytest.mark.parametrize("init", INITS)
def test_peftkit_loads_reference_adapter(init, tmp_path, request):
    peft = pytest.importorskip("peft")
    if init == "loftq":
        request.getfixturevalue("reference_loftq_on_cpu")
    base = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(copy.deepcopy(base), _config(peft, init))
    # deterministic inits: the reference's initial state equals ours (orthogonal is random: compared by seed above)
    if init != "orthogonal":
        ours_init = peftkit.get_peft_model(copy.deepcopy(base), _config(peftkit, init))
        torch.testing.assert_close(ours_init(_x()), ref(_x()), **TOL)
        for name in ("a", "c"):
            ref_layer, our_layer = getattr(ref.base_model.model, name), getattr(ours_init.base_model.model, name)
            torch.testing.assert_close(our_layer.get_base_layer().weight, ref_layer.get_base_layer().weight,
                                       atol=1e-6, rtol=0)
            delta = lambda layer: layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            torch.testing.assert_close(delta(our_layer), delta(ref_layer), atol=1e-5, rtol=0)
    _perturb(ref)
    ref.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(ours(_x()), ref(_x()), **TOL)
    ref_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert ours.peft_config["default"].init_lora_weights == ref_config["init_lora_weights"]
    if init == "loftq":
        assert ref_config["loftq_config"] == ours.peft_config["default"].loftq_config


# ============================================================================================ replace_lora_weights_loftq
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A Llama with hidden size 64 (a multiple of bitsandbytes' 4-bit block size, see ECOSYSTEM.md §5)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny-llama-64-loftq")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _load_4bit(path: Path) -> nn.Module:
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
    for module in model.modules():  # no CPU inference repacking of the 4-bit weights (ECOSYSTEM.md §5)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def test_replace_lora_weights_loftq_on_a_4bit_model(tiny_dir, monkeypatch):
    peft = pytest.importorskip("peft")
    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file as load

    config = {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    ours = peftkit.get_peft_model(_load_4bit(tiny_dir), peftkit.LoraConfig(**config))
    peftkit.replace_lora_weights_loftq(ours, model_path=str(tiny_dir))
    full = load(tiny_dir / "model.safetensors")
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    W = full["model.layers.0.self_attn.q_proj.weight"].float()
    weight = layer.get_base_layer().weight
    Q = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    U, S, Vh = torch.linalg.svd((W - Q).double(), full_matrices=False)
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    torch.testing.assert_close(B @ A, U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], atol=1e-5, rtol=0)  # plain one step

    # the reference's replace_lora_weights_loftq (its _loftq_init_new on the CPU) gives the same factors
    from peft.utils import loftq_utils

    monkeypatch.setattr(loftq_utils, "_loftq_init_new", _reference_on_cpu("_loftq_init_new"))
    ref = peft.get_peft_model(_load_4bit(tiny_dir), peft.LoraConfig(**config))
    loftq_utils.replace_lora_weights_loftq(ref, model_path=str(tiny_dir))
    ref_layer = ref.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.lora_A["default"].weight, ref_layer.lora_A["default"].weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.lora_B["default"].weight, ref_layer.lora_B["default"].weight, atol=1e-5, rtol=0)

    # callback returning False restores the previous factors
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_" in n}
    _perturb(ours)
    perturbed = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_" in n}
    peftkit.replace_lora_weights_loftq(ours, model_path=str(tiny_dir), callback=lambda model, name: False)
    for name, param in ours.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, perturbed[name]) and not torch.equal(param, before[name])


def test_replace_lora_weights_loftq_needs_a_4bit_layer(tiny_dir):
    model = peftkit.get_peft_model(_net(), peftkit.LoraConfig(r=4, target_modules=["a"]))
    with pytest.raises(ValueError, match="4-bit"):
        peftkit.replace_lora_weights_loftq(model, model_path=str(tiny_dir))


# ============================================================================================ tiny transformers models
MODELS = {"llama": ("tiny_llama", ["q_proj", "v_proj", "down_proj"]), "gpt2": ("tiny_gpt2", ["c_attn", "c_proj"])}


def _tiny(kind: str) -> nn.Module:
    import models

    return getattr(models, MODELS[kind][0])().eval()


def _ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def _logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=_ids()).logits


def _tiny_config(lib: Any, kind: str, init: str) -> Any:
    extra = {"loftq_config": lib.LoftQConfig(loftq_bits=4, loftq_iter=1)} if init == "loftq" else {}
    return lib.LoraConfig(r=4, lora_alpha=4, target_modules=MODELS[kind][1], init_lora_weights=init,
                          task_type="CAUSAL_LM", **extra)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("init", INITS)
def test_tiny_models_identity_merge_and_save_load(kind, init, tmp_path):
    """Identity at init (orthogonal, MiCA; LoftQ replaces the base by its quantized copy on purpose), merge equals
    the unmerged forward, save/load round trip; GPT-2's ``Conv1D`` (weights ``(in, out)``) included."""
    base = _tiny(kind)
    model = peftkit.get_peft_model(copy.deepcopy(base), _tiny_config(peftkit, kind, init))
    # a full-vocabulary logit passes ~4 matmuls of width <= 64 per layer, 2 layers
    tol = fp_tol(torch.float32, 512)
    if init != "loftq":
        torch.testing.assert_close(_logits(model), _logits(base), **tol)
    _perturb(model)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_logits(loaded), expected, **tol)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(_logits(merged), expected, **tol)


REF_LOFTQ_CONV1D = ("the reference's loftq_init ignores fan_in_fan_out: on GPT-2's Conv1D it builds lora_A: (r, out) "
                    "and lora_B: (in, r), so it cannot load (or run) a LoftQ adapter there (README)")


def test_gpt2_conv1d_loftq_the_reference_cannot_load_ours(tmp_path, reference_loftq_on_cpu):
    """LoftQ on GPT-2 ``Conv1D``: peftkit's adapter has the layer's shapes and round-trips; the reference cannot load it
    (its init builds transposed factors, see :data:`REF_LOFTQ_CONV1D`), which this test pins."""
    peft = pytest.importorskip("peft")
    base = _tiny("gpt2")
    ours = peftkit.get_peft_model(copy.deepcopy(base), _tiny_config(peftkit, "gpt2", "loftq"))
    _perturb(ours)
    ours.save_pretrained(tmp_path / "ours")
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(_logits(loaded), _logits(ours), atol=0, rtol=0)  # same tensors, same kernels
    with warnings.catch_warnings(), pytest.raises(RuntimeError):
        warnings.simplefilter("ignore")
        peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")


@pytest.mark.parametrize("init", ["orthogonal", "mica"])
def test_gpt2_conv1d_interop_both_ways(init, tmp_path):
    peft = pytest.importorskip("peft")
    base = _tiny("gpt2")
    tol = fp_tol(torch.float32, 512)
    ours = peftkit.get_peft_model(copy.deepcopy(base), _tiny_config(peftkit, "gpt2", init))
    _perturb(ours)
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(ref_loaded), _logits(ours), **tol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(copy.deepcopy(base), _tiny_config(peft, "gpt2", init))
    _perturb(ref)
    ref.save_pretrained(tmp_path / "ref")
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ref")
    torch.testing.assert_close(_logits(loaded), _logits(ref.eval()), **tol)


# ============================================================================================ pissa_niter_<k>
def test_pissa_niter_matches_the_reference_layer_with_the_same_seed():
    """``pissa_niter_<k>`` (covered in test_pissa_olora.py) draws its random sketch from the default generator as the
    reference's ``torch.svd_lowrank`` call does: with the same seed the factors and the residual are the same."""
    peft = pytest.importorskip("peft")
    from peftkit.methods.lora.init import init_from_weight

    base = _net()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["a"]))
    layer = ref.base_model.model.a
    torch.manual_seed(13)
    layer.pissa_init("default", "pissa_niter_2")
    torch.manual_seed(13)
    A, B, residual = init_from_weight(base.a.weight.detach().float(), "pissa_niter_2", 4, 2.0)
    torch.testing.assert_close(layer.lora_A["default"].weight, A, atol=0, rtol=0)  # same ops on the same draws
    torch.testing.assert_close(layer.lora_B["default"].weight, B, atol=0, rtol=0)  # same ops on the same draws
    torch.testing.assert_close(layer.get_base_layer().weight, residual, atol=0, rtol=0)  # same ops, same data


def test_loftq_config_with_another_init_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="loftq_config is given but ignored"):
        config = peftkit.LoraConfig(loftq_config=peftkit.LoftQConfig(loftq_bits=4))
    assert json.loads(json.dumps(config.to_dict()))["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}


def test_mica_with_dora_is_rejected_as_in_the_reference():
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match="variant combination"):
        peft.get_peft_model(_net(), peft.LoraConfig(r=4, target_modules=["a"], init_lora_weights="mica",
                                                    use_dora=True))
    with pytest.raises(ConfigError, match="use_dora"):
        peftkit.LoraConfig(r=4, target_modules=["a"], init_lora_weights="mica", use_dora=True)


def test_mica_spelled_in_capitals_initialises_and_freezes_B():
    """The reference compares ``init_lora_weights.lower() == "mica"`` for the init but ``== "mica"`` for its frozen-B
    variant, so ``"MiCA"`` gets MiCA's factors with a trainable B there. peftkit freezes B for every spelling (MiCA
    trains A only; README)."""
    model = peftkit.get_peft_model(_net(), peftkit.LoraConfig(r=4, target_modules=["a"], init_lora_weights="MiCA"))
    layer = model.base_model.model.a
    assert torch.equal(layer.lora_A["default"].weight, torch.zeros(4, 64))
    assert not layer.lora_B["default"].weight.requires_grad
