"""``peftkit train``: an adapter trained by ``transformers.Trainer`` (peftkit's :class:`AdapterTrainer`: adapter-only
checkpoints, resume, best-model loading), configured from flags and/or a YAML file.

Output directory layout::

    <output>/train_config.yaml                        the resolved configuration (``peftkit train <it>`` reruns)
    <output>/adapter_config.json, adapter_model.*     the adapter: the best eval checkpoint's with --eval-data, else
    <output>/tokenizer.json, ...                      the last step's; plus the tokenizer (AutoPeftModel reads it)
    <output>/training_log.json, loss_curve.png        per-step loss, evaluations, timings; the curves (matplotlib)
    <output>/checkpoint-<step>/                       Trainer checkpoints: adapter + optimizer/scheduler/RNG state

Ctrl-C stops after the current step, writes ``<output>/checkpoint-<step>`` and exits with code 130 (a second Ctrl-C
aborts at once); ``peftkit train --resume <that dir>`` (or ``--resume last``) continues, equal to an uninterrupted
run. Multi-process runs (``torchrun``, ``accelerate launch``) need nothing else: the Trainer handles them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shutil
import signal
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typing_extensions import Self

from ..fileio import atomic_write_text
from .common import (
    TASKS,
    CliError,
    build_config,
    check_model,
    load_base_model,
    load_tokenizer,
    resolve_method,
)
from .data import Row, label_vocabulary
from .tasks import TASK_SPECS, DataOptions, collate, encode_rows, forward_step, load_rows

LOG_FILE = "training_log.json"
CONFIG_FILE = "train_config.yaml"
CURVE_FILE = "loss_curve.png"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

#: per-task defaults of --lr / --epochs, chosen to learn on small data (tens of rows): classification with LoRA
#: at the reference's lr 1e-3 / alpha 8 stays at chance on 40 rows x 5 epochs; lr 5e-3, alpha 2r, 10 epochs learns
TASK_DEFAULTS: dict[str, dict[str, float]] = {
    "causal-lm": {"lr": 1e-3, "epochs": 3},
    "seq2seq-lm": {"lr": 1e-3, "epochs": 3},
    "seq-cls": {"lr": 5e-3, "epochs": 10},
    "token-cls": {"lr": 5e-3, "epochs": 10},
    "question-ans": {"lr": 5e-3, "epochs": 10},
    "feature-extraction": {"lr": 1e-3, "epochs": 3},
}
#: default --alpha, as a multiple of the rank, for methods whose config has a ``lora_alpha`` field
ALPHA_PER_RANK = 2
DTYPES = ("float32", "bfloat16", "float16", "auto")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay")


@dataclass
class TrainArgs:
    """Everything ``peftkit train`` was asked to do: one field per CLI flag and YAML key (None = the default of
    the task, method or Trainer, filled in by :func:`resolve`)."""

    model: str | None = None
    data: str | None = None
    task: str = "causal-lm"
    method: str = "lora"
    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    target_modules: list[str] | str | None = None
    num_virtual_tokens: int | None = None
    option: dict[str, Any] = field(default_factory=dict)
    epochs: float | None = None
    max_steps: int | None = None
    lr: float | None = None
    weight_decay: float = 0.0
    batch_size: int = 8
    eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    warmup_ratio: float | None = None
    warmup_steps: int | None = None
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    gradient_checkpointing: bool = False
    bf16: bool = False
    fp16: bool = False
    max_length: int = 128
    eval_data: str | None = None
    eval_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int | None = 2
    logging_steps: int | None = None
    keep_best: bool = True
    early_stopping_patience: int | None = None
    report_to: list[str] | str = "none"
    output: str = "peftkit-output"
    overwrite: bool = False
    resume: str | None = None
    seed: int = 0
    text_field: str | None = None
    label_field: str | None = None
    format: str = "auto"  # causal-lm rows: auto, text, alpaca, messages, prompt-completion (tasks.DataOptions)
    train_on_prompt: bool = False
    chat_template: str | None = None
    packing: bool = False
    tokenizer: str | None = None
    progress: bool = True
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    dtype: str | None = None
    device_map: str | None = None
    interrupt_after: int | None = None  # testing aid: behave as if Ctrl-C was pressed after this many steps


#: fields that are not configuration keys (the hidden test aid)
HIDDEN_FIELDS = frozenset({"interrupt_after"})
#: keys left out of the saved ``train_config.yaml`` (they describe this invocation, not the run)
UNSAVED_FIELDS = frozenset({"resume", "overwrite", "interrupt_after"})


def config_keys() -> list[str]:
    """The keys a YAML config may have (= the CLI flags with underscores)."""
    return [f.name for f in dataclasses.fields(TrainArgs) if f.name not in HIDDEN_FIELDS]


# ---------------------------------------------------------------------------------------------------- config
def load_yaml_config(path: str) -> dict[str, Any]:
    """The keys of a YAML config file, checked against :func:`config_keys` and coerced to the flags' types."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CliError(f"config file {str(p)!r} does not exist" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        values = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CliError(f"{p.name} is not valid YAML: {' '.join(str(exc).split())[:200]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise CliError(f"{p.name} must be a mapping of flag names to values, got {type(values).__name__}")
    allowed = config_keys()
    for key in values:
        if str(key).replace("-", "_") not in allowed:
            raise CliError(f"{p.name}: unknown key {key!r}; allowed: {', '.join(allowed)}")
    return {str(k).replace("-", "_"): coerce(str(k).replace("-", "_"), v, p.name) for k, v in values.items()}


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def coerce(key: str, value: Any, source: str) -> Any:
    """``value`` of config ``key`` as the flag's type (YAML reads ``5e-3`` as a string, ``1`` as an int, ...)."""
    if value is None:
        return None
    kinds = _kinds(key)
    if key == "option":
        return _coerce_options(value, source)
    if key == "target_modules" and isinstance(value, str) and value != "all-linear":
        value = [part.strip() for part in value.split(",") if part.strip()]  # the flag's comma-separated form
    for kind in kinds:
        converted = _convert(value, kind)
        if converted is not _FAIL:
            return converted
    names = " or ".join(k.__name__ for k in kinds)
    raise CliError(f"{source}: key {key!r} must be {names}, got {type(value).__name__} {value!r:.60}")


