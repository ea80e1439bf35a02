"""``AutoPeftModel*``: load the base model named in an adapter's config, then the adapter."""

from __future__ import annotations

import importlib
import os
from typing import Any

from .config import PeftConfig
from .errors import AdapterLoadError, ConfigError
from .fileio import resolve_file
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

#: libraries whose classes ``AutoPeftModel`` may import from ``auto_mapping`` (as the reference allows)
DEFAULT_IMPORT_ALLOWLIST = ("diffusers", "lerobot", "megatron-core", "transformers")


class _BaseAutoPeftModel:
    _target_class: str | None = None  # name of the transformers Auto class
    _target_peft_class: type[PeftModel] = PeftModel
    _task_type: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(
            f"{type(self).__name__} is designed to be instantiated using "
            f"`{type(self).__name__}.from_pretrained(pretrained_model_name_or_path)`"
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        import_allowlist: list[str] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Read the adapter config, load its ``base_model_name_or_path`` (at ``revision``), resize the embeddings
        when a tokenizer with more tokens is saved beside the adapter, then load the adapter.

        The base class: without ``task_type``, the one in ``auto_mapping`` (as the reference); with one, the task's
        transformers Auto class. ``AutoPeftModel`` on an adapter with a ``task_type`` returns that task's class
        (e.g. ``PeftModelForCausalLM``) where the reference raises ``ValueError``; a task class on another task's
        adapter raises ``ConfigError`` (a ``ValueError``, as the reference)."""
        hub = {k: kwargs[k] for k in ("subfolder", "cache_dir", "token", "local_files_only") if k in kwargs}
        if revision is not None:
            hub["revision"] = revision  # the adapter's revision; the base model's is peft_config.revision
        peft_config = config or PeftConfig.from_pretrained(pretrained_model_name_or_path, **hub)
        base_path = peft_config.base_model_name_or_path
        if not base_path:
            raise AdapterLoadError(
                f"the adapter config in {str(pretrained_model_name_or_path)!r} has no base_model_name_or_path; "
                "load the base model yourself and use PeftModel.from_pretrained(model, path)"
            )
        task = peft_config.task_type
        if cls._task_type is not None and task is not None and str(task) != cls._task_type:
            raise ConfigError("task_type", str(peft_config.task_type),
                              f"{cls.__name__} loads adapters with task_type {cls._task_type!r}")
        model_kwargs = {k: v for k, v in kwargs.items() if k not in ("subfolder", "adapter_name")}
        base_cls = cls._base_class(peft_config, import_allowlist)
        base_cls = _pick_auto_class(base_cls, peft_config, model_kwargs)
        base_model = base_cls.from_pretrained(base_path, revision=peft_config.revision, **model_kwargs)
        _maybe_resize(base_model, pretrained_model_name_or_path, hub)
        peft_cls = cls._target_peft_class
        return peft_cls.from_pretrained(base_model, pretrained_model_name_or_path, adapter_name=adapter_name,
                                        is_trainable=is_trainable, config=peft_config, **hub)

    @classmethod
    def _base_class(cls, peft_config: PeftConfig, import_allowlist: list[str] | None) -> Any:
        import transformers

        mapping = peft_config.auto_mapping
        if peft_config.task_type is not None:
            return getattr(transformers, cls._target_class or TASK_TO_AUTO_CLASS[str(peft_config.task_type)])
        if not mapping:
            raise AdapterLoadError("the adapter config has neither task_type nor auto_mapping, so the base class is "
                                   "unknown; load the base yourself and use PeftModel.from_pretrained")
        library = mapping["parent_library"]
        allowed = import_allowlist or DEFAULT_IMPORT_ALLOWLIST
        if library.split(".")[0].replace("_", "-") not in allowed:
            raise ConfigError("auto_mapping.parent_library", library, f"allowed libraries: {list(allowed)}")
        return getattr(importlib.import_module(library), mapping["base_model_class"])


#: transformers Auto classes tried, in order, when the task's usual class does not know the base model's config
#: (Whisper is a SEQ_2_SEQ_LM model that only ``AutoModelForSpeechSeq2Seq`` builds; ViT is a SEQ_CLS-style classifier)
TASK_ALTERNATIVE_AUTO_CLASSES = {
    "AutoModelForSeq2SeqLM": ("AutoModelForSpeechSeq2Seq",),
    "AutoModelForSequenceClassification": ("AutoModelForImageClassification", "AutoModelForAudioClassification"),
}


def _pick_auto_class(base_cls: Any, peft_config: PeftConfig, model_kwargs: dict[str, Any]) -> Any:
    """``base_cls``, or the first alternative Auto class that knows the base model's config type.

    Only transformers Auto classes with alternatives read the base ``config.json`` (local, Hub or cache)."""
    alternatives = TASK_ALTERNATIVE_AUTO_CLASSES.get(getattr(base_cls, "__name__", ""), ())
    if not alternatives:
        return base_cls
    import transformers

    hub = {k: model_kwargs[k] for k in ("cache_dir", "token", "local_files_only", "trust_remote_code")
           if k in model_kwargs}
    base_config = transformers.AutoConfig.from_pretrained(
        peft_config.base_model_name_or_path, revision=peft_config.revision, **hub
    )
    for candidate in (base_cls.__name__, *alternatives):
        auto_cls = getattr(transformers, candidate)
        if type(base_config) in auto_cls._model_mapping:
            return auto_cls
    return base_cls  # transformers raises its own error naming the config class


TASK_TO_AUTO_CLASS = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def _maybe_resize(model: Any, path: str | os.PathLike[str], hub: dict[str, Any]) -> None:
    hub = dict(hub)
    subfolder = hub.pop("subfolder", None)
    if resolve_file(path, "tokenizer_config.json", subfolder, **hub) is None:
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, subfolder=subfolder or "", **hub)
    emb = model.get_input_embeddings()
    if emb is not None and len(tokenizer) > emb.weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


def _auto(name: str, target: str | None, peft_cls: type[PeftModel], task: str | None) -> type[_BaseAutoPeftModel]:
    return type(name, (_BaseAutoPeftModel,), {
        "_target_class": target, "_target_peft_class": peft_cls, "_task_type": task, "__module__": __name__,
        "__doc__": f"Loads a base model with transformers.{target or 'the class in auto_mapping'} plus an adapter.",
    })


AutoPeftModel = _auto("AutoPeftModel", None, PeftModel, None)
AutoPeftModelForCausalLM = _auto("AutoPeftModelForCausalLM", "AutoModelForCausalLM", PeftModelForCausalLM,
                                 "CAUSAL_LM")
AutoPeftModelForSeq2SeqLM = _auto("AutoPeftModelForSeq2SeqLM", "AutoModelForSeq2SeqLM", PeftModelForSeq2SeqLM,
                                  "SEQ_2_SEQ_LM")
AutoPeftModelForSequenceClassification = _auto(
    "AutoPeftModelForSequenceClassification", "AutoModelForSequenceClassification",
    PeftModelForSequenceClassification, "SEQ_CLS")
AutoPeftModelForTokenClassification = _auto(
    "AutoPeftModelForTokenClassification", "AutoModelForTokenClassification", PeftModelForTokenClassification,
    "TOKEN_CLS")
AutoPeftModelForQuestionAnswering = _auto(
    "AutoPeftModelForQuestionAnswering", "AutoModelForQuestionAnswering", PeftModelForQuestionAnswering,
    "QUESTION_ANS")
AutoPeftModelForFeatureExtraction = _auto(
    "AutoPeftModelForFeatureExtraction", "AutoModel", PeftModelForFeatureExtraction, "FEATURE_EXTRACTION")
