"""``ensure_weight_tying=True`` with LoRA on tied input/output embeddings (``tie_word_embeddings=True``).

As the reference (``BaseTuner._check_tied_modules``, ``LoraModel._add_targets_to_tie``): when ``target_modules``
selects the input embedding or a module sharing its weight (the output head, ``lm_head``), the LoRA adapter goes on
the INPUT embedding (its name is added to ``target_modules``, the tied modules' entries are removed: the stored
config records that, as the reference writes it), and every tied module gets a LoRA linear update whose factors are
the embedding's, transposed: ``lora_A = lora_embedding_B.T: (r, dim)``, ``lora_B = lora_embedding_A.T:
(vocab, r)``, so both layers apply the same ``ΔW = scaling * (B_e @ A_e).T: (vocab, dim)`` to the shared weight.

The reference builds the head's factors as second ``nn.Parameter`` objects viewing the embedding's storage: they are
counted twice as trainable, get their own gradients (an optimizer steps the shared storage twice, with two Adam
states), and ``merge`` adds ``ΔW`` to the shared weight twice. peftkit's :class:`TiedLinear` holds no tensors for a
tied adapter: its ``lora_A`` / ``lora_B`` entries are :class:`TiedFactor` modules whose ``weight`` is a fresh
transposed view of the embedding's parameter, so there is one parameter, one gradient, and merging adds ``ΔW`` once
(through the embedding). Files keep the reference's keys: the head's ``lora_A.weight`` / ``lora_B.weight`` are
written from the embedding's tensors (:func:`export_tied_keys`) and, when loading, checked against them and dropped
(:func:`convert_checkpoint`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...config import PeftConfig
from ...errors import AdapterLoadError, ConfigError, PeftWarning
from ...injection.apply import AppliedPlan, is_probing, set_submodule, skip_random_init
from ...injection.match import matches, pattern_value
from ...injection.plan import candidate_modules
from ...module_utils import add_child, new_module
from ...ops.batched import stack_adapters
from ..trainable_tokens import _input_embedding_name as input_embedding_name
from ..trainable_tokens import _ties_embeddings as ties_embeddings
from .init import init_conv_or_linear_, uses_base_weight
from .layers import Embedding, Linear, _compiling
from .moe import convert_moe_targets, convert_v4_checkpoint

#: the module names the reference recognises as embeddings (``peft.utils.constants.EMBEDDING_LAYER_NAMES``)
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
FIELD = "ensure_weight_tying"
WRAPPER_PREFIX = "base_model.model."


class TiedFactor(nn.Module):
    """``lora_A`` (``which="A"``) or ``lora_B`` (``"B"``) of a tied adapter: no tensor of its own; ``weight`` is the
    embedding layer's ``lora_embedding_B[name].T: (r, dim)`` (A) or ``lora_embedding_A[name].T: (vocab, r)`` (B), a
    fresh view on every read, so autograd, ``requires_grad`` and in-place updates are the embedding parameter's."""

    bias = None  # a tied factor never has a bias (lora_bias is refused with tying)

    def __init__(self, source: Embedding, adapter_name: str, which: str) -> None:
        super().__init__()
        # kept out of nn.Module's registries: the embedding layer is not a child (no second path, no duplicate keys)
        self.__dict__.update(_source=source, _adapter=adapter_name, _which=which)

    @property
    def weight(self) -> torch.Tensor:
        """``(r, dim)`` for A, ``(vocab, r)`` for B: a transposed view of the embedding's factor."""
        source: Embedding = self.__dict__["_source"]
        holder = source.lora_embedding_B if self.__dict__["_which"] == "A" else source.lora_embedding_A
        return holder[self.__dict__["_adapter"]].t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (..., in) -> (..., out)``: ``x @ weight.T``."""
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"tied to the input embedding's lora_embedding_{'B' if self.__dict__['_which'] == 'A' else 'A'}.T"


class TiedLinear(Linear):
    """LoRA on a linear layer sharing its weight with the input embedding (``lm_head``). Adapters added with
    :meth:`update_tied` follow the embedding's LoRA factors (:class:`TiedFactor`); others are ordinary LoRA adapters.

    Forward of a tied adapter: ``base(x) + scaling * dropout(x) @ B_e @ A_e`` (``x: (..., dim) -> (..., vocab)``),
    through the general (not the cached no-grad / fused) path, which reads the factors' ``weight``. While the
    embedding layer has the adapter merged, the shared weight already holds the update and this layer adds nothing.
    """

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, fan_in_fan_out=fan_in_fan_out)
        self.__dict__["_tied"] = {}  # adapter name -> the Embedding LoRA layer whose factors it uses

    @property
    def tied_adapters(self) -> dict[str, Embedding]:
        """``{adapter name: embedding layer}`` of the adapters that follow the input embedding's factors."""
        return self.__dict__["_tied"]

    def update_tied(self, adapter_name: str, source: Embedding, lora_dropout: float = 0.0) -> None:
        """Add ``adapter_name`` as the embedding layer ``source``'s factors, transposed, with its rank and scaling."""
        self.__dict__["_tied"][adapter_name] = source
        self.r[adapter_name] = source.r[adapter_name]
        self.lora_alpha[adapter_name] = source.lora_alpha[adapter_name]
        self.use_rslora[adapter_name] = source.use_rslora[adapter_name]
        self.lora_bias[adapter_name] = False
        self.scaling[adapter_name] = source.scaling[adapter_name]
        add_child(self.lora_dropout, adapter_name,
                  nn.Dropout(p=lora_dropout) if lora_dropout > 0 else new_module(nn.Identity))
        add_child(self.lora_A, adapter_name, TiedFactor(source, adapter_name, "A"))
        add_child(self.lora_B, adapter_name, TiedFactor(source, adapter_name, "B"))
        self._refresh()

    def _live(self) -> tuple[str, ...]:
        """The adapters the forward adds, in activation order: the forward adapters of :meth:`_refresh` (active,
        held, not merged here), except that a tied adapter counts as merged exactly while the embedding layer has
        it merged (the shared weight then holds its update, whichever layer asked for the merge)."""
        tied, forward = self.__dict__["_tied"], self._forward_adapters
        return tuple(n for n in self._active_adapter
                     if (n in tied and n not in tied[n].merged_adapters) or (n not in tied and n in forward))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in) -> (..., out)``; without a tied adapter in use, :meth:`Linear.forward` (its fast paths).
        A tied adapter's scaling is the embedding layer's (``set_scale`` / hot-swaps change it there)."""
        tied = self.__dict__["_tied"]
        for name, source in tied.items():
            self.scaling[name] = source.scaling[name]
        names = self._live() if tied else self._forward_adapters
        if not tied or self._disable_adapters or self._row_adapters is not None or (
                names == self._forward_adapters and not any(n in tied for n in names)):
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if not _compiling():
            return self._add_adapters(x, result, names)
        base_out = result
        for name in names:  # the plain formula, which dynamo traces
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            hidden = lora_A(self.lora_dropout[name](self._cast_input_dtype(x, lora_A.weight.dtype)))  # (..., r)
            result = (result + lora_B(hidden) * self.scaling[name]).to(base_out.dtype)
        return result

    def _stacks(self, names: tuple[str, ...], As: list[torch.Tensor], Bs: list[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`LoraLayer._stacks`, never cached when a tied adapter takes part (its factors are fresh views:
        their ids say nothing about the tensors they view)."""
        if any(n in self.__dict__["_tied"] for n in names):
            return stack_adapters(As, Bs, [self.scaling[n] for n in names])
        return super()._stacks(names, As, Bs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """As :meth:`LoraLayer.merge`; a tied adapter's update is merged once, by the embedding layer (merged here
        if it has not merged it yet): the two layers share one weight."""
        tied = self.__dict__["_tied"]
        for name in self._adapters_to_merge(adapter_names):
            source = tied.get(name)
            if source is None:
                super().merge(safe_merge, [name])
                continue
            if name not in source.merged_adapters:
                source.merge(safe_merge, [name])
            self.merged_adapters.append(name)
            self._refresh()

    def unmerge(self) -> None:
        """As :meth:`LoraLayer.unmerge`; a tied adapter still merged by the embedding layer is unmerged there
        (once)."""
        tied = self.__dict__["_tied"]
        for name in [n for n in reversed(self.merged_adapters) if n in tied]:
            self.merged_adapters.remove(name)
            source = tied[name]
            if name in source.merged_adapters:
                _unmerge_one(source, name)
        super().unmerge()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.__dict__["_tied"].pop(adapter_name, None)


def _unmerge_one(layer: Embedding, name: str) -> None:
    """Subtract the merged (additive) adapter ``name`` of ``layer`` from its base weight."""
    base = layer.get_base_layer()
    with torch.no_grad():
        base.weight.data.sub_(layer.get_delta_weight(name).to(base.weight.dtype))
    layer.merged_adapters.remove(name)
    layer._refresh()


# ------------------------------------------------------------------------------------------------ planning


def _tied_names(model: nn.Module) -> list[str]:
    """Names of the linear modules sharing the input embedding's weight when the model ties its embeddings."""
    from .tokens import _tied_module_names  # tokens imports this module

    return _tied_module_names(model, list(candidate_modules(model)))


def _embedding_to_save(config: PeftConfig, model: nn.Module) -> bool:
    """Whether the ``modules_to_save`` flavour of tying applies: an entry named like an embedding (the reference's
    test), or one selecting the input embedding or a tied module (peftkit's :func:`.tokens.tie_saved_copies`)."""
    saved = getattr(config, "modules_to_save", None) or []
    if any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in saved):
        return True
    names = [input_embedding_name(model), *_tied_names(model)]
    return bool(saved) and any(n and matches(saved, n) for n in names)