_FAIL = object()


def _kinds(key: str) -> list[type]:
    hint = typing.get_type_hints(TrainArgs)[key]
    return [typing.get_origin(a) or a for a in typing.get_args(hint) if a is not type(None)] or [hint]


def _convert(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        return True if text in _TRUE else False if text in _FALSE else _FAIL
    if kind in (int, float):
        if isinstance(value, bool):
            return _FAIL
        try:
            number = float(value)
        except (TypeError, ValueError):
            return _FAIL
        if kind is int:
            return int(number) if number.is_integer() else _FAIL
        return number
    if kind is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        return _FAIL
    if kind is str:
        return value if isinstance(value, str) else _FAIL
    return value if isinstance(value, kind) else _FAIL


def _coerce_options(value: Any, source: str) -> dict[str, Any]:
    from .common import parse_options

    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return parse_options(value)
    raise CliError(f"{source}: key 'option' must be a mapping (use_rslora: true) or a list of key=value strings, "
                   f"got {type(value).__name__}")


def find_resume_config(resume: str) -> Path | None:
    """``train_config.yaml`` of the run a ``--resume`` directory belongs to (in it or its parent), if any."""
    for directory in (Path(resume), Path(resume).parent):
        if (directory / CONFIG_FILE).is_file():
            return directory / CONFIG_FILE
    return None


def resolve(config_path: str | None, given: dict[str, Any]) -> TrainArgs:
    """The run's arguments: the YAML file's keys, overridden by the flags ``given`` on the command line (None =
    not given), then the per-task / per-method defaults."""
    values: dict[str, Any] = {}
    resume = given.get("resume")
    if config_path is None and resume not in (None, "last"):  # the run's own config, under the given flags
        found = find_resume_config(resume)
        config_path = str(found) if found else None
    if config_path is not None:
        values.update(load_yaml_config(config_path))
    options = {**values.get("option", {}), **(given.get("option") or {})}  # -o adds to the file's options
    values.update({k: v for k, v in given.items() if v is not None})
    values["option"] = options
    missing = [f"--{k}" for k in ("model", "data") if values.get(k) is None]
    if missing:
        raise CliError(f"missing option {' and '.join(missing)} (or a config file: peftkit train config.yaml)")
    args = TrainArgs(**values)
    _fill_defaults(args)
    validate(args)
    return args


def _fill_defaults(args: TrainArgs) -> None:
    if args.task not in TASKS:
        raise CliError(f"--task {args.task!r} is not known; allowed: {', '.join(TASKS)}")
    defaults = TASK_DEFAULTS[args.task]
    if args.lr is None:
        args.lr = defaults["lr"]
    if args.epochs is None:
        args.epochs = defaults["epochs"]
    if args.alpha is None:
        rank = args.r if args.r is not None else args.option.get("r")
        args.alpha = _default_alpha(args.method, rank if isinstance(rank, int) else None)


def _default_alpha(method: str, r: int | None) -> float | None:
    """``ALPHA_PER_RANK * r`` for methods with a ``lora_alpha`` field (LoRA, DoRA, AdaLoRA, ...); None for others
    (their own default applies)."""
    spec, _ = resolve_method(method)
    fields = {f.name: f for f in dataclasses.fields(spec.config_cls)}
    if "lora_alpha" not in fields:
        return None
    rank = r if r is not None else next((fields[n].default for n in ("r", "init_r") if n in fields), None)
    return float(ALPHA_PER_RANK * rank) if isinstance(rank, int) else None


def validate(args: TrainArgs) -> None:
    """One-line :class:`CliError` for the first out-of-range or conflicting flag."""
    positive = ("batch_size", "max_length", "gradient_accumulation_steps", "eval_batch_size", "max_steps",
                "eval_steps", "save_steps", "logging_steps", "early_stopping_patience", "save_total_limit")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CliError(f"--{_flag(name)} must be >= 1, got {value}")
    if not args.epochs > 0:
        raise CliError(f"--epochs must be > 0, got {args.epochs}")
    if not args.lr > 0:
        raise CliError(f"--lr must be > 0, got {args.lr}")
    if args.warmup_ratio is not None and not 0 <= args.warmup_ratio < 1:
        raise CliError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    _exclusive(args, ("warmup_ratio", "warmup_steps"), ("bf16", "fp16"), ("load_in_4bit", "load_in_8bit"))
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise CliError(f"--lr-scheduler {args.lr_scheduler!r} is not known; allowed: {', '.join(LR_SCHEDULERS)}")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise CliError(f"--dtype {args.dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    if args.early_stopping_patience is not None and not (args.eval_data and args.keep_best):
        raise CliError("--early-stopping-patience needs --eval-data (and --keep-best)")
    if args.eval_steps is not None and not args.eval_data:
        raise CliError("--eval-steps needs --eval-data")
    if args.eval_data and args.keep_best and args.eval_steps and args.save_steps and args.save_steps % args.eval_steps:
        raise CliError(f"--save-steps {args.save_steps} must be a multiple of --eval-steps {args.eval_steps} with "
                       "--keep-best (the best checkpoint must have been evaluated); or pass --no-keep-best")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _exclusive(args: TrainArgs, *pairs: tuple[str, str]) -> None:
    for a, b in pairs:
        if getattr(args, a) and getattr(args, b):
            raise CliError(f"--{_flag(a)} and --{_flag(b)} exclude each other; pass one")


def config_yaml(args: TrainArgs) -> str:
    """The resolved configuration as YAML (every key, flags' order), as saved in ``train_config.yaml``."""
    import yaml

    values = {k: v for k, v in dataclasses.asdict(args).items() if k not in UNSAVED_FIELDS}
    return yaml.safe_dump(values, sort_keys=False, default_flow_style=None, width=110)


def config_summary(args: TrainArgs, saved_to: Path, width: int = 110) -> str:
    """The configuration's set keys as ``key=value`` words wrapped to ``width`` (the start-of-run echo)."""
    import textwrap

    words = [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}"
             for k, v in dataclasses.asdict(args).items() if k not in UNSAVED_FIELDS and v not in (None, {}, [])]
    body = textwrap.fill(" ".join(words), width=width, initial_indent="  ", subsequent_indent="  ",
                         break_long_words=False, break_on_hyphens=False)
    return f"configuration (saved to {saved_to}):\n{body}"


# ---------------------------------------------------------------------------------------------------- output dir
def check_output(args: TrainArgs) -> None:
    """Refuse a non-empty output directory unless ``--overwrite`` (then its old checkpoints are removed) or
    ``--resume``."""
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise CliError(f"--output {str(out)!r} is a file, not a directory")
    if args.resume is not None or not out.is_dir() or not any(out.iterdir()):
        return
    if not args.overwrite:
        raise CliError(f"output directory {str(out)!r} is not empty; pass --overwrite to replace its adapter, "
                       "or --resume last to continue its run")


def clear_checkpoints(output: Path) -> None:
    """Remove ``checkpoint-*`` directories of an earlier run (``--overwrite``), so ``--resume last`` and the
    checkpoint rotation see only this run's."""
    for path in output.glob("checkpoint-*"):
        if path.is_dir() and CHECKPOINT_RE.match(path.name):
            shutil.rmtree(path)


def resume_checkpoint(args: TrainArgs) -> str | None:
    """The checkpoint directory ``--resume`` names: ``last`` = the highest ``<output>/checkpoint-N``."""
    if args.resume is None:
        return None
    if args.resume == "last":
        found = sorted((int(m.group(1)), p) for p in Path(args.output).glob("checkpoint-*")
                       if (m := CHECKPOINT_RE.match(p.name)) and (p / "trainer_state.json").is_file())
        if not found:
            raise CliError(f"--resume last: {args.output!r} holds no checkpoint-<step> directory with "
                           "trainer_state.json")
        return str(found[-1][1])
    path = Path(args.resume)
    if not (path / "trainer_state.json").is_file():
        raise CliError(f"--resume {args.resume!r} is not a checkpoint directory (no trainer_state.json); pass "
                       "<output>/checkpoint-<step> or 'last'")
    return str(path)


# ---------------------------------------------------------------------------------------------------- data seam
# The data side (reading files/datasets, row formats, encoding, batching) lives in data.py / tasks.py; training
# uses it only through these three functions.
def data_options(args: TrainArgs) -> DataOptions:
    """How causal-LM rows become examples (row format, prompt masking, chat template, packing)."""
    return DataOptions(args.format, args.train_on_prompt, args.chat_template, args.packing)


def read_split(args: TrainArgs, path: str) -> list[Row]:
    """The rows of one split, checked for the task's fields."""
    return load_rows(path, args.task, args.text_field, args.label_field, data_options(args))


def labels_of(args: TrainArgs, rows: list[Row]) -> list[str]:
    """Class names of a classification task (from the training rows); [] for other tasks."""
    task = TASK_SPECS[args.task]
    if not task.classes:
        return []
    return label_vocabulary([r.values[args.label_field or task.label_field] for r in rows])


def encode_split(args: TrainArgs, rows: list[Row], tokenizer: Any, labels: list[str], path: str) -> list[dict]:
    """Features (token id lists) of ``rows``, packed when asked; errors name the file."""
    label_ids = {name: i for i, name in enumerate(labels)}
    return encode_rows(rows, args.task, tokenizer, args.max_length, label_ids, args.text_field, args.label_field,
                       data_options(args), source=path)


#: batch keys that are model inputs; every other key of a feature is a label the model scores
INPUT_KEYS = frozenset({"input_ids", "attention_mask", "pair_ids", "pair_attention_mask", "token_type_ids",
                        "position_ids"})


# ---------------------------------------------------------------------------------------------------- model
def _model_kwargs(args: TrainArgs, labels: list[str]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if labels:
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={name: i for i, name in enumerate(labels)})
    kwargs.update(_load_kwargs(args))
    return kwargs


def _torch_dtype(name: str | None) -> Any:
    import torch

    return None if name in (None, "auto") else getattr(torch, name)


def _load_kwargs(args: TrainArgs) -> dict[str, Any]:
    """``from_pretrained`` keywords of --dtype, --device-map, --load-in-4bit/8bit."""
    kwargs: dict[str, Any] = {}
    if args.dtype is not None:
        kwargs["dtype"] = "auto" if args.dtype == "auto" else _torch_dtype(args.dtype)
    if args.device_map is not None:
        kwargs["device_map"] = _device_map(args.device_map)
    if args.load_in_4bit or args.load_in_8bit:
        kwargs["quantization_config"] = _bnb_config(args)
        kwargs.setdefault("device_map", _local_device())
    return kwargs


def _device_map(value: str) -> Any:
    if value.strip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise CliError(f"--device-map {value!r} is not valid JSON ({exc.msg})") from None
    return value


def _local_device() -> Any:
    """Where a quantized model is loaded: this process's GPU, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    return "cpu"


def _bnb_config(args: TrainArgs) -> Any:
    """QLoRA's quantization: nf4 + double quantization (4-bit) or LLM.int8 (8-bit); compute dtype = --dtype, else
    bfloat16 on a GPU that has it, else float32."""
    import importlib.util

    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        flag = "--load-in-4bit" if args.load_in_4bit else "--load-in-8bit"
        raise CliError(f"{flag} needs bitsandbytes: pip install 'peftkit[bnb]'")
    from transformers import BitsAndBytesConfig

    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = _torch_dtype(args.dtype)
    if compute is None:
        compute = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def build_model(args: TrainArgs, labels: list[str], tokenizer: Any, total_steps: int) -> Any:
    """The base model (quantized when asked, then prepared for k-bit training) with a fresh adapter."""
    from ..mapping import get_peft_model
    from ..quantization import prepare_model_for_kbit_training

    base = load_base_model(args.model, TASKS[args.task], **_model_kwargs(args, labels))
    if getattr(base.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        base.config.pad_token_id = tokenizer.pad_token_id
    if args.packing:  # transformers keeps packed examples apart (from position_ids) only without a KV cache
        base.config.use_cache = False
    if args.load_in_4bit or args.load_in_8bit:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=args.gradient_checkpointing)
    options = {"r": args.r, "alpha": args.alpha, "dropout": args.dropout, "target_modules": args.target_modules,
               "num_virtual_tokens": args.num_virtual_tokens}
    config = build_config(args.method, TASKS[args.task], options, dict(args.option),
                          run_facts={"total_step": total_steps})
    model = get_peft_model(base, config)
    if not any(p.requires_grad for p in model.parameters()):
        raise CliError(f"--method {args.method} left no trainable parameter on this model")
    return model


# ---------------------------------------------------------------------------------------------------- Ctrl-C
class _StopFlag:
    """Set by the first Ctrl-C (SIGINT); training stops after the current step. A second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.set = False
        self._previous: Any = None

    def __enter__(self) -> Self:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C keeps raising KeyboardInterrupt
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _any_rank(flag: bool, device: Any) -> bool:
    """``flag`` OR-ed over the processes of a distributed run (Ctrl-C may reach only some ranks)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# ---------------------------------------------------------------------------------------------------- callbacks
def _callbacks() -> tuple[type, type]:
    """The CLI's two ``TrainerCallback`` classes (built on first use: transformers is imported lazily)."""
    from transformers import TrainerCallback

    class InterruptCallback(TrainerCallback):
        """On Ctrl-C (or after ``interrupt_after`` steps): save a checkpoint at the end of this step and stop."""

        def __init__(self, stop: _StopFlag, interrupt_after: int | None) -> None:
            self.stop, self.interrupt_after = stop, interrupt_after
            self.interrupted_at: int | None = None

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if self.interrupt_after is not None and state.global_step >= self.interrupt_after:
                self.stop.set = True
            if _any_rank(self.stop.set, args.device):
                self.stop.set = True
                self.interrupted_at = state.global_step
                control.should_save = True
                control.should_evaluate = False
                control.should_training_stop = True
            return control

    class ConsoleCallback(TrainerCallback):
        """The progress bar (loss in its postfix, ETA from tqdm) or, with ``--no-progress``, one line per logged
        step; evaluation results as lines either way. Only the main process prints."""

        def __init__(self, progress: bool, echo: Any) -> None:
            self.progress, self.echo, self.bar = progress, echo, None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.progress and state.is_world_process_zero:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", desc="train",
                                dynamic_ncols=True)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            if "eval_loss" in logs:
                self._write(_eval_line(logs, state))
            elif "loss" in logs:
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}")
                else:
                    self._write(f"step {state.global_step}/{state.max_steps} epoch {state.epoch or 0:.2f}: "
                                f"loss {logs['loss']:.4f} lr {logs.get('learning_rate', 0):.3e}")

        def _write(self, line: str) -> None:
            if self.bar is not None:
                self.bar.write(line)
            else:
                self.echo(line)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return InterruptCallback, ConsoleCallback


