"""``peftkit merge``, ``generate`` and ``predict``: load a saved adapter on its base model and use it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .common import TASK_NAMES, CliError, load_base_model, load_tokenizer, read_json, require_adapter_dir

#: files of a tokenizer saved with ``save_pretrained`` (copied beside a merged model)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "spiece.model", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


@dataclass
class Loaded:
    """A saved adapter loaded on its base model (frozen, eval mode)."""

    model: Any
    config: Any
    base_ref: str
    labels: list[str]
    directory: Path


def _labels(directory: Path) -> list[str]:
    log = directory / "training_log.json"
    return list(read_json(log).get("labels") or []) if log.is_file() else []


def load_adapter(directory: str, model: str | None = None, dtype: torch.dtype | None = None) -> Loaded:
    """The adapter in ``directory`` on its base model (``base_model_name_or_path``, or ``model`` when given).

    Class labels recorded by ``peftkit train`` (``training_log.json``) size the classification head.
    """
    from ..config import PeftConfig
    from ..peft_model import PeftModel

    path = require_adapter_dir(directory)
    config = PeftConfig.from_pretrained(str(path))
    base_ref = model or config.base_model_name_or_path
    if not base_ref:
        raise CliError(f"the adapter in {directory!r} names no base model; pass --model <dir or hub id>")
    labels = _labels(path)
    kwargs: dict[str, Any] = {}
    if labels:
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={name: i for i, name in enumerate(labels)})
    if dtype is not None:
        kwargs["dtype"] = dtype
    task = str(config.task_type) if config.task_type is not None else None
    base = load_base_model(base_ref, task, auto_mapping=config.auto_mapping, **kwargs)
    peft_model = PeftModel.from_pretrained(base, str(path))
    peft_model.eval()
    return Loaded(peft_model, config, base_ref, labels, path)


def tokenizer_for(loaded: Loaded) -> Any:
    """The tokenizer saved beside the adapter, else the base model's."""
    return load_tokenizer(str(loaded.directory), loaded.base_ref)


# ---------------------------------------------------------------------------------------------------- merge
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def merge(directory: str, output: str, dtype: str | None, model: str | None, echo: Any = print) -> Path:
    """Write the base model with the adapter merged into ``output`` (transformers ``save_pretrained`` layout),
    plus the tokenizer. Returns the output path."""
    from ..registry import get_method

    require_adapter_dir(directory)
    config = read_json(Path(directory) / "adapter_config.json")
    spec = get_method(config.get("peft_type", "?"))
    if not spec.mergeable or spec.kind != "adapter":
        raise CliError(f"{config.get('peft_type')} adapters cannot be merged into the base weights "
                       "(only methods that change weights can); use the adapter with AutoPeftModel instead")
    if dtype is not None and dtype not in DTYPES:
        raise CliError(f"--dtype {dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    loaded = load_adapter(directory, model)
    merged = loaded.model.merge_and_unload(progressbar=True)
    if dtype is not None:
        merged = merged.to(DTYPES[dtype])
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    _copy_tokenizer(loaded, out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    echo(f"merged {loaded.config.peft_type} adapter into {loaded.base_ref}; wrote {out} ({size:,d} bytes of weights)")
    return out


def _copy_tokenizer(loaded: Loaded, out: Path) -> None:
    sources = [loaded.directory, Path(loaded.base_ref)]
    for source in sources:
        files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
        if files:
            for f in files:
                shutil.copy2(f, out / f.name)
            return


# ---------------------------------------------------------------------------------------------------- generate
def generate(directory: str, prompts: list[str], max_new_tokens: int, model: str | None,
             echo: Any = print) -> list[str]:
    """Greedy continuations of ``prompts`` by the adapted causal or seq2seq model; printed and returned."""
    loaded = load_adapter(directory, model)
    task = str(loaded.config.task_type)
    if task not in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
        raise CliError(f"generate needs a causal-lm or seq2seq-lm adapter; this one is "
                       f"{TASK_NAMES.get(task, task)} (use predict)")
    tokenizer = tokenizer_for(loaded)
    outputs = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = loaded.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
        new = ids[0, enc["input_ids"].shape[1]:] if task == "CAUSAL_LM" else ids[0]
        text = tokenizer.decode(new, skip_special_tokens=True)
        outputs.append(text)
        echo(f"{prompt}{text}" if task == "CAUSAL_LM" else text)
    return outputs


# ---------------------------------------------------------------------------------------------------- predict
def predict(directory: str, texts: list[str], model: str | None, echo: Any = print) -> list[dict[str, Any]]:
    """Class (seq-cls) or per-word classes (token-cls) with probabilities; printed and returned."""
    loaded = load_adapter(directory, model)
    task = str(loaded.config.task_type)
    if task not in ("SEQ_CLS", "TOKEN_CLS"):
        raise CliError(f"predict needs a seq-cls or token-cls adapter; this one is {TASK_NAMES.get(task, task)}"
                       + (" (use generate)" if task in ("CAUSAL_LM", "SEQ_2_SEQ_LM") else ""))
    tokenizer = tokenizer_for(loaded)
    names = loaded.labels or [loaded.model.config.id2label[i] for i in range(loaded.model.config.num_labels)]
    results = []
    for text in texts:
        enc = tokenizer(text, return_tensors="pt", truncation=True)
        with torch.no_grad():
            probs = loaded.model(**enc).logits.softmax(-1)[0]
        if task == "SEQ_CLS":
            p, i = probs.max(-1)
            results.append({"text": text, "label": names[int(i)], "probability": float(p)})
            echo(f"{names[int(i)]}\t{float(p):.3f}\t{text}")
        else:
            words = _token_labels(tokenizer, enc, probs[-enc["input_ids"].shape[1]:], names)
            results.append({"text": text, "tokens": words})
            echo(" ".join(f"{w['token']}/{w['label']}" for w in words))
    return results


def _token_labels(tokenizer: Any, enc: Any, probs: torch.Tensor, names: list[str]) -> list[dict[str, Any]]:
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    special = set(tokenizer.all_special_tokens)
    out = []
    for token, row in zip(tokens, probs):
        if token in special:
            continue
        p, i = row.max(-1)
        out.append({"token": token, "label": names[int(i)], "probability": float(p)})
    return out
