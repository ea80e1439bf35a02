"""Adapter state dicts and the behaviours around them that must match the reference (issue 15, section 2).

FSDP1 runs in this process as a single-rank gloo group (CPU): enough to put ``_fsdp_wrapped_module`` into module
paths, which is what the key derivation must see through.
"""

from __future__ import annotations

import socket
import warnings

import pytest
import torch
from models import tiny_llama
from numerics import TINY_MODEL_REDUCTION, fp_tol
from torch import nn

import peftkit
from peftkit import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict


def _llama_with_biases() -> nn.Module:
    """The tiny Llama with ``attention_bias=True`` (q/k/v/o projections have biases), biases made non-zero."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**tiny_llama().config.to_dict(), "attention_bias": True})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_()
    return model


@pytest.fixture
def gloo_group():
    """A single-process gloo process group (FSDP needs one), destroyed afterwards."""
    import torch.distributed as dist

    if dist.is_initialized():  # another test of this worker left one up: a 1-process group serves as well
        assert dist.get_world_size() == 1, "a multi-process group is up in this test process"
        yield
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _train_biases(model: nn.Module) -> dict[str, torch.Tensor]:
    """Give every trainable bias new values (as training would); returns ``{name: value}`` of those biases."""
    trained = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") and param.requires_grad:
                param.add_(1.0)
                trained[name] = param.detach().clone()
    return trained


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_fsdp1_bias_keys_have_no_wrapper_names_and_reload(bias, gloo_group, tmp_path):
    """Under FSDP1 (``use_orig_params=True``) the saved bias keys are the unwrapped model's keys, and the trained
    biases come back on reload (before the fix they kept ``_fsdp_wrapped_module.`` and were reported unexpected)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from peftkit.integrations.distributed import fsdp_auto_wrap_policy

    config = LoraConfig(target_modules=["q_proj", "v_proj"], r=2, bias=bias)
    plain = get_peft_model(_llama_with_biases(), config)
    expected_keys = set(get_peft_model_state_dict(plain))

    model = get_peft_model(_llama_with_biases(), config)
    trained = _train_biases(model)
    assert trained, "the config must make some biases trainable"
    wrapped = FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=True,
                                       device_id=torch.device("cpu"))
    state = get_peft_model_state_dict(wrapped.module)
    assert not [k for k in state if "_fsdp_wrapped_module" in k]
    assert set(state) == expected_keys
    assert set(get_peft_model_state_dict(wrapped)) == expected_keys  # the FSDP root itself

    fresh = get_peft_model(_llama_with_biases(), config)
    result = set_peft_model_state_dict(fresh, state)
    assert not result.unexpected_keys
    params = dict(fresh.named_parameters())
    for name, value in trained.items():
        clean = name.replace("_fsdp_wrapped_module.", "")
        torch.testing.assert_close(params[clean], value, rtol=0, atol=0)  # copied, not computed