def _eval_line(logs: dict[str, float], state: Any) -> str:
    shown = "  ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in logs.items()
                      if k in ("eval_loss", "eval_accuracy", "eval_macro_f1"))
    return f"eval (step {state.global_step}, epoch {state.epoch or 0:.2f}): {shown}"


# ---------------------------------------------------------------------------------------------------- metrics
def classification_metrics(prediction: Any) -> dict[str, float]:
    """Accuracy and macro-F1 (mean over the classes present in labels or predictions) of argmax predictions;
    ``-100`` labels (padding, sub-word continuations) are ignored."""
    import numpy as np

    preds, labels = np.asarray(prediction.predictions), np.asarray(prediction.label_ids)
    mask = labels != -100
    p, y = preds[mask], labels[mask]
    if y.size == 0:
        return {}
    f1 = []
    for c in np.union1d(p, y):
        tp, fp, fn = np.sum((p == c) & (y == c)), np.sum((p == c) & (y != c)), np.sum((p != c) & (y == c))
        f1.append(2 * tp / max(2 * tp + fp + fn, 1))
    return {"accuracy": float(np.mean(p == y)), "macro_f1": float(np.mean(f1))}


def count_metrics(prediction: Any) -> dict[str, float]:
    """Accuracy from per-batch (correct, total) counts (tasks scored by :func:`forward_step`)."""
    import numpy as np

    correct, total = np.asarray(prediction.predictions).sum(), np.asarray(prediction.label_ids).sum()
    return {"accuracy": float(correct / total)} if total else {}