def reference_detects(targets: object) -> bool:
    """Whether the reference sees an embedding in ``target_modules`` (``_check_tied_modules``): a regex full-matching
    ``embed_tokens`` or ``lm_head``, or an entry whose last segment is one of them."""
    if isinstance(targets, str):
        return any(re.fullmatch(targets, name) for name in EMBEDDING_LAYER_NAMES)
    return any(str(m).split(".")[-1] in EMBEDDING_LAYER_NAMES for m in targets or ())


def tying_applies(config: PeftConfig, model: nn.Module) -> list[str]:
    """The tied module names whose LoRA layers follow the input embedding's for ``config`` on ``model``; [] when
    LoRA tying does not apply (``ensure_weight_tying=False``, an untied model, the ``modules_to_save`` flavour, or
    no tied module selected). Selected: by the reference's name rule or by ``target_modules`` matching the input
    embedding or a tied module."""
    if not getattr(config, FIELD, False) or not ties_embeddings(model) or _embedding_to_save(config, model):
        return []
    tied = _tied_names(model)
    embedding = input_embedding_name(model)
    targets = getattr(config, "target_modules", None)
    if not tied or embedding is None or targets is None:
        return []
    if reference_detects(targets) or any(matches(targets, name) for name in (embedding, *tied)):
        return tied
    return []


