"""``peftkit eval``: score a saved adapter on a data file.

Classifiers (``seq-cls``, ``token-cls``) get accuracy, macro-F1, per-class precision/recall/F1 and the confusion
matrix; language models (``causal-lm``, ``seq2seq-lm``) get the mean loss per predicted token and its perplexity;
other tasks get their mean loss (and accuracy where the task has one). Rows use the training format of the task
(``peftkit train --help``), read and encoded by ``tasks.load_rows`` / ``tasks.encode_rows``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .common import TASK_NAMES, CliError
from .infer import Loaded, label_names, load_adapter, model_inputs, tokenizer_for


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix of class ids.

    ``confusion_matrix[i][j]`` counts examples of true class ``i`` predicted as ``j``. Precision of a class that
    is never predicted (and recall of one that never occurs) is 0. Macro-F1 averages the F1 of the classes that
    occur in ``y_true`` or ``y_pred`` (as scikit-learn's ``f1_score(average="macro")`` does without ``labels=``).
    """
    k = len(labels)
    matrix = [[0] * k for _ in range(k)]
    for t, p in zip(y_true, y_pred, strict=True):
        matrix[t][p] += 1
    per_class: dict[str, dict[str, float | int]] = {}
    f1_present = []
    for i, name in enumerate(labels):
        tp, support = matrix[i][i], sum(matrix[i])
        predicted = sum(row[i] for row in matrix)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        if support or predicted:
            f1_present.append(f1)
    n = len(y_true)
    return {
        "accuracy": sum(matrix[i][i] for i in range(k)) / n if n else 0.0,
        "macro_f1": sum(f1_present) / len(f1_present) if f1_present else 0.0,
        "per_class": per_class,
        "confusion_matrix": matrix,
    }


@dataclass
class _Tally:
    """Running sums over batches: loss weighted by the number of scored targets, and classifier predictions."""

    loss_sum: float = 0.0
    targets: int = 0
    correct: int = 0
    scored: int = 0
    y_true: list[int] = field(default_factory=list)
    y_pred: list[int] = field(default_factory=list)


def _targets(task: str, labels: torch.Tensor, virtual_tokens: bool) -> int:
    """Number of label positions the model's mean loss averaged over: a causal LM predicts from position 1 on,
    unless virtual tokens (prompt learning) come before the first one."""
    valid = labels != -100
    return int(valid[:, 1:].sum()) if task == "causal-lm" and not virtual_tokens else int(valid.sum())


def _score_batch(task: str, loaded: Loaded, batch: dict[str, torch.Tensor], tally: _Tally) -> None:
    """Add one batch (``input_ids: (batch, seq)``; ``labels: (batch,)`` or ``(batch, seq)``) to ``tally``."""
    from .tasks import forward_step

    if task in ("seq-cls", "token-cls", "causal-lm", "seq2seq-lm"):
        out = loaded.model(**model_inputs(loaded.model, batch))
        labels = batch["labels"]
        weight = _targets(task, labels, bool(loaded.config.is_prompt_learning)) if labels.dim() > 1 else labels.shape[0]
        tally.loss_sum += float(out.loss) * weight
        tally.targets += weight
        if task in ("seq-cls", "token-cls"):
            pred = out.logits.argmax(-1)
            if pred.dim() == labels.dim() and pred.shape[-1] != labels.shape[-1]:  # virtual tokens prepended
                pred = pred[..., -labels.shape[-1]:]
            valid = labels != -100
            tally.y_true += labels[valid].tolist()
            tally.y_pred += pred[valid].tolist()
        return
    step = forward_step(task, loaded.model, batch)
    tally.loss_sum += float(step.loss) * step.examples
    tally.targets += step.examples
    tally.correct += step.correct
    tally.scored += step.total


def evaluate(directory: str, data: str, model: str | None = None, text_field: str | None = None,
             label_field: str | None = None, batch_size: int = 8, max_length: int = 512) -> dict[str, Any]:
    """The metrics of the adapter in ``directory`` on the rows of ``data`` (see the module docstring)."""
    from .tasks import TASK_SPECS, collate, encode_rows, load_rows

    if batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {batch_size}")
    if max_length < 1:
        raise CliError(f"--max-length must be at least 1, got {max_length}")
    loaded = load_adapter(directory, model)
    task_type = str(loaded.config.task_type)
    if task_type not in TASK_NAMES:
        raise CliError(f"eval needs an adapter with a task type ({', '.join(TASK_NAMES.values())}); "
                       f"this one has {loaded.config.task_type}")
    task = TASK_NAMES[task_type]
    rows = load_rows(data, task, text_field, label_field)
    tokenizer = tokenizer_for(loaded)
    names = label_names(loaded) if TASK_SPECS[task].classes else []
    label_ids = {str(i): i for i in range(len(names))} | {name: i for i, name in enumerate(names)}  # ids or names
    features = encode_rows(rows, task, tokenizer, max_length, label_ids, text_field, label_field, source=data)
    tally = _Tally()
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            _score_batch(task, loaded, collate(features[start:start + batch_size], tokenizer.pad_token_id), tally)
    return _report(task, len(rows), names, tally)


def _report(task: str, examples: int, names: list[str], tally: _Tally) -> dict[str, Any]:
    loss = tally.loss_sum / max(tally.targets, 1)
    report: dict[str, Any] = {"task": task, "examples": examples, "loss": loss}
    if task in ("causal-lm", "seq2seq-lm"):
        report.update(tokens=tally.targets, perplexity=math.exp(min(loss, 700.0)))
    elif names:
        report["labels"] = names
        report.update(classification_metrics(tally.y_true, tally.y_pred, names))
    elif tally.scored:
        report["accuracy"] = tally.correct / tally.scored
    return report


def format_report(report: dict[str, Any], data: str) -> str:
    """The report as text: headline numbers, then (classifiers) a per-class table and the confusion matrix."""
    lines = [f"{report['task']} on {data}: {report['examples']} examples"]
    head = [f"loss {report['loss']:.4f}"]
    if "perplexity" in report:
        head += [f"perplexity {report['perplexity']:.3f}", f"({report['tokens']} predicted tokens)"]
    if "accuracy" in report:
        head.insert(0, f"accuracy {report['accuracy']:.4f}")
    if "macro_f1" in report:
        head.insert(1, f"macro-F1 {report['macro_f1']:.4f}")
    lines.append("   ".join(head))
    if "per_class" in report:
        lines += ["", *_table(report)]
    return "\n".join(lines)


def _table(report: dict[str, Any]) -> list[str]:
    names = report["labels"]
    width = max(8, *(len(n) for n in names)) + 2
    lines = [f"{'class':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for name in names:
        c = report["per_class"][name]
        lines.append(f"{name:<{width}}{c['precision']:>10.3f}{c['recall']:>10.3f}{c['f1']:>10.3f}{c['support']:>10d}")
    cell = max(6, *(len(n) + 1 for n in names))
    lines += ["", "confusion matrix (rows: true class, columns: predicted class)",
              " " * width + "".join(f"{n:>{cell}}" for n in names)]
    for name, row in zip(names, report["confusion_matrix"]):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{cell}d}" for v in row))
    return lines