def argmax_logits(logits: Any, labels: Any) -> Any:
    """``preprocess_logits_for_metrics``: class ids ``(batch[, seq])`` instead of the logits; positions of
    prompt-learning virtual tokens (prepended) are dropped so predictions line up with the labels."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    pred = logits.argmax(-1)
    if labels is not None and pred.dim() == labels.dim() and pred.shape[-1] != labels.shape[-1]:
        pred = pred[..., -labels.shape[-1]:]
    return pred


# ---------------------------------------------------------------------------------------------------- trainer
@functools.cache
def _trainer_class() -> type:
    """:class:`AdapterTrainer` + scoring of tasks whose batches carry no label the model scores itself
    (``feature-extraction``'s text pairs: :func:`forward_step`'s contrastive loss)."""
    import torch

    from ..integrations.trainer import AdapterTrainer

    class CliTrainer(AdapterTrainer):  # type: ignore[misc, valid-type]
        cli_task: str = "causal-lm"
        own_loss: bool = False

        def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            if not self.own_loss:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            result = forward_step(self.cli_task, model, inputs)
            return (result.loss, {}) if return_outputs else result.loss

        def prediction_step(self, model: Any, inputs: dict, prediction_loss_only: bool,
                            ignore_keys: list[str] | None = None) -> Any:
            if not self.own_loss:
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                result = forward_step(self.cli_task, model, inputs)
            device = result.loss.device
            return (result.loss.detach(), torch.tensor([result.correct], device=device),
                    torch.tensor([result.total], device=device))

    return CliTrainer


def _steps_per_epoch(args: TrainArgs, n_train: int) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batches = math.ceil(n_train / (args.batch_size * world))
    return max(1, batches // args.gradient_accumulation_steps)


def total_steps(args: TrainArgs, n_train: int) -> int:
    """Optimizer steps of the run (what the Trainer will do)."""
    if args.max_steps is not None:
        return args.max_steps
    return max(1, math.ceil(args.epochs * _steps_per_epoch(args, n_train)))


def training_arguments(args: TrainArgs, steps: int, has_eval: bool, classes: bool) -> Any:
    """``TrainingArguments`` from the flags (device, precision and process group are the Trainer's choice)."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    kw: dict[str, Any] = {
        "output_dir": args.output, "seed": args.seed, "report_to": args.report_to,
        "per_device_train_batch_size": args.batch_size,
        "per_device_eval_batch_size": args.eval_batch_size or args.batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_train_epochs": args.epochs, "max_steps": args.max_steps or -1,
        "learning_rate": args.lr, "lr_scheduler_type": args.lr_scheduler, "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm, "optim": args.optim, "bf16": args.bf16, "fp16": args.fp16,
        "logging_strategy": "steps", "logging_steps": args.logging_steps or max(1, steps // 100),
        "save_total_limit": args.save_total_limit, "prediction_loss_only": not classes,
        # the CLI prints its own progress; columns are the collator's business; quiet transformers on every rank
        "disable_tqdm": True, "remove_unused_columns": False, "log_level": "error", "log_level_replica": "error",
        "dataloader_num_workers": 0, "dataloader_pin_memory": _has_cuda(),
    }
    warmup = args.warmup_steps if args.warmup_steps is not None else args.warmup_ratio
    if warmup:
        kw["warmup_steps" if "warmup_ratio" not in names or args.warmup_steps is not None else "warmup_ratio"] = warmup
    if args.gradient_checkpointing:
        kw["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = True
    if not _has_accelerator():
        # the Trainer would pick the CPU anyway; saying so lets --bf16 run there (CPU autocast), and torchrun on
        # CPUs runs multi-CPU DDP only with use_cpu and a backend (else each process trains alone)
        kw["use_cpu"] = True
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            kw["ddp_backend"] = "gloo"
    kw.update(_schedule(args, has_eval))
    try:
        return TrainingArguments(**kw)
    except ValueError as exc:  # e.g. --fp16 without a GPU, an unknown --optim / --report-to
        raise CliError(f"invalid training options: {_one_line(exc)}") from None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _one_line(exc: BaseException, limit: int = 800) -> str:
    return " ".join(str(exc).split())[:limit]


def _has_accelerator() -> bool:
    """A GPU-like device (CUDA, MPS, XPU, ...) that the Trainer would train on."""
    import torch

    probe = getattr(torch, "accelerator", None)
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()


def _schedule(args: TrainArgs, has_eval: bool) -> dict[str, Any]:
    """Evaluation / checkpoint / keep-best settings: with eval data, evaluate (and save) every --eval-steps or
    --save-steps, else every epoch; keep-best loads the lowest eval loss's checkpoint at the end."""
    out: dict[str, Any] = {"save_strategy": "steps" if args.save_steps else "no"}
    if args.save_steps:
        out["save_steps"] = args.save_steps
    if not has_eval:
        return out
    every = args.eval_steps or args.save_steps
    out.update(eval_strategy="steps" if every else "epoch", eval_on_start=args.resume is None)
    if every:
        out["eval_steps"] = every
    if args.keep_best:
        out.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
                   save_strategy="steps" if every else "epoch")
        if every:
            out["save_steps"] = args.save_steps or every
    return out


# ---------------------------------------------------------------------------------------------------- the run
@dataclass
class Prepared:
    """Data, model and trainer of one run, ready for ``trainer.train()``."""

    args: TrainArgs
    labels: list[str]
    n_train: int
    n_eval: int
    trainer: Any
    stop: _StopFlag
    interrupt: Any
    log: dict[str, Any]


def prepare(args: TrainArgs, echo: Any) -> Prepared:
    """Read and encode the data, build the model, the ``TrainingArguments`` and the trainer."""
    from transformers import EarlyStoppingCallback, set_seed

    t0 = time.perf_counter()
    train_rows = read_split(args, args.data)
    eval_rows = read_split(args, args.eval_data) if args.eval_data else None
    labels = labels_of(args, train_rows)
    check_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    if args.chat_template:  # saved with the adapter's tokenizer, so generate/chat format prompts as in training
        tokenizer.chat_template = data_options(args).chat_template
    train_set = encode_split(args, train_rows, tokenizer, labels, args.data)
    eval_set = encode_split(args, eval_rows, tokenizer, labels, args.eval_data) if eval_rows else None
    steps = total_steps(args, len(train_set))
    set_seed(args.seed)
    model = build_model(args, labels, tokenizer, steps)
    task = TASK_SPECS[args.task]
    label_names = sorted(set(train_set[0]) - INPUT_KEYS)
    own_loss = not label_names
    training_args = training_arguments(args, steps, eval_set is not None, task.classes or own_loss)
    training_args.label_names = label_names
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cls = _trainer_class()
    metrics = count_metrics if own_loss else classification_metrics if task.classes else None
    try:
        trainer = cls(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                      processing_class=tokenizer, data_collator=functools.partial(collate, pad_id=pad_id),
                      compute_metrics=metrics if eval_set is not None else None,
                      preprocess_logits_for_metrics=argmax_logits if task.classes and not own_loss else None)
    except ValueError as exc:  # e.g. an unknown --report-to
        raise CliError(f"invalid training options: {_one_line(exc)}") from None
    trainer.cli_task, trainer.own_loss = args.task, own_loss
    stop = _StopFlag()
    interrupt_cls, console_cls = _callbacks()
    interrupt = interrupt_cls(stop, args.interrupt_after)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for default in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(default)
    trainer.add_callback(console_cls(args.progress, echo))
    trainer.add_callback(interrupt)
    if callable(getattr(type(model.base_model), "update_and_allocate", None)):  # rank re-allocation (AdaLoRA)
        from .. import AdaLoraCallback

        trainer.add_callback(AdaLoraCallback())
    if eval_set is not None and args.keep_best and args.early_stopping_patience:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
    trainable, total = model.get_nb_trainable_parameters()
    log = {"args": {k: v for k, v in dataclasses.asdict(args).items() if k not in UNSAVED_FIELDS},
           "labels": labels, "trainable_params": trainable, "total_params": total,
           "train_examples": len(train_set), "eval_examples": len(eval_set) if eval_set else 0,
           "world_size": training_args.world_size, "timings": {"setup_s": round(time.perf_counter() - t0, 3)}}
    return Prepared(args, labels, len(train_set), len(eval_set) if eval_set else 0, trainer, stop, interrupt, log)


def train(args: TrainArgs, echo: Any = print) -> dict[str, Any]:
    """Train, evaluate and save; returns the training log. Raises ``KeyboardInterrupt`` after writing a checkpoint
    when interrupted (Ctrl-C)."""
    check_output(args)
    checkpoint = resume_checkpoint(args)
    run = prepare(args, echo)
    trainer, is_main = run.trainer, run.trainer.args.should_save
    output = Path(args.output)
    trainer.accelerator.wait_for_everyone()  # every rank checked the output directory before rank 0 writes to it
    if is_main:
        if args.overwrite and args.resume is None:
            clear_checkpoints(output)
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output / CONFIG_FILE, config_yaml(args))
        echo(config_summary(args, output / CONFIG_FILE))
        trainable, total = run.log["trainable_params"], run.log["total_params"]
        echo(f"{args.method} on {args.model} ({args.task}): trainable params: {trainable:,d} || all params: "
             f"{total:,d} || trainable%: {100 * trainable / total:.4f}")
        if checkpoint:
            echo(f"resuming from {checkpoint}")
    t0 = time.perf_counter()
    with run.stop:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    timings = run.log["timings"]
    timings["train_s"] = round(time.perf_counter() - t0, 3)
    timings["examples_per_s"] = round(float(result.metrics.get("train_samples_per_second", 0.0)), 2)
    timings["total_s"] = round(timings["setup_s"] + timings["train_s"], 3)
    if run.interrupt.interrupted_at is not None:
        _interrupted(run, echo)
    return _finish(run, echo)


