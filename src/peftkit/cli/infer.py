"""``peftkit merge``, ``generate`` and ``predict``: load a saved adapter on its base model and use it."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import typer
from transformers import TextStreamer

from .common import (
    TASK_NAMES,
    CliError,
    load_base_model,
    load_tokenizer,
    read_json,
    require_adapter_dir,
    require_file,
)


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


def label_names(loaded: Loaded) -> list[str]:
    """Class names by id: those ``peftkit train`` recorded, else the model config's ``id2label``."""
    config = loaded.model.config
    return loaded.labels or [str(config.id2label[i]) for i in range(config.num_labels)]


def task_of(loaded: Loaded, allowed: tuple[str, ...], command: str, other: str) -> str:
    """The adapter's ``TaskType`` value; a :class:`CliError` naming ``other`` command when it is not ``allowed``."""
    task = str(loaded.config.task_type)
    if task not in allowed:
        names = " or ".join(TASK_NAMES.get(t, t) for t in allowed)
        raise CliError(f"{command} needs a {names} adapter; this one is {TASK_NAMES.get(task, task)} (use {other})")
    return task


def model_inputs(model: Any, encoding: Any) -> dict[str, torch.Tensor]:
    """The entries of a tokenizer ``encoding`` that the base model's ``forward`` names as parameters.

    A BERT-style tokenizer returns ``token_type_ids``, which a causal LM's ``forward`` (and ``generate``) rejects;
    inputs the model cannot take are dropped instead of failing.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    named = {n for n, p in inspect.signature(base.forward).parameters.items() if p.kind not in variadic}
    return {k: v for k, v in encoding.items() if k in named}


# ---------------------------------------------------------------------------------------------------- merge
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: decimal units, as ``transformers``' ``max_shard_size`` reads them
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_size(text: str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"40KB"`` / ``"1000"`` -> bytes; a :class:`CliError` for anything else."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise CliError(f"--max-shard-size {text!r} is not a size; use e.g. 5GB, 500MB, 40KB or a number of bytes")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def merge(directory: str, output: str, dtype: str | None = None, model: str | None = None,
          max_shard_size: str = "5GB", overwrite: bool = False, echo: Any = print) -> Path:
    """Write the base model with the adapter merged into ``output``: what ``transformers``' ``save_pretrained``
    writes (``config.json``, ``generation_config.json``, safetensors shards of at most ``max_shard_size`` with
    an index) plus the tokenizer, so ``AutoModelFor*.from_pretrained(output)`` and vLLM load it as a plain model.

    The directory is written whole into a sibling first and then put in place; a non-empty ``output`` is refused
    unless ``overwrite``. Returns the output path.
    """
    from ..registry import get_method

    require_adapter_dir(directory)
    config = read_json(Path(directory) / "adapter_config.json")
    spec = get_method(config.get("peft_type", "?"))
    if not spec.mergeable or spec.kind != "adapter":
        raise CliError(f"{config.get('peft_type')} adapters cannot be merged into the base weights "
                       "(only methods that change weights can); use the adapter with AutoPeftModel instead")
    if dtype is not None and dtype not in DTYPES:
        raise CliError(f"--dtype {dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    out = Path(output)
    if out.resolve() == Path(directory).resolve() or Path(directory).resolve().is_relative_to(out.resolve()):
        raise CliError(f"--output {str(out)!r} holds the adapter itself; choose another directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CliError(f"--output {str(out)!r} is not empty; choose a new directory or pass --overwrite")
    loaded = load_adapter(directory, model)
    merged = loaded.model.merge_and_unload()
    if dtype is not None:
        merged = merged.to(DTYPES[dtype])
    tokenizer = _plain_tokenizer(loaded)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        merged.save_pretrained(str(staging), max_shard_size=shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        _replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    shards = len(list(out.glob("*.safetensors")))
    echo(f"merged {loaded.config.peft_type} adapter into {loaded.base_ref}; wrote {out} ({size:,d} bytes of weights "
         f"in {shards} safetensors file{'s' if shards > 1 else ''})"
         + ("" if tokenizer is not None else "; no tokenizer found: copy one beside the model"))
    return out


def _plain_tokenizer(loaded: Loaded) -> Any | None:
    """The tokenizer saved beside the adapter, else the base model's, as saved (no pad token added)."""
    from transformers import AutoTokenizer

    for ref in (str(loaded.directory), loaded.base_ref):
        try:
            return AutoTokenizer.from_pretrained(ref)
        except (OSError, ValueError):
            continue
    return None