def check_tied_targets(config: PeftConfig, model: nn.Module) -> None:
    """Refuse what tying LoRA layers does not support: DoRA, ``lora_bias``, PiSSA/OLoRA (they change or extend the
    one shared update per layer), and LoRA layers on tied modules beside the ``modules_to_save`` flavour of tying."""
    if not getattr(config, FIELD, False) or not ties_embeddings(model):
        return
    tied = _tied_names(model)
    embedding = input_embedding_name(model)
    targets = getattr(config, "target_modules", None)
    if _embedding_to_save(config, model):
        hits = [n for n in (embedding, *tied) if n and matches(targets, n)]
        if hits:
            raise ConfigError(FIELD, True, f"modules_to_save names an embedding, so the tied embeddings are tied as "
                              f"trainable copies, and target_modules also selects {hits}; the reference then "
                              "leaves those LoRA layers untied; allowed: the embeddings in modules_to_save or in "
                              "target_modules, not both")
        return
    if not tying_applies(config, model):
        return
    for name, bad, allowed in (("use_dora", getattr(config, "use_dora", False), "False"),
                               ("lora_bias", getattr(config, "lora_bias", False), "False"),
                               ("init_lora_weights", uses_base_weight(getattr(config, "init_lora_weights", True)),
                                "True, False or 'gaussian'")):
        if bad:
            raise ConfigError(name, getattr(config, name), f"ensure_weight_tying=True ties the LoRA layers of "
                              f"{[embedding, *tied]}, which share one update of the tied weight; peftkit does not "
                              f"implement that with {name}; allowed: {allowed}")


def resolve_config(config: PeftConfig, model: nn.Module) -> dict[str, Any]:
    """LoRA's ``MethodSpec.resolve_config``: the MoE conversion (:func:`.moe.convert_moe_targets`), then, when
    LoRA tying applies, ``target_modules`` as the reference rewrites it (``_add_targets_to_tie``): a list gets the
    input embedding's name added and the first entry matching each tied module removed; a regex ``t`` becomes
    ``(?:t|^<embedding>$)``."""
    fields = convert_moe_targets(config, model)
    resolved = config.copy(**fields) if fields else config
    tied = tying_applies(resolved, model)
    embedding = input_embedding_name(model)
    if not tied or embedding is None:
        return fields
    raw = resolved.target_modules  # type: ignore[attr-defined]
    if isinstance(raw, str):
        new: set[str] | str = rf"(?:{raw}|^{re.escape(embedding)}$)"
    else:
        new = set(raw) | {embedding}
        for key in tied:
            hit = next((m for m in new if _ref_match(m, key)), None)
            if hit is not None:
                new.discard(hit)
    if not reference_detects(new):
        warnings.warn(f"ensure_weight_tying=True: the stored target_modules {new!r} names the input embedding "
                      f"{embedding!r}, which 🤗 PEFT does not recognise as an embedding ({list(EMBEDDING_LAYER_NAMES)} "
                      f"only): it loads this adapter without the tied update of {tied}. peftkit ties them.",
                      PeftWarning, stacklevel=6)
    return {**fields, "target_modules": new}