def test_bias_tensors_load_into_a_bias_none_model_as_the_reference_does():
    """A file with bias tensors loads them even when the loading config says ``bias="none"``: the reference loads
    every key that names a model parameter; before the fix peftkit reported them unexpected and dropped them."""
    from peft import LoraConfig as RefLoraConfig
    from peft import get_peft_model as ref_get_peft_model
    from peft import set_peft_model_state_dict as ref_set

    source = get_peft_model(_llama_with_biases(), LoraConfig(target_modules=["q_proj"], r=2, bias="all"))
    trained = _train_biases(source)
    state = get_peft_model_state_dict(source)
    bias_keys = {k for k in state if k.endswith(".bias")}
    assert len(bias_keys) == len(trained) > 2

    ours = get_peft_model(_llama_with_biases(), LoraConfig(target_modules=["q_proj"], r=2, bias="none"))
    result = set_peft_model_state_dict(ours, state)
    assert not result.unexpected_keys

    ref = ref_get_peft_model(_llama_with_biases(), RefLoraConfig(target_modules=["q_proj"], r=2, bias="none"))
    ref_result = ref_set(ref, state)
    assert not [k for k in ref_result.unexpected_keys if k.endswith(".bias")]
    ours_params, ref_params = dict(ours.named_parameters()), dict(ref.named_parameters())
    for name, value in trained.items():
        torch.testing.assert_close(ours_params[name], value, rtol=0, atol=0)
        torch.testing.assert_close(ref_params[name], value, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- modules_to_save
class _Net(nn.Module):
    """``lin`` (adapted), ``head`` (a modules_to_save candidate) and containers that cannot be called."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.blocks = nn.ModuleDict({"a": nn.Linear(4, 4)})
        self.stack = nn.ModuleList([nn.Linear(4, 4)])
        self.extras = nn.ParameterDict({"p": nn.Parameter(torch.ones(2))})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin(x))


def test_two_active_adapters_with_copies_of_one_module_raise_like_the_reference():
    """Activating two adapters that each hold a copy of ``head`` raises ``ValueError`` (as the reference does) and
    leaves the active adapters unchanged; before the fix the first copy was used silently."""
    import peft

    for lib in (peftkit, peft):
        model = lib.get_peft_model(_Net(), lib.LoraConfig(target_modules=["lin"], modules_to_save=["head"]))
        model.add_adapter("b", lib.LoraConfig(target_modules=["lin"], modules_to_save=["head"]))
        with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
            model.base_model.set_adapter(["default", "b"])
        assert model.base_model.model.head.active_adapters in (["default"], "default")
    # two adapters active where only one holds a copy is fine
    model = get_peft_model(_Net(), LoraConfig(target_modules=["lin"], modules_to_save=["head"]))
    model.add_adapter("c", LoraConfig(target_modules=["lin"]))
    model.base_model.set_adapter(["default", "c"])
    assert model.base_model.model.head.active_adapters == ["default"]


@pytest.mark.parametrize("container", ["blocks", "stack", "extras"])
def test_modules_to_save_container_raises_type_error_at_injection(container):
    """A ``ModuleDict``/``ModuleList``/``ParameterDict`` in ``modules_to_save`` raises ``TypeError`` (the reference's
    builtin) naming the module, at ``get_peft_model``, and leaves the model unchanged; before the fix it was wrapped
    and the forward crashed later."""
    net = _Net()
    with pytest.raises(TypeError, match=f"modules_to_save cannot be applied.*{container}"):
        get_peft_model(net, LoraConfig(target_modules=["lin"], modules_to_save=[container]))
    assert type(net.lin) is nn.Linear and type(getattr(net, container)).__module__.startswith("torch.nn")


def test_wrapper_reports_only_the_adapters_it_holds():
    """A wrapper holding a copy only for adapter ``o`` reports no active adapter while ``default`` is active (the
    reference reports ``[]`` too); before the fix it reported ``['default']``."""
    import peft

    for lib in (peftkit, peft):
        model = lib.get_peft_model(_Net(), lib.LoraConfig(target_modules=["lin"]))
        model.add_adapter("o", lib.LoraConfig(target_modules=["lin"], modules_to_save=["head"]))
        head = model.base_model.model.head
        assert list(head.active_adapters) == []
        model.set_adapter("o")
        assert list(head.active_adapters) == ["o"]
        model.set_adapter("default")
        assert list(head.active_adapters) == []


def _tiny_distilbert() -> nn.Module:
    """DistilBERT for sequence classification (``pre_classifier`` and ``classifier`` heads), eval mode."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                              max_position_embeddings=64, num_labels=2)
    return DistilBertForSequenceClassification(config).eval()


def _perturb_trainable(model: nn.Module) -> None:
    """Change every trainable tensor (LoRA weights and the modules_to_save copies), as training would."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def _logits(model: nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


# float32 through 2 layers of width <= 64 computed by two libraries' code paths: a few ulp (1.2e-7) times the
# reduction length and depth, so 1e-5; exact equality would only hold for the same kernels on the same data
ATOL = 1e-5


def test_distilbert_reference_file_with_pre_classifier_loads_in_peftkit(tmp_path):
    """The reference wraps ``pre_classifier`` for ``"classifier"`` (plain suffix) and saves its weights; peftkit
    wraps it at load time (with a warning) and gives the reference's logits. Before the fix its keys were reported
    unexpected and the trained ``pre_classifier`` was lost."""
    import peft

    ref = peft.get_peft_model(_tiny_distilbert(), peft.LoraConfig(task_type="SEQ_CLS", target_modules=["q_lin"], r=2))
    _perturb_trainable(ref)
    ref.save_pretrained(tmp_path)
    expected = _logits(ref.eval())

    with pytest.warns(peftkit.PeftWarning, match="pre_classifier"):
        ours = peftkit.PeftModel.from_pretrained(_tiny_distilbert(), tmp_path)
    assert type(ours.base_model.model.pre_classifier).__name__ == "ModulesToSaveWrapper"
    torch.testing.assert_close(_logits(ours), expected, atol=ATOL, rtol=ATOL)
    assert not any(p.requires_grad for p in ours.parameters())  # loaded for inference: the new copy is frozen too
    # saving again keeps the pre_classifier weights, so the round trip to the reference is complete
    ours.save_pretrained(tmp_path / "again")
    back = peft.PeftModel.from_pretrained(_tiny_distilbert(), tmp_path / "again")
    torch.testing.assert_close(_logits(back.eval()), expected, atol=ATOL, rtol=ATOL)


def test_distilbert_peftkit_file_loads_in_the_reference_and_warns_at_get_peft_model(tmp_path):
    """peftkit wraps only ``classifier`` and warns that the reference would also wrap ``pre_classifier``; its file
    loads in the reference with the same logits (the reference's ``pre_classifier`` copy equals the base)."""
    import peft

    with pytest.warns(peftkit.PeftWarning, match=r"\['distilbert.*pre_classifier'\]|pre_classifier"):
        ours = get_peft_model(_tiny_distilbert(), LoraConfig(task_type="SEQ_CLS", target_modules=["q_lin"], r=2))
    assert type(ours.base_model.model.pre_classifier) is nn.Linear
    _perturb_trainable(ours)
    ours.save_pretrained(tmp_path)
    expected = _logits(ours.eval())
    ref = peft.PeftModel.from_pretrained(_tiny_distilbert(), tmp_path)
    torch.testing.assert_close(_logits(ref.eval()), expected, atol=ATOL, rtol=ATOL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = peftkit.PeftModel.from_pretrained(_tiny_distilbert(), tmp_path)
    assert not [w for w in caught if "so that they load" in str(w.message)]  # nothing to wrap at load time
    assert type(again.base_model.model.pre_classifier) is nn.Linear
    torch.testing.assert_close(_logits(again), expected, atol=ATOL, rtol=ATOL)


# ---------------------------------------------------------------------------------------------- embeddings
class _TwoEmbeddings(nn.Module):
    """``embed_tokens`` (the input embedding) and a sibling ``embed_tokens_extra`` whose name extends it."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed_tokens = nn.Embedding(10, 4)
        self.embed_tokens_extra = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.embed_tokens(x) + self.embed_tokens_extra(x))

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> None:
        return None


@pytest.mark.parametrize("target", ["lin", "embed_tokens"])
def test_save_embedding_layers_takes_the_input_embedding_not_its_siblings(target, tmp_path):
    """``save_embedding_layers=True`` saves the module ``get_input_embeddings()`` returns, under the reference's keys,
    and loading leaves the sibling ``embed_tokens_extra`` alone; before the fix the sibling was saved and a load
    overwrote its frozen weight."""
    from peft import LoraConfig as RefLoraConfig
    from peft import get_peft_model as ref_get_peft_model
    from peft import get_peft_model_state_dict as ref_state_dict

    source = get_peft_model(_TwoEmbeddings(seed=0), LoraConfig(target_modules=[target]))
    state = get_peft_model_state_dict(source, save_embedding_layers=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ref_get_peft_model(_TwoEmbeddings(seed=0), RefLoraConfig(target_modules=[target]))
        assert set(state) == set(ref_state_dict(ref, save_embedding_layers=True))
    assert not [k for k in state if "embed_tokens_extra" in k]

    source.save_pretrained(tmp_path, save_embedding_layers=True)
    target_model = _TwoEmbeddings(seed=1)
    sibling = target_model.embed_tokens_extra.weight.detach().clone()
    loaded = peftkit.PeftModel.from_pretrained(target_model, tmp_path)
    torch.testing.assert_close(loaded.base_model.model.embed_tokens_extra.weight, sibling, rtol=0, atol=0)
    # a file that names the sibling (as peftkit wrote before the fix) does not get into it either
    fresh = get_peft_model(_TwoEmbeddings(seed=1), LoraConfig(target_modules=[target]))
    bad = {**state, "base_model.model.embed_tokens_extra.weight": torch.zeros(10, 4)}
    result = set_peft_model_state_dict(fresh, bad)
    assert result.unexpected_keys == ["base_model.model.embed_tokens_extra.weight"]
    torch.testing.assert_close(fresh.base_model.model.embed_tokens_extra.weight, sibling, rtol=0, atol=0)


def _tiny_convnext() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(0)
    config = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32,
                            num_labels=2)
    return ConvNextForImageClassification(config).eval()


def _tiny_wav2vec2() -> nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    torch.manual_seed(0)
    config = Wav2Vec2Config(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
                            num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, num_labels=2)
    return Wav2Vec2ForSequenceClassification(config).eval()


@pytest.mark.parametrize("build, targets, inputs", [
    (_tiny_convnext, ["pwconv1", "pwconv2"], lambda: {"pixel_values": torch.randn(2, 3, 32, 32)}),
    (_tiny_wav2vec2, ["q_proj", "v_proj"], lambda: {"input_values": torch.randn(2, 400)}),
])
def test_save_pretrained_works_when_get_input_embeddings_raises(build, targets, inputs, tmp_path):
    """transformers 5 raises ``NotImplementedError`` from ``get_input_embeddings`` of ConvNeXt / Wav2Vec2 / CLIP:
    ``save_pretrained`` with default arguments (what a Trainer checkpoint calls) saves and reloads the adapter;
    before the fix it crashed. ``save_embedding_layers=True`` finds no embedding to add and says so."""
    model = get_peft_model(build(), LoraConfig(target_modules=targets, r=2))
    _perturb_trainable(model)
    batch = inputs()
    with torch.no_grad():
        expected = model.eval()(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(build(), tmp_path)
    with torch.no_grad():
        # another model instance built from the file: the same math, tensors at other addresses
        torch.testing.assert_close(loaded(**batch).logits, expected, **fp_tol(torch.float32, TINY_MODEL_REDUCTION))
    with pytest.warns(peftkit.PeftWarning, match="embedding"):
        model.save_pretrained(tmp_path / "with_embeddings", save_embedding_layers=True)
    assert set(peftkit.load_peft_weights(tmp_path / "with_embeddings")) == set(peftkit.load_peft_weights(tmp_path))


# ---------------------------------------------------------------------------------------------- low_cpu_mem_usage
@pytest.mark.parametrize("method", ["lora", "ia3", "loha"])
def test_inject_adapter_in_model_low_cpu_mem_usage_leaves_adapters_on_meta(method):
    """``inject_adapter_in_model(low_cpu_mem_usage=True)`` creates the adapter tensors on the meta device, as the
    reference does (before the fix the flag was ignored); loading a state dict then fills them on the base layer's
    device and the model computes what the source model computes."""
    import peft

    configs = {"lora": (peftkit.LoraConfig, peft.LoraConfig, {"init_lora_weights": False}),
               "ia3": (peftkit.IA3Config, peft.IA3Config, {"init_ia3_weights": False}),
               "loha": (peftkit.LoHaConfig, peft.LoHaConfig, {"init_weights": False})}
    ours_cls, ref_cls, extra = configs[method]
    kwargs = {"target_modules": ["q_proj", "v_proj"], **extra}
    if method == "ia3":
        kwargs["feedforward_modules"] = []
    ref = peft.inject_adapter_in_model(ref_cls(**kwargs), tiny_llama(), low_cpu_mem_usage=True)
    ref_meta = sorted(n for n, p in ref.named_parameters() if p.is_meta)
    ours = peftkit.inject_adapter_in_model(ours_cls(**kwargs), tiny_llama(), low_cpu_mem_usage=True)
    meta = sorted(n for n, p in ours.named_parameters() if p.is_meta)
    assert meta and meta == ref_meta

    torch.manual_seed(3)
    source = peftkit.inject_adapter_in_model(ours_cls(**kwargs), tiny_llama())
    state = get_peft_model_state_dict(source)
    result = set_peft_model_state_dict(ours, state, low_cpu_mem_usage=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert not [n for n, p in ours.named_parameters() if p.is_meta or p.device.type != "cpu"]
    ids = torch.arange(3, 11).reshape(1, 8)
    with torch.no_grad():
        # two instances with the same weights (one loaded from meta): the same math, tensors at other addresses
        torch.testing.assert_close(ours(ids).logits, source(ids).logits, **fp_tol(torch.float32, TINY_MODEL_REDUCTION))


# ---------------------------------------------------------------------------------------------- builtin error types
class _EmbNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.lin(self.emb(x)))


def _raised(fn) -> BaseException:
    with pytest.raises(Exception) as info:
        fn()
    return info.value


@pytest.mark.parametrize("case", ["lora_bias_embedding", "lora_layernorm", "ia3_embedding", "loha_embedding",
                                  "config_without_peft_type", "get_peft_config_without_peft_type",
                                  "from_pretrained_without_peft_type"])
def test_errors_subclass_the_builtin_the_reference_raises(case, tmp_path):
    """Each error is an instance of the builtin class the reference raises in the same situation (README promise);
    before the fix ``lora_bias=True`` on an Embedding raised ``NotImplementedError`` (reference: ``ValueError``),
    a config without ``peft_type`` raised neither ``TypeError`` nor ``KeyError``, and unsupported target modules
    raised ``TypeError`` where the reference's LoRA/IA3 raise ``ValueError``."""
    import json

    import peft

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["lin"]}))
    calls = {
        "lora_bias_embedding": lambda lib: lib.get_peft_model(_EmbNet(), lib.LoraConfig(target_modules=["emb"],
                                                                                         lora_bias=True)),
        "lora_layernorm": lambda lib: lib.get_peft_model(_EmbNet(), lib.LoraConfig(target_modules=["ln"])),
        "ia3_embedding": lambda lib: lib.get_peft_model(_EmbNet(), lib.IA3Config(target_modules=["emb"],
                                                                                 feedforward_modules=[])),
        "loha_embedding": lambda lib: lib.get_peft_model(_EmbNet(), lib.LoHaConfig(target_modules=["emb"])),
        "config_without_peft_type": lambda lib: lib.PeftConfig.from_pretrained(tmp_path),
        "get_peft_config_without_peft_type": lambda lib: lib.get_peft_config({"r": 8}),
        "from_pretrained_without_peft_type": lambda lib: lib.PeftModel.from_pretrained(_EmbNet(), tmp_path),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_error = _raised(lambda: calls[case](peft))
        ours = _raised(lambda: calls[case](peftkit))
    builtin = next(c for c in type(ref_error).__mro__ if c.__module__ == "builtins")
    assert isinstance(ours, builtin), f"{type(ours).__name__} is not a {builtin.__name__} ({ref_error!r})"
    assert isinstance(ours, peftkit.PeftError)


def test_a_method_config_class_loads_a_config_without_peft_type(tmp_path):
    """``LoraConfig.from_pretrained`` of a file without ``peft_type`` builds a LoraConfig, as the reference does
    (before the fix it raised)."""
    import json

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["lin"]}))
    config = peftkit.LoraConfig.from_pretrained(tmp_path)
    assert isinstance(config, peftkit.LoraConfig) and config.r == 4 and str(config.peft_type) == "LORA"
