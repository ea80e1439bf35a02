"""``LoraConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from ...config import PeftConfig, as_set, as_subconfig, check, is_int, is_number
from ...errors import ConfigTypeError, PeftWarning
from ...types import PeftType
from .arrow import ArrowConfig, as_arrow_config
from .bdlora import BdLoraConfig, as_bdlora_config
from .corda import CordaConfig, as_corda_config
from .eva import EvaConfig, eva_subconfig
from .kasa import KasaConfig
from .loftq import LoftQConfig, check_loftq_config
from .loraga import LoraGAConfig, as_lora_ga_config
from .monteclora import MontecloraConfig, as_monteclora_config
from .qalora import check_qalora
from .velora import VeloraConfig

#: ``init_lora_weights`` values the reference accepts (``pissa_niter_<k>`` too).
INIT_CHOICES = (True, False, "gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal", "mica", "lora_ga")
#: the values the reference compares after ``.lower()`` (``"OLoRA"``, ``"Gaussian"`` work there); the others are
#: compared as written (``"PiSSA"`` fails there too)
CASE_INSENSITIVE_INITS = ("gaussian", "olora", "mica")
BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class LoraRuntimeConfig:
    """Runtime-only options of a LoRA adapter (the reference's class; never saved in ``adapter_config.json``).

    Args:
        ephemeral_gpu_offload: in the reference, copy CPU-offloaded data to the GPU for DoRA's initialisation. A speed
            hint only: peftkit accepts it and computes in place (the result is the same).
    """

    ephemeral_gpu_offload: bool = False


@dataclass
class LoraConfig(PeftConfig):
    """Configuration of a LoRA adapter (field names and defaults of the reference's ``LoraConfig``).

    The update of a targeted weight ``W: (out, in)`` is ``ΔW = scaling · B @ A`` with ``A: (r, in)``,
    ``B: (out, r)`` and ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).
    ``rank_pattern`` / ``alpha_pattern`` override ``r`` / ``lora_alpha`` for modules whose name matches
    ``(.*\\.)?(<key>)$``.

    ``fan_in_fan_out`` need not be set: peftkit detects GPT-2 ``Conv1D`` (weights stored ``(in, out)``) per layer and
    never rewrites this field.
    """

    r: int = 8
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] | None = field(default_factory=dict)
    alpha_pattern: dict[str, float] | None = field(default_factory=dict)
    megatron_config: dict[str, Any] | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    loftq_config: dict[str, Any] | Any = field(default_factory=dict)
    eva_config: EvaConfig | dict[str, Any] | None = None
    corda_config: CordaConfig | dict[str, Any] | None = None
    lora_ga_config: LoraGAConfig | dict[str, Any] | None = None
    use_dora: bool = False
    velora_config: VeloraConfig | dict[str, Any] | None = None
    monteclora_config: MontecloraConfig | dict[str, Any] | None = None
    arrow_config: ArrowConfig | dict[str, Any] | None = None
    kasa_config: KasaConfig | dict[str, Any] | None = None
    use_bdlora: BdLoraConfig | dict[str, Any] | bool | None = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    layer_replication: list[tuple[int, int]] | None = None
    runtime_config: LoraRuntimeConfig = field(default_factory=LoraRuntimeConfig)
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LORA
        self.target_modules = as_set(self.target_modules)
        self.exclude_modules = as_set(self.exclude_modules)
        if self.rank_pattern is None:
            self.rank_pattern = {}
        if self.alpha_pattern is None:
            self.alpha_pattern = {}
        if not isinstance(self.runtime_config, LoraRuntimeConfig):
            raise ConfigTypeError("runtime_config", self.runtime_config, "allowed: a LoraRuntimeConfig")
        self._validate_lora()
        _init_subconfigs(self)
        _warn_rslora_patterns_with_weight_init(self)
        _warn_ignored_init_configs(self)
        #: ``{module type: custom LoRA layer class}`` from :meth:`_register_custom_module`; not a field, so never
        #: serialised (as the reference)
        self._custom_modules: dict[type, Callable[..., Any]] | None = None

    def _register_custom_module(self, mapping: dict[type, Callable[..., Any]]) -> None:
        """Experimental API (the reference's): LoRA layers for module types peftkit has none for, or to override
        the built-in one. ``mapping`` maps a module type to a custom LoRA layer; a targeted module whose base layer
        is an instance of a key is wrapped by its value (checked before the built-in kinds; the first matching key
        wins). Mappings accumulate over calls (``dict.update``) and are not saved: register them again on the
        config passed to ``PeftModel.from_pretrained(..., config=...)``.

        The value is either a subclass of peftkit's ``LoraLayer`` (e.g. ``class MyLora(peftkit.methods.lora.layers.
        Linear)``), built as peftkit's layers are (``cls(base_layer, fan_in_fan_out=...)``, then ``update_layer``),
        or any other callable, called the reference's way ``cls(target, adapter_name, config=config, r=...,
        lora_alpha=..., target_name=...)``, which must return a peftkit ``LoraLayer`` holding ``adapter_name``."""
        if self._custom_modules is None:
            self._custom_modules = {}
        self._custom_modules.update(mapping)

    def copy(self, **changes: Any) -> Self:
        """As :meth:`PeftConfig.copy`; the copy keeps the custom module mapping (it is not a field)."""
        new = super().copy(**changes)
        if self._custom_modules is not None:
            new._custom_modules = dict(self._custom_modules)
        return new

    def _validate_lora(self) -> None:
        check(is_int(self.r) and self.r >= 1, "r", self.r, "allowed: an int >= 1")
        check(is_number(self.lora_alpha), "lora_alpha", self.lora_alpha, "allowed: a number")
        check(
            is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1,
            "lora_dropout",
            self.lora_dropout,
            "allowed: a float with 0 <= lora_dropout < 1",
        )
        check(self.bias in BIAS_CHOICES, "bias", self.bias, f"allowed: {list(BIAS_CHOICES)}")
        check(_init_ok(self.init_lora_weights), "init_lora_weights", self.init_lora_weights,
              f"allowed: {list(INIT_CHOICES)} or 'pissa_niter_<k>'")
        for name in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias", "ensure_weight_tying", "use_qalora"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "allowed: True or False")
        _check_modules_field("target_modules", self.target_modules)
        _check_modules_field("exclude_modules", self.exclude_modules)
        check(
            self.modules_to_save is None or (not isinstance(self.modules_to_save, str)
                                              and all(isinstance(m, str) for m in self.modules_to_save)),
            "modules_to_save", self.modules_to_save, "allowed: None or a list of module names",
        )
        self._validate_layers()
        _check_layer_replication(self.layer_replication)
        for key, rank in self.rank_pattern.items():
            check(is_int(rank) and rank >= 1, f"rank_pattern[{key!r}]", rank, "allowed: an int >= 1")
        for key, alpha in self.alpha_pattern.items():
            check(is_number(alpha), f"alpha_pattern[{key!r}]", alpha, "allowed: a number")
        check(not (self.lora_bias and self.init_lora_weights not in (True, False)), "lora_bias", self.lora_bias,
              f"lora_bias=True is only allowed with init_lora_weights True or False, not {self.init_lora_weights!r}")
        check(not (self.lora_bias and self.use_dora), "lora_bias", self.lora_bias,
              "lora_bias=True is not allowed together with use_dora=True")
        check(not isinstance(self.target_parameters, str), "target_parameters", self.target_parameters,
              "allowed: None or a list of parameter names (not a str)")
        check(not (self.init_lora_weights == "loftq" and not self.loftq_config), "loftq_config", self.loftq_config,
              "init_lora_weights='loftq' requires a loftq_config")
        if self.init_lora_weights == "loftq":  # a LoftQConfig becomes a dict (as the reference), defaults filled
            self.loftq_config = check_loftq_config(self.loftq_config)
        elif isinstance(self.loftq_config, LoftQConfig):  # ignored (warned below), but JSON-serialisable
            self.loftq_config = dict(vars(self.loftq_config))
        check(not (canonical_init(self.init_lora_weights) == "mica" and self.use_dora), "use_dora", self.use_dora,
              "init_lora_weights='mica' (a LoRA variant in the reference) cannot be combined with use_dora=True")
        _check_trainable_token_indices(self.trainable_token_indices)
        _check_alora(self)
        check_qalora(self)  # use_qalora / qalora_group_size (plain LoRA on the layers peftkit adapts)
        self.use_bdlora = as_bdlora_config(self.use_bdlora)  # a dict (loaded file) becomes a BdLoraConfig

    def _validate_layers(self) -> None:
        ltt = self.layers_to_transform
        check(ltt is None or is_int(ltt) or (isinstance(ltt, (list, tuple)) and all(is_int(i) for i in ltt)),
              "layers_to_transform", ltt, "allowed: None, an int or a list of ints")
        check(not (isinstance(self.target_modules, str) and ltt is not None), "layers_to_transform", ltt,
              "layers_to_transform cannot be used when target_modules is a str (regex or 'all-linear'); "
              "use a list of module names")
        # as the reference: an empty layers_pattern ([] or "") means none, and is allowed without layers_to_transform
        check(not (self.layers_pattern and ltt is None), "layers_pattern", self.layers_pattern,
              "layers_pattern is only allowed together with layers_to_transform")
        check(not (isinstance(self.target_modules, str) and self.layers_pattern is not None), "layers_pattern",
              self.layers_pattern, "layers_pattern cannot be used when target_modules is a str; use None")


def _init_subconfigs(config: LoraConfig) -> None:
    """As the reference: ``corda_config`` / ``lora_ga_config`` given as dicts (a loaded ``adapter_config.json``)
    become their dataclasses; ``init_lora_weights="corda"`` without a ``corda_config`` gets the default one (warned)."""
    config.corda_config = as_corda_config(config.corda_config)  # type: ignore[assignment]
    config.arrow_config = as_arrow_config(config.arrow_config)  # type: ignore[assignment]
    config.kasa_config = as_subconfig("kasa_config", config.kasa_config, KasaConfig)  # type: ignore[assignment]
    config.velora_config = as_subconfig("velora_config", config.velora_config, VeloraConfig)  # type: ignore[assignment]
    config.lora_ga_config = as_lora_ga_config(config.lora_ga_config)  # type: ignore[assignment]
    config.monteclora_config = as_monteclora_config(config.monteclora_config)  # type: ignore[assignment]
    config.eva_config = eva_subconfig(config.eva_config, config.init_lora_weights)  # type: ignore[assignment]
    if config.init_lora_weights == "corda" and config.corda_config is None:
        warnings.warn("init_lora_weights='corda' but corda_config is not given; using the default CordaConfig()",
                      PeftWarning, stacklevel=4)
        config.corda_config = CordaConfig()  # type: ignore[assignment]


def _check_alora(config: LoraConfig) -> None:
    """``alora_invocation_tokens``: None or a non-empty list of token ids; outside CAUSAL_LM it warns, as the
    reference (aLoRA is meant for causal LMs)."""
    tokens = config.alora_invocation_tokens
    if tokens is None:
        return
    check(isinstance(tokens, (list, tuple)) and len(tokens) > 0 and all(is_int(t) and t >= 0 for t in tokens),
          "alora_invocation_tokens", tokens, "allowed: None or a non-empty list of token ids (ints >= 0)")
    if str(config.task_type) != "CAUSAL_LM":
        warnings.warn("aLoRA is currently only supported for CAUSAL_LM task.", PeftWarning, stacklevel=5)

def _warn_rslora_patterns_with_weight_init(config: LoraConfig) -> None:
    """As the reference's ``LoraConfig.__post_init__``: PiSSA/OLoRA (and CorDA/LoRA-GA) with rsLoRA and a rank or
    alpha pattern cannot be converted back to plain LoRA by ``save_pretrained(path_initial_model_for_weight_
    conversion=...)``; this is only known at save time, so warn now."""
    init = config.init_lora_weights
    weight_init = isinstance(init, str) and (init.lower().startswith("pissa") or init.lower() in (
        "olora", "corda", "lora_ga"))
    if weight_init and config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        warnings.warn(
            f"init_lora_weights={init!r} with use_rslora=True and rank_pattern/alpha_pattern: save_pretrained("
            "path_initial_model_for_weight_conversion=...) cannot convert this adapter to plain LoRA (restoring the "
            "initial base weights). If you intend to convert it, do not combine use_rslora with "
            "rank_pattern/alpha_pattern.", PeftWarning, stacklevel=4)


def _warn_ignored_init_configs(config: LoraConfig) -> None:
    """As the reference: ``loftq_config`` / ``eva_config`` / ``corda_config`` given with another
    ``init_lora_weights`` are ignored, which is worth a warning (the user meant that initialisation)."""
    init = canonical_init(config.init_lora_weights)
    for field_name, wanted in (("loftq_config", "loftq"), ("eva_config", "eva"), ("corda_config", "corda")):
        if getattr(config, field_name) and init != wanted:
            warnings.warn(f"{field_name} is given but ignored because init_lora_weights={config.init_lora_weights!r}"
                          f" (it applies with init_lora_weights={wanted!r})", PeftWarning, stacklevel=4)


def canonical_init(value: object) -> object:
    """``init_lora_weights`` as peftkit's tables spell it: ``"OLoRA"`` -> ``"olora"`` (the names of
    :data:`CASE_INSENSITIVE_INITS` in lower case); other values unchanged. The config keeps the user's spelling."""
    if isinstance(value, str) and value.lower() in CASE_INSENSITIVE_INITS:
        return value.lower()
    return value