def _interrupted(run: Prepared, echo: Any) -> None:
    step = run.interrupt.interrupted_at
    directory = Path(run.args.output) / f"checkpoint-{step}"
    if run.trainer.args.should_save:
        echo(f"interrupted at step {step}/{run.trainer.state.max_steps}; checkpoint saved to {directory}\n"
             f"continue with: peftkit train --resume {directory}")
    _end_distributed(run.trainer)
    raise KeyboardInterrupt


def _finish(run: Prepared, echo: Any) -> dict[str, Any]:
    trainer, args, output = run.trainer, run.args, Path(run.args.output)
    trainer.save_model(str(output))  # adapter + tokenizer; the best eval checkpoint's when keep-best loaded it
    history = trainer.state.log_history
    run.log["steps"] = [{"step": h["step"], "epoch": round(h.get("epoch") or 0, 4), "loss": round(h["loss"], 6),
                         "lr": h.get("learning_rate"), "grad_norm": h.get("grad_norm")}
                        for h in history if "loss" in h]
    run.log["eval"] = [{"step": h["step"], "epoch": round(h.get("epoch") or 0, 4),
                        **{k.removeprefix("eval_"): round(v, 6) for k, v in h.items()
                           if k in ("eval_loss", "eval_accuracy", "eval_macro_f1")}}
                       for h in history if "eval_loss" in h]
    if trainer.state.best_model_checkpoint:
        run.log["best"] = {"checkpoint": trainer.state.best_model_checkpoint, "eval_loss": trainer.state.best_metric}
    hashes = _rank_hashes(trainer)
    if hashes is not None:
        run.log["rank_adapter_sha256"] = hashes
    if trainer.args.should_save:
        atomic_write_text(output / LOG_FILE, json.dumps(run.log, indent=2) + "\n")
        size = sum(f.stat().st_size for f in output.glob("adapter_model.*"))
        best = f" (best eval loss {trainer.state.best_metric:.4f}, step {_step_of(trainer.state.best_model_checkpoint)})" \
            if trainer.state.best_model_checkpoint else ""
        echo(f"saved the adapter{best} ({size:,d} bytes) and tokenizer to {output}; log: {output / LOG_FILE}")
        note = write_curve(run.log, output / CURVE_FILE)
        if note:
            echo(note)
        hint = loss_hint(run.log["steps"], args.lr)
        if hint:
            echo(hint)
        if hashes is not None and len(set(hashes)) > 1:
            echo("warning: the adapters of the processes differ after training: " + ", ".join(hashes))
    _end_distributed(trainer)
    return run.log