def _ref_match(entry: str, key: str) -> bool:
    """The reference's ``re.match(rf"(^|.*\\.){entry}($|\\..*)", key)`` (``entry`` unescaped, as it does)."""
    try:
        return re.match(rf"(^|.*\.){entry}($|\..*)", key) is not None
    except re.error:
        return False


# ------------------------------------------------------------------------------------------------ injection


def bind_tied_layers(model: nn.Module, config: PeftConfig, adapter_name: str, applied: AppliedPlan) -> None:
    """After the planned layers: every tied module gets adapter ``adapter_name`` as a :class:`TiedLinear` following
    the input embedding's LoRA layer (a LoRA layer the plan put on it, e.g. selected by a regex, is replaced), and,
    for a new adapter, the embedding's factors get the reference's initial values (its head's ``lora_A`` init
    writes ``lora_embedding_B``: kaiming-uniform for ``True``, N(0, 1/r) for ``"gaussian"``; ``lora_embedding_A``
    stays 0)."""
    tied = tying_applies(config, model)
    if not tied:
        return
    embedding_name = input_embedding_name(model)
    source = model.get_submodule(embedding_name) if embedding_name else None
    if not (isinstance(source, Embedding) and source.has_adapter(adapter_name)):
        raise ConfigError(FIELD, True, f"the modules {tied} share the input embedding's weight, whose LoRA layer "
                          f"they follow, but the input embedding {embedding_name!r} holds no LoRA adapter "
                          f"{adapter_name!r} (excluded by exclude_modules or layers_to_transform?); allowed: "
                          "let the adapter reach the input embedding, or ensure_weight_tying=False")
    _check_same_update(config, embedding_name, tied, source, adapter_name)
    for name in tied:
        module = model.get_submodule(name)
        layer = _tied_layer(module, adapter_name)
        layer.update_tied(adapter_name, source, getattr(config, "lora_dropout", 0.0))
        layer.train(module.training)  # the new dropout follows the layer (an eval-mode model applies none)
        applied.touched.append(name)
        if layer is not module:
            set_submodule(model, name, layer)
            applied.replaced.setdefault(name, module)
    weight = source.lora_embedding_B[adapter_name]
    mode = getattr(config, "init_lora_weights", True)
    if mode is not False and not (is_probing() or weight.is_meta or skip_random_init()):
        head = model.get_submodule(tied[0])
        init_conv_or_linear_(head.lora_A[adapter_name], head.lora_B[adapter_name], mode, source.r[adapter_name])


def _tied_layer(module: nn.Module, adapter_name: str) -> TiedLinear:
    """The :class:`TiedLinear` to hold ``adapter_name`` at ``module``: ``module`` itself; a plain LoRA
    :class:`Linear` turned into one (its adapter ``adapter_name``, planned by a regex, dropped); or a new layer."""
    if isinstance(module, TiedLinear):
        if adapter_name in module.lora_A and adapter_name not in module.tied_adapters:
            module.delete_adapter(adapter_name)
        return module
    if type(module) is Linear:
        if adapter_name in module.lora_A:
            module.delete_adapter(adapter_name)
        module.__class__ = TiedLinear  # a subclass adding one dict: the other adapters are untouched
        module.__dict__["_tied"] = {}
        return module
    if isinstance(module, nn.Linear):
        return TiedLinear(module)
    raise ConfigError(FIELD, True, f"module sharing the input embedding's weight is a {type(module).__name__}; "
                      "peftkit ties LoRA layers to nn.Linear output heads only; allowed: ensure_weight_tying=False")


def _check_same_update(config: PeftConfig, embedding: str | None, tied: Sequence[str], source: Embedding,
                       adapter_name: str) -> None:
    """``rank_pattern`` / ``alpha_pattern`` must give the tied modules the embedding's rank and alpha: they share
    one update (the reference would give the head its own scaling and merge both)."""
    for name in tied:
        r = pattern_value(getattr(config, "rank_pattern", {}) or {}, name, getattr(config, "r", None))
        alpha = pattern_value(getattr(config, "alpha_pattern", {}) or {}, name, getattr(config, "lora_alpha", None))
        if (r, alpha) != (source.r[adapter_name], source.lora_alpha[adapter_name]):
            raise ConfigError(FIELD, True, f"rank_pattern/alpha_pattern give the tied module {name!r} r={r}, "
                              f"lora_alpha={alpha}, but the input embedding {embedding!r} has r="
                              f"{source.r[adapter_name]}, lora_alpha={source.lora_alpha[adapter_name]}; tied layers "
                              "share one update; allowed: the same rank and alpha for both")