def _init_ok(value: object) -> bool:
    if isinstance(value, bool):
        return True
    value = canonical_init(value)
    return isinstance(value, str) and (value in INIT_CHOICES or re.fullmatch(r"pissa_niter_\d+", value) is not None)


def _check_layer_replication(value: object) -> None:
    """``layer_replication``: None, or ``[[start, end], ...]`` ranges of layer indices with ``0 <= start < end``
    (``[]`` replicates nothing, as in the reference). Whether ``end`` fits the model is checked at injection."""
    if value is None:
        return
    allowed = "allowed: None or a list of [start, end) pairs of layer indices with 0 <= start < end, e.g. [[0, 4], [2, 5]]"
    check(isinstance(value, (list, tuple)) and all(isinstance(pair, (list, tuple)) and len(pair) == 2
                                                   for pair in value), "layer_replication", value, allowed)
    if not all(is_int(index) for pair in value for index in pair):  # type: ignore[union-attr]
        raise ConfigTypeError("layer_replication", value, allowed)
    check(all(0 <= start < end for start, end in value), "layer_replication", value, allowed)  # type: ignore[union-attr]


def _check_trainable_token_indices(value: object) -> None:
    """``trainable_token_indices``: None, a list of token indices (rows of the input embedding), or a dict of module
    name -> such a list (as the reference).

    Raises:
        ConfigTypeError: neither form, a key that is not a non-empty str, or indices that are not a list of ints.
        ConfigError: an empty, negative or repeated index list.
    """
    from ..trainable_tokens.config import check_token_indices  # lazy: that module imports this one

    name = "trainable_token_indices"
    if value is None:
        return
    if isinstance(value, dict):
        for key, indices in value.items():
            if not isinstance(key, str) or not key:
                raise ConfigTypeError(name, value, "allowed: a dict of module name (a non-empty str) -> list of "
                                      "token indices, e.g. {'embed_tokens': [128000, 128001]}")
            check_token_indices(f"{name}[{key!r}]", indices)
        return
    if not isinstance(value, (list, tuple)):
        raise ConfigTypeError(name, value, "allowed: None, a list of int token indices (rows of the input "
                              "embedding) or a dict of module name -> list of token indices")
    check_token_indices(name, value)


def _check_modules_field(name: str, value: object) -> None:
    ok = value is None or isinstance(value, str) or (
        isinstance(value, (set, list, tuple)) and all(isinstance(v, str) for v in value)
    )
    check(ok, name, value, "allowed: None, a regex str, 'all-linear' or a list of module names")
