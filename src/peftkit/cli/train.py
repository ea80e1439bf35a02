"""``peftkit train``: a plain PyTorch training loop around ``get_peft_model``.

Output directory layout::

    <output>/adapter_config.json, adapter_model.safetensors, README.md   the adapter (save_pretrained)
    <output>/tokenizer.json, tokenizer_config.json, ...                  the tokenizer (AutoPeftModel reads it)
    <output>/training_log.json                                           args, per-step loss, eval, timings
    <output>/checkpoint/                                                 after Ctrl-C: adapter + tokenizer +
                                                                         training_state.pt (resume with --resume)

Ctrl-C finishes the current step, writes ``<output>/checkpoint`` and exits with code 130; a second Ctrl-C aborts
at once. ``--resume <output>/checkpoint`` rebuilds the adapter, restores the trainable tensors, optimizer,
schedule, RNG and position in the data, and continues: the result equals an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from typing_extensions import Self

from ..fileio import atomic_write_text
from .common import TASKS, CliError, build_config, check_model, load_base_model, load_tokenizer, require_file
from .data import Row, label_vocabulary, read_rows
from .tasks import TASK_SPECS, StepResult, collate, forward_step

STATE_FILE = "training_state.pt"
LOG_FILE = "training_log.json"
CHECKPOINT_DIR = "checkpoint"


@dataclass
class TrainArgs:
    """Everything ``peftkit train`` was asked to do (saved in the log and the checkpoint)."""

    model: str
    data: str
    task: str = "causal-lm"
    method: str = "lora"
    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    target_modules: list[str] | None = None
    num_virtual_tokens: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 3
    max_steps: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 8
    max_length: int = 128
    eval_data: str | None = None
    output: str = "peftkit-output"
    seed: int = 0
    text_field: str | None = None
    label_field: str | None = None
    tokenizer: str | None = None
    progress: bool = True
    interrupt_after: int | None = None  # testing aid: behave as if Ctrl-C was pressed after this many steps

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise CliError(f"--task {self.task!r} is not known; allowed: {', '.join(TASKS)}")
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise CliError(f"--max-steps must be >= 1, got {self.max_steps}")
        if not self.lr > 0:
            raise CliError(f"--lr must be > 0, got {self.lr}")


@dataclass
class Dataset:
    """Encoded examples of one split."""

    features: list[dict[str, Any]]
    path: str


@dataclass
class Run:
    """The state of one training run (what a checkpoint stores)."""

    args: TrainArgs
    labels: list[str]
    model: Any
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    log: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- data
def _read_split(args: TrainArgs, path: str) -> list[Row]:
    task = TASK_SPECS[args.task]
    text_field = args.text_field or task.text_field
    label_field = args.label_field or task.label_field
    return read_rows(path, task.checks(text_field, label_field))


def _encode(args: TrainArgs, rows: list[Row], tokenizer: Any, labels: list[str], path: str) -> Dataset:
    task = TASK_SPECS[args.task]
    label_ids = {name: i for i, name in enumerate(labels)}
    tf, lf = args.text_field or task.text_field, args.label_field or task.label_field
    features = []
    for row in rows:
        try:
            features.append(task.encode(row, tokenizer, args.max_length, label_ids, tf, lf))
        except CliError as exc:
            raise CliError(f"{Path(path).name} {exc}") from None
    return Dataset(features, path)


def _batches(data: Dataset, batch_size: int, pad_id: int, order: list[int]) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(order), batch_size):
        yield collate([data.features[i] for i in order[start:start + batch_size]], pad_id)


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of ``epoch`` (a function of seed and epoch only, so resuming replays it)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


# ---------------------------------------------------------------------------------------------------- setup
def _model_kwargs(args: TrainArgs, labels: list[str]) -> dict[str, Any]:
    if not TASK_SPECS[args.task].classes:
        return {}
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}}


def _build(args: TrainArgs, labels: list[str], tokenizer: Any, total_steps: int) -> Any:
    """The base model with a fresh adapter (all base weights frozen)."""
    from ..mapping import get_peft_model

    base = load_base_model(args.model, TASKS[args.task], **_model_kwargs(args, labels))
    if getattr(base.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        base.config.pad_token_id = tokenizer.pad_token_id
    extra = dict(args.options)
    options = {"r": args.r, "alpha": args.alpha, "dropout": args.dropout, "target_modules": args.target_modules,
               "num_virtual_tokens": args.num_virtual_tokens}
    config = build_config(args.method, TASKS[args.task], options, extra, run_facts={"total_step": total_steps})
    return get_peft_model(base, config)


def _optimizer(model: Any, args: TrainArgs, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise CliError(f"--method {args.method} left no trainable parameter on this model")
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max(total_steps, 1)))
    return optimizer, scheduler


def _count(model: Any) -> tuple[int, int]:
    return model.get_nb_trainable_parameters()


# ---------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(task: str, model: Any, data: Dataset, batch_size: int, pad_id: int) -> dict[str, float]:
    """Mean loss over ``data`` and, for classifiers, accuracy."""
    was_training = model.training
    model.eval()
    loss_sum = examples = correct = total = 0.0
    for batch in _batches(data, batch_size, pad_id, list(range(len(data.features)))):
        res: StepResult = forward_step(task, model, batch)
        loss_sum += float(res.loss) * res.examples
        examples += res.examples
        correct += res.correct
        total += res.total
    model.train(was_training)
    metrics = {"loss": loss_sum / max(examples, 1)}
    if total:
        metrics["accuracy"] = correct / total
    return metrics


# ---------------------------------------------------------------------------------------------------- interrupt
class _StopFlag:
    """Set by the first Ctrl-C (SIGINT); the loop stops after the current step. A second Ctrl-C aborts."""

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


# ---------------------------------------------------------------------------------------------------- saving
def _save_adapter(run: Run, directory: Path) -> None:
    run.model.save_pretrained(str(directory))
    run.tokenizer.save_pretrained(str(directory))


def _write_log(run: Run, directory: Path) -> None:
    atomic_write_text(directory / LOG_FILE, json.dumps(run.log, indent=2) + "\n")


def save_checkpoint(run: Run, directory: Path) -> None:
    """Adapter + tokenizer + ``training_state.pt`` (trainable tensors, optimizer, schedule, RNG, step, args)."""
    _save_adapter(run, directory)
    state = {
        "args": dataclasses.asdict(run.args), "labels": run.labels, "step": run.step,
        "trainable": {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad},
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "rng": torch.get_rng_state(), "log": run.log,
    }
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, directory / STATE_FILE)
    _write_log(run, directory)


def load_state(directory: str) -> dict[str, Any]:
    """The ``training_state.pt`` of a checkpoint directory (a :class:`CliError` when there is none)."""
    path = Path(directory) / STATE_FILE
    if Path(directory).is_dir() and not path.is_file() and (Path(directory) / CHECKPOINT_DIR / STATE_FILE).is_file():
        path = Path(directory) / CHECKPOINT_DIR / STATE_FILE
    require_file(path, "checkpoint state")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:  # truncated, or not ours
        raise CliError(f"cannot read the checkpoint state {str(path)!r}: {str(exc).splitlines()[0][:200]}") from None


def _restore(run: Run, state: dict[str, Any]) -> None:
    params = dict(run.model.named_parameters())
    saved = state["trainable"]
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != expected:
        missing = sorted(expected - set(saved))[:3]
        raise CliError(f"the checkpoint does not match the adapter built from its arguments (missing {missing})")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.step = int(state["step"])
    run.log = {**state["log"], "args": dataclasses.asdict(run.args)}
    torch.set_rng_state(state["rng"])


# ---------------------------------------------------------------------------------------------------- main loop
def train(args: TrainArgs, resume: dict[str, Any] | None = None, echo: Any = print) -> dict[str, Any]:
    """Train, evaluate and save; returns the training log. Raises ``KeyboardInterrupt`` after saving a checkpoint
    when interrupted."""
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    train_rows = _read_split(args, args.data)
    eval_rows = _read_split(args, args.eval_data) if args.eval_data else None
    labels = resume["labels"] if resume else (
        label_vocabulary([r.values[args.label_field or TASK_SPECS[args.task].label_field] for r in train_rows])
        if TASK_SPECS[args.task].classes else [])
    check_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    train_set = _encode(args, train_rows, tokenizer, labels, args.data)
    eval_set = _encode(args, eval_rows, tokenizer, labels, args.eval_data) if eval_rows else None
    steps_per_epoch = math.ceil(len(train_set.features) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs if args.max_steps is None else args.max_steps
    model = _build(args, labels, tokenizer, total_steps)
    optimizer, scheduler = _optimizer(model, args, total_steps)
    run = Run(args, labels, model, tokenizer, optimizer, scheduler, steps_per_epoch, total_steps)
    trainable, total = _count(model)
    run.log = {"args": dataclasses.asdict(args), "labels": labels, "trainable_params": trainable,
               "total_params": total, "train_examples": len(train_set.features),
               "eval_examples": len(eval_set.features) if eval_set else 0, "steps": [], "eval": [], "timings": {}}
    if resume:
        _restore(run, resume)
        echo(f"resuming at step {run.step}/{total_steps}")
    echo(f"{args.method} on {args.model} ({args.task}): trainable params: {trainable:,d} || all params: {total:,d} "
         f"|| trainable%: {100 * trainable / total:.4f}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if eval_set and run.step == 0:
        _record_eval(run, evaluate(args.task, model, eval_set, args.batch_size, pad_id), "before training", echo)
    run.log["timings"]["setup_s"] = round(time.perf_counter() - t0, 3)
    output = Path(args.output)
    with _StopFlag() as stop:
        _loop(run, train_set, eval_set, pad_id, stop, echo)
        if stop.set:
            _interrupted(run, output, echo)
    _finish(run, output, t0, echo)
    return run.log


def _record_eval(run: Run, metrics: dict[str, float], when: str, echo: Any) -> None:
    run.log["eval"].append({"step": run.step, **{k: round(v, 6) for k, v in metrics.items()}})
    shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    echo(f"eval ({when}, step {run.step}): {shown}")


def _loop(run: Run, train_set: Dataset, eval_set: Dataset | None, pad_id: int, stop: _StopFlag, echo: Any) -> None:
    from tqdm.auto import tqdm

    args, model = run.args, run.model
    model.train()
    allocate = getattr(model.base_model, "update_and_allocate", None)  # rank re-allocation (AdaLoRA)
    bar = tqdm(total=run.total_steps, initial=run.step, unit="step", desc="train", dynamic_ncols=True,
               disable=not args.progress)
    started, examples, smoothed = time.perf_counter(), 0, None
    try:
        while run.step < run.total_steps and not stop.set:
            epoch, offset = divmod(run.step, run.steps_per_epoch)
            order = _epoch_order(len(train_set.features), args.seed, epoch)[offset * args.batch_size:]
            for batch in _batches(train_set, args.batch_size, pad_id, order):
                res = forward_step(args.task, model, batch)
                res.loss.backward()
                run.optimizer.step()
                if allocate is not None:
                    allocate(run.step)
                run.optimizer.zero_grad(set_to_none=True)
                run.scheduler.step()
                run.step += 1
                examples += res.examples
                loss = float(res.loss.detach())
                smoothed = loss if smoothed is None else 0.9 * smoothed + 0.1 * loss
                elapsed = time.perf_counter() - started
                run.log["steps"].append({"step": run.step, "epoch": epoch + 1, "loss": round(loss, 6),
                                         "lr": run.scheduler.get_last_lr()[0], "time_s": round(elapsed, 3)})
                bar.set_postfix(loss=f"{smoothed:.4f}", ex_per_s=f"{examples / max(elapsed, 1e-9):.1f}")
                bar.update(1)
                if args.interrupt_after is not None and run.step >= args.interrupt_after:
                    stop.set = True
                if stop.set or run.step >= run.total_steps:
                    break
            if eval_set is not None and not stop.set and (run.step % run.steps_per_epoch == 0
                                                          or run.step >= run.total_steps):
                bar.clear()
                _record_eval(run, evaluate(args.task, model, eval_set, args.batch_size, pad_id),
                             f"epoch {math.ceil(run.step / run.steps_per_epoch)}", echo)
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    timings = run.log["timings"]
    timings["train_s"] = round(timings.get("train_s", 0.0) + elapsed, 3)
    timings["examples_per_s"] = round(examples / max(elapsed, 1e-9), 2)


def _interrupted(run: Run, output: Path, echo: Any) -> None:
    directory = output / CHECKPOINT_DIR
    run.log["interrupted_at_step"] = run.step
    save_checkpoint(run, directory)
    echo(f"interrupted at step {run.step}/{run.total_steps}; checkpoint saved to {directory}\n"
         f"continue with: peftkit train --resume {directory}")
    raise KeyboardInterrupt


def _finish(run: Run, output: Path, t0: float, echo: Any) -> None:
    run.log.pop("interrupted_at_step", None)
    run.log["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
    _save_adapter(run, output)
    _write_log(run, output)
    if (output / CHECKPOINT_DIR).is_dir():
        shutil.rmtree(output / CHECKPOINT_DIR)
    size = sum(f.stat().st_size for f in output.glob("adapter_model.*"))
    echo(f"saved the adapter ({size:,d} bytes) and tokenizer to {output}; log: {output / LOG_FILE}")


def args_for_resume(state: dict[str, Any], overrides: dict[str, Any]) -> TrainArgs:
    """The checkpoint's arguments with ``overrides`` (options given on the command line) applied."""
    saved = dict(state["args"])
    saved.update({k: v for k, v in overrides.items() if v is not None})
    saved["interrupt_after"] = overrides.get("interrupt_after")
    return TrainArgs(**saved)


__all__ = ["TrainArgs", "args_for_resume", "evaluate", "load_state", "save_checkpoint", "train"]
