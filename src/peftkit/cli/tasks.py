"""What each task reads from a row, how it is tokenised and batched, and how loss and accuracy are computed.

One :class:`Task` per CLI task name; ``TASK_SPECS[name]`` is looked up by the commands, never branched on.

Row formats (field names are the defaults of ``--text-field`` / ``--label-field``):

* ``causal-lm``: ``{"text": str}`` -- next-token prediction on the whole text.
* ``seq-cls``: ``{"text": str, "label": str | int}``.
* ``token-cls``: ``{"tokens": [word, ...] | str, "tags": [label, ...]}`` -- one label per word.
* ``seq2seq-lm``: ``{"text": source, "target": str}``.
* ``question-ans``: ``{"question": str, "context": str, "answer": str}`` -- the answer is a span of the context.
* ``feature-extraction``: ``{"text": str, "pair": str}`` -- pairs of related texts; trained contrastively
  (in-batch negatives on mean-pooled embeddings), accuracy = the pair is its text's nearest neighbour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import data as D
from .common import CliError
from .data import Row

Feature = dict[str, Any]


@dataclass(frozen=True)
class Task:
    """How one task reads, encodes, batches and scores rows.

    Attributes:
        text_field / label_field: default field names; ``label_field`` None when the task has no label.
        checks: ``(text_field, label_field) -> {field: check}`` used by ``data.read_rows``.
        encode: ``(row, tokenizer, max_length, label_ids, text_field, label_field) -> feature`` (lists of ints).
        classes: whether labels are class names (a label vocabulary is built and accuracy reported).
    """

    name: str
    text_field: str
    label_field: str | None
    checks: Callable[[str, str | None], dict[str, D.Check]]
    encode: Callable[..., Feature]
    classes: bool = False
    extra_fields: tuple[str, ...] = ()


def _encode_causal(row: Row, tok: Any, max_length: int, label_ids: dict[str, int], tf: str, lf: str | None) -> Feature:
    ids = tok(row.values[tf], truncation=True, max_length=max_length)["input_ids"]
    if tok.eos_token_id is not None and len(ids) < max_length and (not ids or ids[-1] != tok.eos_token_id):
        ids = [*ids, tok.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}


def _label_id(row: Row, field: str, value: Any, label_ids: dict[str, int]) -> int:
    if str(value) not in label_ids:
        raise CliError(f"line {row.line}: field {field!r} has label {value!r}, which the training data does not "
                       f"have; known labels: {', '.join(label_ids)}")
    return label_ids[str(value)]


def _encode_seq_cls(row: Row, tok: Any, max_length: int, label_ids: dict[str, int], tf: str, lf: str | None) -> Feature:
    assert lf is not None
    ids = tok(row.values[tf], truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": ids, "labels": _label_id(row, lf, row.values[lf], label_ids)}


def _encode_token_cls(row: Row, tok: Any, max_length: int, label_ids: dict[str, int], tf: str, lf: str | None) -> Feature:
    assert lf is not None
    words = row.values[tf].split() if isinstance(row.values[tf], str) else row.values[tf]
    tags = row.values[lf]
    if len(tags) != len(words):
        raise CliError(f"line {row.line}: field {lf!r} has {len(tags)} labels for {len(words)} words in {tf!r}")
    enc = tok(words, is_split_into_words=True, truncation=True, max_length=max_length)
    labels, previous = [], None
    for word in enc.word_ids():
        labels.append(-100 if word is None or word == previous else _label_id(row, lf, tags[word], label_ids))
        previous = word
    return {"input_ids": enc["input_ids"], "labels": labels}


def _encode_seq2seq(row: Row, tok: Any, max_length: int, label_ids: dict[str, int], tf: str, lf: str | None) -> Feature:
    assert lf is not None
    ids = tok(row.values[tf], truncation=True, max_length=max_length)["input_ids"]
    target = tok(text_target=row.values[lf], truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": ids, "labels": target}


def _encode_qa(row: Row, tok: Any, max_length: int, label_ids: dict[str, int], tf: str, lf: str | None) -> Feature:
    assert lf is not None
    context, answer = row.values["context"], row.values[lf]
    start = context.find(answer)
    if start < 0:
        raise CliError(f"line {row.line}: field {lf!r} ({answer!r:.40}) does not occur in field 'context'")
    end = start + len(answer)
    enc = tok(row.values[tf], context, truncation="only_second", max_length=max_length, return_offsets_mapping=True)
    context_tokens = [(i, a, b) for i, ((a, b), seq) in enumerate(zip(enc["offset_mapping"], enc.sequence_ids()))
                      if seq == 1 and b > a]
    start_tok = next((i for i, _, b in context_tokens if b > start), None)  # first token ending after the start
    end_tok = max((i for i, a, _ in context_tokens if a < end), default=None)  # last token starting before the end
    if start_tok is None or end_tok is None or end_tok < start_tok or context_tokens[-1][2] < end:
        start_tok = end_tok = 0  # an answer cut off by truncation points at the first token, as usual
    return {"input_ids": enc["input_ids"], "start_positions": start_tok, "end_positions": end_tok}


def _encode_pair(row: Row, tok: Any, max_length: int, label_ids: dict[str, int], tf: str, lf: str | None) -> Feature:
    assert lf is not None
    return {"input_ids": tok(row.values[tf], truncation=True, max_length=max_length)["input_ids"],
            "pair_ids": tok(row.values[lf], truncation=True, max_length=max_length)["input_ids"]}


TASK_SPECS: dict[str, Task] = {
    "causal-lm": Task("causal-lm", "text", None, lambda t, lab: {t: D.is_text}, _encode_causal),
    "seq-cls": Task("seq-cls", "text", "label", lambda t, lab: {t: D.is_text, lab: D.is_label}, _encode_seq_cls,
                    classes=True),
    "token-cls": Task("token-cls", "tokens", "tags", lambda t, lab: {t: D.is_words, lab: D.is_token_labels},
                      _encode_token_cls, classes=True),
    "seq2seq-lm": Task("seq2seq-lm", "text", "target", lambda t, lab: {t: D.is_text, lab: D.is_text},
                       _encode_seq2seq),
    "question-ans": Task("question-ans", "question", "answer",
                         lambda t, lab: {t: D.is_text, "context": D.is_text, lab: D.is_text}, _encode_qa),
    "feature-extraction": Task("feature-extraction", "text", "pair", lambda t, lab: {t: D.is_text, lab: D.is_text},
                               _encode_pair),
}


# ---------------------------------------------------------------------------------------------------- batching
def _pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """``(batch, max_len)`` right-padded with ``value``."""
    width = max(len(s) for s in seqs)
    return torch.tensor([[*s, *([value] * (width - len(s)))] for s in seqs], dtype=torch.long)


def collate(features: Sequence[Feature], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch features: ``input_ids``/``pair_ids`` padded with ``pad_id`` (+ attention masks), label sequences
    padded with -100 (pad positions of causal-LM labels too), scalars stacked."""
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if key in ("input_ids", "pair_ids"):
            ids = _pad(values, pad_id)
            mask = _pad([[1] * len(v) for v in values], 0)
            batch[key] = ids
            batch["attention_mask" if key == "input_ids" else "pair_attention_mask"] = mask
        elif isinstance(values[0], list):
            batch[key] = _pad(values, -100)
        else:
            batch[key] = torch.tensor(values, dtype=torch.long)
    return batch