def _replace_dir(new: Path, target: Path) -> None:
    """Put directory ``new`` at ``target``; an existing ``target`` is moved aside first and deleted after."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    new.rename(target)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


# ---------------------------------------------------------------------------------------------------- generate
@dataclass(frozen=True)
class Sampling:
    """Decoding options of ``generate`` and ``chat``, validated on creation (a :class:`CliError` naming the flag).

    Greedy decoding unless ``do_sample``; ``temperature``/``top_p``/``top_k`` apply only when sampling
    (``top_k=0`` turns top-k filtering off); ``seed`` makes a sampled run repeatable.
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise CliError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        checks = (("--temperature", self.temperature, lambda v: v > 0, "> 0"),
                  ("--top-p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
                  ("--top-k", self.top_k, lambda v: v >= 0, ">= 0 (0 turns it off)"),
                  ("--repetition-penalty", self.repetition_penalty, lambda v: v > 0, "> 0 (1 is no penalty)"))
        for flag, value, ok, allowed in checks:
            if value is not None and not ok(value):
                raise CliError(f"{flag} must be {allowed}, got {value}")
        for flag, value, _, _ in checks[:3]:
            if value is not None and not self.do_sample:
                raise CliError(f"{flag} only applies with --do-sample (greedy decoding ignores it)")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``model.generate``."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        optional = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                    "repetition_penalty": self.repetition_penalty}
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        return kwargs


class StreamPrinter(TextStreamer):
    """Prints generated text as it comes (``transformers.TextStreamer``), through ``typer.echo``, with a newline
    only at the end; the prompt is not repeated."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        typer.echo(text, nl=stream_end)


def read_prompts(path: str) -> list[str]:
    """Prompts from a file: ``.jsonl`` (each line a JSON string or an object with a ``prompt`` or ``text`` field)
    or plain text (one prompt per line); blank lines are skipped."""
    p = require_file(path, "prompts")
    lines = [(n, line.rstrip("\r\n")) for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        prompts = [_json_prompt(p.name, n, line) for n, line in lines]
    else:
        prompts = [line for _, line in lines]
    if not prompts:
        raise CliError(f"prompts file {str(p)!r} holds no prompts")
    return prompts


def _json_prompt(name: str, number: int, line: str) -> str:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CliError(f"{name} line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(value, dict):
        value = value.get("prompt", value.get("text"))
    if not isinstance(value, str) or not value:
        raise CliError(f"{name} line {number}: expected a JSON string or an object with a 'prompt' (or 'text') "
                       "string field")
    return value


def generate_reply(loaded: Loaded, tokenizer: Any, encoding: Any, sampling: Sampling, stream: bool) -> str:
    """Generate from one tokenized prompt (``input_ids: (1, prompt_len)``) and return the new text (special tokens
    skipped); with ``stream`` the text is also printed as it comes."""
    streamer = StreamPrinter(tokenizer) if stream else None
    with torch.no_grad():
        ids = loaded.model.generate(**model_inputs(loaded.model, encoding), **sampling.generate_kwargs(),
                                    pad_token_id=tokenizer.pad_token_id, streamer=streamer)
    new = ids[0, encoding["input_ids"].shape[1]:] if str(loaded.config.task_type) == "CAUSAL_LM" else ids[0]
    return tokenizer.decode(new, skip_special_tokens=True)


def generate(directory: str, prompts: list[str], sampling: Sampling, model: str | None = None,
             stream: bool = False, echo: Any = print) -> list[str]:
    """Continuations of ``prompts`` by the adapted causal-LM (printed after their prompt) or seq2seq model;
    printed (streamed when ``stream``) and returned."""
    loaded = load_adapter(directory, model)
    task = task_of(loaded, ("CAUSAL_LM", "SEQ_2_SEQ_LM"), "generate", "predict")
    tokenizer = tokenizer_for(loaded)
    if sampling.seed is not None:
        from transformers import set_seed

        set_seed(sampling.seed)
    outputs = []
    for prompt in prompts:
        if stream and task == "CAUSAL_LM":
            typer.echo(prompt, nl=False)
        text = generate_reply(loaded, tokenizer, tokenizer(prompt, return_tensors="pt"), sampling, stream)
        outputs.append(text)
        if not stream:
            echo(f"{prompt}{text}" if task == "CAUSAL_LM" else text)
    return outputs


# ---------------------------------------------------------------------------------------------------- predict
def predict(directory: str, texts: list[str], model: str | None, echo: Any = print) -> list[dict[str, Any]]:
    """Class (seq-cls) or per-word classes (token-cls) with probabilities; printed and returned."""
    loaded = load_adapter(directory, model)
    task = task_of(loaded, ("SEQ_CLS", "TOKEN_CLS"), "predict", "generate")
    tokenizer = tokenizer_for(loaded)
    names = label_names(loaded)
    results = []
    for text in texts:
        enc = tokenizer(text, return_tensors="pt", truncation=True)
        with torch.no_grad():
            probs = loaded.model(**model_inputs(loaded.model, enc)).logits.softmax(-1)[0]
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