def _step_of(checkpoint: str) -> str:
    match = CHECKPOINT_RE.match(Path(checkpoint).name)
    return match.group(1) if match else checkpoint


def loss_hint(steps: list[dict[str, Any]], lr: float) -> str | None:
    """A hint when the training loss did not fall: the mean of the last fifth of the logged losses is not below
    the mean of the first fifth."""
    losses = [s["loss"] for s in steps if math.isfinite(s["loss"])]
    if len(losses) < 2:
        return None
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    if last < first:
        return None
    return (f"hint: the training loss did not decrease ({first:.4f} -> {last:.4f}): try a higher --lr (now {lr:g}), "
            "more --epochs, or a larger --r / --alpha")


def write_curve(log: dict[str, Any], path: Path) -> str | None:
    """Draw the training loss (and eval loss / accuracy) against the step into ``path``; returns a note line when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"note: matplotlib is not installed, so {path.name} was not drawn (pip install 'peftkit[plot]')"
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    steps = log.get("steps", [])
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="train loss")
    evals = log.get("eval", [])
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="eval loss")
        if any("accuracy" in e for e in evals):
            acc = ax.twinx()
            acc.plot([e["step"] for e in evals if "accuracy" in e], [e["accuracy"] for e in evals if "accuracy" in e],
                     "s--", color="tab:green", label="eval accuracy")
            acc.set_ylabel("accuracy")
            acc.set_ylim(0, 1)
            acc.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper left")
    ax.set_title(f"{log['args'].get('method')} on {Path(str(log['args'].get('model'))).name} ({log['args'].get('task')})")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return None


def adapter_sha256(model: Any) -> str:
    """sha256 of the model's trainable tensors (names and bytes, sorted by name)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _rank_hashes(trainer: Any) -> list[str] | None:
    """Each process's adapter hash in a distributed run (None in a single-process run)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, adapter_sha256(trainer.model))
    return [str(h) for h in gathered]


def _end_distributed(trainer: Any) -> None:
    """Wait for every rank and leave the process group (a torchrun process that exits inside it aborts)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        trainer.accelerator.wait_for_everyone()
        dist.destroy_process_group()


__all__ = ["TASK_DEFAULTS", "TrainArgs", "config_keys", "load_yaml_config", "resolve", "train"]