# ---------------------------------------------------------------------------------------------------- scoring
@dataclass
class StepResult:
    """Loss of one batch and, for classifiers, how many predictions were right out of how many."""

    loss: torch.Tensor
    correct: int = 0
    total: int = 0
    examples: int = 0


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``hidden: (batch, seq, dim)``, ``mask: (batch, seq)`` -> ``(batch, dim)`` mean over unmasked positions."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def forward_step(task: str, model: Any, batch: dict[str, torch.Tensor]) -> StepResult:
    """Run ``model`` on ``batch`` and score it for ``task``."""
    n = int(batch["input_ids"].shape[0])
    if task == "feature-extraction":
        return _contrastive_step(model, batch, n)
    out = model(**batch)
    result = StepResult(out.loss, examples=n)
    if task in ("seq-cls", "token-cls"):
        pred = out.logits.argmax(-1)
        labels = batch["labels"]
        if pred.shape[-1] != labels.shape[-1] and pred.dim() == labels.dim():  # prompt tokens prepended
            pred = pred[..., -labels.shape[-1]:]
        valid = labels != -100
        result.correct = int(((pred == labels) & valid).sum())
        result.total = int(valid.sum())
    return result


def _contrastive_step(model: Any, batch: dict[str, torch.Tensor], n: int) -> StepResult:
    """In-batch-negatives loss: row i's text should be closest (cosine, scale 20) to row i's pair."""
    a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    b = model(input_ids=batch["pair_ids"], attention_mask=batch["pair_attention_mask"]).last_hidden_state
    a = _mean_pool(a[:, -batch["attention_mask"].shape[1]:], batch["attention_mask"])
    b = _mean_pool(b[:, -batch["pair_attention_mask"].shape[1]:], batch["pair_attention_mask"])
    sims = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T * 20.0
    target = torch.arange(n)
    loss = torch.nn.functional.cross_entropy(sims, target)
    return StepResult(loss, int((sims.argmax(-1) == target).sum()), n, n)