# ------------------------------------------------------------------------------------------------ files


def _tied_pairs(model: nn.Module, adapter_name: str) -> list[tuple[str, str]]:
    """``(tied layer path, embedding layer path)`` (relative to ``model``) of the :class:`TiedLinear` layers holding
    ``adapter_name`` as a tied adapter."""
    paths: dict[int, str] = {}
    layers: list[tuple[str, TiedLinear]] = []
    for name, module in model.named_modules():  # one walk (it runs on every save and load)
        paths[id(module)] = name
        if isinstance(module, TiedLinear) and adapter_name in module.tied_adapters:
            layers.append((name, module))
    return [(name, paths[id(layer.tied_adapters[adapter_name])]) for name, layer in layers
            if id(layer.tied_adapters[adapter_name]) in paths]


def export_tied_keys(model: nn.Module, config: PeftConfig, adapter_name: str,
                     tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA's ``MethodSpec.export_state``: the tied layers' factors under the reference's keys
    (``lm_head.lora_A.weight = lora_embedding_B.T: (r, dim)``, ``lm_head.lora_B.weight = lora_embedding_A.T:
    (vocab, r)``), taken from the embedding's tensors being saved."""
    for path, source in _tied_pairs(model, adapter_name):
        for which, emb_key in (("lora_A", "lora_embedding_B"), ("lora_B", "lora_embedding_A")):
            value = tensors.get(f"{source}.{emb_key}")
            if value is not None:
                tensors[f"{path}.{which}.weight"] = value.t().contiguous()
    return tensors


def convert_checkpoint(model: nn.Module, state_dict: dict[str, torch.Tensor],
                       adapter_name: str) -> dict[str, torch.Tensor]:
    """LoRA's ``MethodSpec.convert_checkpoint``: :func:`.moe.convert_v4_checkpoint`, then the tied layers' keys
    (``lm_head.lora_A.weight`` / ``lora_B.weight``, written by the reference and by peftkit) dropped after checking
    that they equal the embedding's factors, transposed (a checkpoint holding only them gives the embedding's).

    Raises:
        AdapterLoadError: a tied layer's factor differs from the embedding's in the checkpoint.
    """
    state_dict = convert_v4_checkpoint(model, state_dict, adapter_name)
    pairs = _tied_pairs(model, adapter_name)
    if not pairs:
        return state_dict
    by_norm = {k.removeprefix(WRAPPER_PREFIX): k for k in state_dict}
    out = dict(state_dict)
    for path, source in pairs:
        path, source = path.removeprefix(WRAPPER_PREFIX), source.removeprefix(WRAPPER_PREFIX)
        for which, emb_key in (("lora_A", "lora_embedding_B"), ("lora_B", "lora_embedding_A")):
            key = by_norm.get(f"{path}.{which}.weight")
            if key is None:
                continue
            value = out.pop(key).t()
            own = by_norm.get(f"{source}.{emb_key}")
            if own is None:
                out[key[: len(key) - len(path) - len(which) - 8] + f"{source}.{emb_key}"] = value.contiguous()
            elif out[own].shape != value.shape or not torch.equal(out[own], value.to(out[own].dtype)):
                raise AdapterLoadError(f"checkpoint key {key!r} (tied to the input embedding by "
                                       f"ensure_weight_tying) differs from the transpose of {own!r}; the tied layers "
                                       "share one factor, so the file is inconsistent; save the adapter again")
        _drop_tied_base_weight(out, by_norm, path, source)
    return out


def _drop_tied_base_weight(state: dict[str, torch.Tensor], by_norm: dict[str, str], path: str, source: str) -> None:
    """The reference's ``save_embedding_layers`` also writes the head's ``base_layer.weight``, a copy of the tied
    embedding's: dropped when the checkpoint's embedding weight equals it (that one loads into the shared weight)."""
    head, emb = by_norm.get(f"{path}.base_layer.weight"), by_norm.get(f"{source}.base_layer.weight")
    if head is not None and emb is not None and head in state and emb in state and (
            state[head].shape == state[emb].shape and torch.equal(state[head], state[emb])):
        del state[head]
