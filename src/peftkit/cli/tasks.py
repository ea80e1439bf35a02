"""What each task reads from a row, how it is tokenised and batched, and how loss and accuracy are computed.

One :class:`Task` per CLI task name; ``TASK_SPECS[name]`` is looked up by the commands, never branched on.

Row formats (field names are the defaults of ``--text-field`` / ``--label-field``; ``data.ROW_FORMATS`` says the
same for ``--help``):

* ``causal-lm``, one of (``--format``, detected from the first row's fields by default):

  - ``text``: ``{"text": str}`` -- next-token prediction on the whole text;
  - ``alpaca``: ``{"instruction": str, "input": str (optional), "output": str}`` -- the prompt is the standard
    alpaca template around instruction and input, the completion is ``output``;
  - ``messages``: ``{"messages": [{"role": ..., "content": ...}, ...]}`` (or sharegpt's
    ``{"conversations": [{"from": "human" | "gpt" | "system", "value": ...}]}``), rendered with the tokenizer's
    chat template (or ``--chat-template``); only the assistant turns are learned;
  - ``prompt-completion``: ``{"prompt": str, "completion": str}`` (or both lists of turns, rendered as chat).

  The prompt is masked out of the loss (labels -100) unless ``DataOptions.train_on_prompt``; ``packing`` fills
  blocks of ``max_length`` tokens with whole examples (:func:`pack`).
* ``seq-cls``: ``{"text": str, "label": str | int}``.
* ``token-cls``: ``{"tokens": [word, ...] | str, "tags": [label, ...]}`` -- one label per word.
* ``seq2seq-lm``: ``{"text": source, "target": str}``.
* ``question-ans``: ``{"question": str, "context": str, "answer": str}`` -- the answer is a span of the context.
* ``feature-extraction``: ``{"text": str, "pair": str}`` -- pairs of related texts; trained contrastively
  (in-batch negatives on mean-pooled embeddings), accuracy = the pair is its text's nearest neighbour.

Entry points for a training command: :func:`load_rows` (read and check a source for a task), :func:`encode_rows`
(tokenise, then pack when asked) and :func:`collate` (a batch of features).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import data as D
from .common import CliError
from .data import Row

Feature = dict[str, Any]
#: a piece of an example's text and whether it is learned (``True``) or only read (the prompt)
Segment = tuple[str, bool]

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------- options
#: ``--format`` spellings -> causal-LM row format
FORMAT_NAMES: dict[str, str] = {
    "auto": "auto", "text": "text", "alpaca": "alpaca", "messages": "messages", "sharegpt": "messages",
    "chat": "messages", "prompt-completion": "prompt-completion", "completion": "prompt-completion",
}


@dataclass(frozen=True)
class DataOptions:
    """How causal-LM rows become examples.

    Attributes:
        format: ``auto`` (from the fields of the first row), ``text``, ``alpaca``, ``messages`` (alias
            ``sharegpt``, ``chat``) or ``prompt-completion``.
        train_on_prompt: learn the whole text, prompt included (default: the prompt's labels are -100).
        chat_template: a Jinja chat template, or the path of a file holding one; used instead of the
            tokenizer's for ``messages`` rows.
        packing: fill blocks of ``max_length`` tokens with whole examples (:func:`pack`).
    """

    format: str = "auto"
    train_on_prompt: bool = False
    chat_template: str | None = None
    packing: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMAT_NAMES:
            raise CliError(f"--format {self.format!r} is not known; allowed: {', '.join(FORMAT_NAMES)}")
        object.__setattr__(self, "format", FORMAT_NAMES[self.format])
        if self.chat_template is not None:
            object.__setattr__(self, "chat_template", _read_template(self.chat_template))

    def non_default(self) -> list[str]:
        """The options set away from their defaults, as CLI flags (for 'applies to causal-lm only' errors)."""
        flags = {"--format": self.format != "auto", "--train-on-prompt": self.train_on_prompt,
                 "--chat-template": self.chat_template is not None, "--packing": self.packing}
        return [flag for flag, changed in flags.items() if changed]


def _read_template(value: str) -> str:
    """A chat template given as Jinja text or as a file path."""
    if "{%" in value or "{{" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise CliError(f"--chat-template {value!r} is neither a file nor a Jinja template (no '{{%' or '{{{{')")
    text = path.read_text(encoding="utf-8")
    if "{%" not in text and "{{" not in text:
        raise CliError(f"--chat-template file {value!r} holds no Jinja template (no '{{%' or '{{{{')")
    return text


DEFAULT_OPTIONS = DataOptions()


@dataclass(frozen=True)
class Task:
    """How one task reads, encodes, batches and scores rows.

    Attributes:
        text_field / label_field: default field names; ``label_field`` None when the task has no label.
        checks: ``(text_field, label_field[, options]) -> {field: check}`` (or a function of the first row returning
            it) used by ``data.read_rows``.
        encode: ``(row, tokenizer, max_length, label_ids, text_field, label_field[, options]) -> feature`` (lists
            of ints).
        classes: whether labels are class names (a label vocabulary is built and accuracy reported).
        row_format: the fields of a row, in words (``--help``, README).
        prompt_masked: labels are per-token with the prompt at -100; an example left with no learned token (its
            prompt fills ``max_length``) is dropped by :func:`encode_rows`.
    """

    name: str
    text_field: str
    label_field: str | None
    checks: Callable[..., Any]
    encode: Callable[..., Feature]
    classes: bool = False
    extra_fields: tuple[str, ...] = ()
    row_format: str = ""
    prompt_masked: bool = False


# ---------------------------------------------------------------------------------------------------- causal LM
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

#: speaker names of chat turns (sharegpt's ``from`` and ``role``) -> chat-template roles
ROLE_NAMES: dict[str, str] = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "bot": "assistant", "chatgpt": "assistant", "system": "system", "tool": "tool",
}
#: fields that may hold the chat turns of a ``messages`` row, after ``--text-field``
MESSAGE_FIELDS = ("messages", "conversations")


def alpaca_prompt(values: dict[str, Any]) -> str:
    """The standard alpaca prompt of a row (with or without its ``input``)."""
    extra = values.get("input")
    template = ALPACA_PROMPT if isinstance(extra, str) and extra.strip() else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=values["instruction"], input=extra)


def _turn(turn: dict[str, Any]) -> tuple[Any, Any] | None:
    """``(role, content)`` of a ``{role, content}`` or sharegpt ``{from, value}`` turn; None for neither."""
    if "role" in turn and "content" in turn:
        return turn["role"], turn["content"]
    if "from" in turn and "value" in turn:
        return turn["from"], turn["value"]
    return None


def check_turns(value: Any) -> str | None:
    """Error text when ``value`` is not a non-empty list of chat turns with string speakers and contents."""
    if not isinstance(value, list) or not value:
        return f"must be a non-empty list of turns ({{role, content}} or {{from, value}}), got {type(value).__name__}"
    for i, turn in enumerate(value):
        pair = _turn(turn) if isinstance(turn, dict) else None
        if pair is None:
            got = f"keys {', '.join(turn) or 'none'}" if isinstance(turn, dict) else type(turn).__name__
            return f"turn {i}: expected {{role, content}} or {{from, value}}, got {got}"
        role, content = pair
        if not isinstance(role, str) or not isinstance(content, str):
            return f"turn {i}: role and content must be strings, got {type(role).__name__}, {type(content).__name__}"
        if "from" in turn and "role" not in turn and role.lower() not in ROLE_NAMES:
            return f"turn {i}: speaker {role!r} is not known; allowed: {', '.join(ROLE_NAMES)}"
    return None


def check_chat(value: Any) -> str | None:
    """:func:`check_turns`, and at least one assistant turn to learn."""
    error = check_turns(value)
    if error is None and "assistant" not in [t["role"] for t in normalise_turns(value)]:
        return "has no assistant turn to learn (speakers: " + ", ".join(str(_turn(t)[0]) for t in value) + ")"
    return error


def _check_prompt_part(value: Any) -> str | None:
    return check_turns(value) if isinstance(value, list) else D.is_text(value)


def normalise_turns(turns: list[dict[str, Any]]) -> list[dict[str, str]]:
    """``[{role, content}]`` with sharegpt speakers mapped to chat-template roles (``gpt`` -> ``assistant``)."""
    out = []
    for turn in turns:
        role, content = _turn(turn)  # type: ignore[misc]
        out.append({"role": ROLE_NAMES.get(role.lower(), role), "content": content})
    return out


def messages_field(values: dict[str, Any], text_field: str) -> str | None:
    """The field of a row holding its chat turns (``--text-field`` first, then messages/conversations)."""
    return next((f for f in (text_field, *MESSAGE_FIELDS) if isinstance(values.get(f), list)), None)


def detect_format(row: Row, text_field: str) -> str:
    """The causal-LM format of a row from its fields: messages, then alpaca, prompt-completion, text."""
    values = row.values
    if messages_field(values, text_field):
        return "messages"
    if "instruction" in values and "output" in values:
        return "alpaca"
    if "prompt" in values and "completion" in values:
        return "prompt-completion"
    if text_field in values:
        return "text"
    partial = next((fmt for key, fmt in (("instruction", "alpaca"), ("prompt", "prompt-completion")) if key in values),
                   None)
    if partial:  # checked as that format: the error names the missing field
        return partial
    raise CliError(f"{row.where}: cannot tell the row format from its fields ({', '.join(values) or 'none'}); "
                   f"expected {text_field!r} (text), instruction/input/output (alpaca), messages or conversations "
                   "(chat), or prompt/completion; or choose the field with --text-field or the format with --format")


def causal_checks(text_field: str, label_field: str | None = None,
                  options: DataOptions | None = None) -> Callable[[Row], dict[str, D.Check]]:
    """Checks of causal-LM rows: the format forced by ``options`` or detected from the first row."""
    forced = (options or DEFAULT_OPTIONS).format

    def for_first_row(row: Row) -> dict[str, D.Check]:
        fmt = forced if forced != "auto" else detect_format(row, text_field)
        checks = CAUSAL_FORMATS[fmt].checks(row, text_field)
        if fmt == "text":
            return checks
        how = "--format" if forced != "auto" else "the first row's fields"
        hint = f"the rows are read as {fmt} (from {how}); choose the format with --format"
        return {field: D.hinted(check, hint) for field, check in checks.items()}

    return for_first_row


def _chat_template(tok: Any, options: DataOptions, where: str) -> str:
    template = options.chat_template or getattr(tok, "chat_template", None)
    if not template:
        raise CliError(f"{where}: chat rows need a chat template and the tokenizer has none; pass --chat-template "
                       "<file.jinja or template text>, or a --tokenizer that has one")
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default") or next(iter(template.values()))
    return template


def _render(tok: Any, turns: list[dict[str, str]], template: str, where: str, generation_prompt: bool = False) -> str:
    from jinja2 import TemplateError

    try:
        return tok.apply_chat_template(turns, chat_template=template, tokenize=False,
                                       add_generation_prompt=generation_prompt)
    except (TemplateError, ValueError, TypeError) as exc:  # also the template's raise_exception (roles alternate)
        raise CliError(f"{where}: the chat template failed on this conversation "
                       f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None


def chat_segments(tok: Any, turns: list[dict[str, str]], learned: Sequence[int], template: str,
                  where: str) -> list[Segment]:
    """The rendered conversation cut into read and learned pieces: turn ``i in learned`` is learned from the end of
    the generation prompt before it to the end of its rendering (end-of-turn tokens included).

    A template that renders a turn differently once more turns follow (reasoning dropped from earlier answers) has
    that turn learned where its content appears as given, and not learned where it does not."""
    full = _render(tok, turns, template, where)
    spans: list[tuple[int, int]] = []
    for i in learned:
        span = _turn_span(tok, turns, i, template, where, full, spans[-1][1] if spans else 0)
        if span is not None:
            spans.append(span)
    if not spans:
        raise CliError(f"{where}: the chat template does not render the turns to learn as given; pass "
                       "--train-on-prompt to learn the whole text")
    segments: list[Segment] = []
    cursor = 0
    for start, end in spans:
        segments += [(full[cursor:start], False), (full[start:end], True)]
        cursor = end
    return [*segments, (full[cursor:], False)]


def _turn_span(tok: Any, turns: list[dict[str, str]], i: int, template: str, where: str, full: str,
               cursor: int) -> tuple[int, int] | None:
    """``(start, end)`` of turn ``i`` in the rendering ``full`` of all turns, searched from ``cursor``."""
    before = _render(tok, turns[:i], template, where, generation_prompt=True) if i else ""
    upto = _render(tok, turns[:i + 1], template, where)
    if full.startswith(upto) and upto.startswith(before) and len(before) >= cursor:
        return len(before), len(upto)
    start = full.find(turns[i]["content"], cursor)
    return None if start < 0 else (start, start + len(turns[i]["content"]))


def _segments_messages(row: Row, tok: Any, tf: str, options: DataOptions) -> list[Segment]:
    turns = normalise_turns(row.values[messages_field(row.values, tf) or MESSAGE_FIELDS[0]])
    learned = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
    return chat_segments(tok, turns, learned, _chat_template(tok, options, row.where), row.where)


def _segments_prompt_completion(row: Row, tok: Any, tf: str, options: DataOptions) -> list[Segment]:
    prompt, completion = row.values["prompt"], row.values["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):
        turns = normalise_turns([*prompt, *completion])
        learned = range(len(prompt), len(turns))
        return chat_segments(tok, turns, learned, _chat_template(tok, options, row.where), row.where)
    if isinstance(prompt, list) or isinstance(completion, list):
        raise CliError(f"{row.where}: fields 'prompt' and 'completion' must both be strings or both lists of turns")
    return [(prompt, False), (completion, True)]


@dataclass(frozen=True)
class CausalFormat:
    """One causal-LM row format.

    Attributes:
        checks: ``(first row, text_field) -> {field: check}`` for ``data.read_rows``.
        segments: ``(row, tokenizer, text_field, options) -> [(text, learned), ...]``.
        plain: plain text (the tokenizer adds its special tokens at the start and EOS is appended), or a rendered
            chat (the template wrote every special token).
    """

    checks: Callable[[Row, str], dict[str, D.Check]]
    segments: Callable[[Row, Any, str, DataOptions], list[Segment]]
    plain: bool = True


CAUSAL_FORMATS: dict[str, CausalFormat] = {
    "text": CausalFormat(lambda row, tf: {tf: D.is_text},
                         lambda row, tok, tf, o: [(row.values[tf], True)]),
    "alpaca": CausalFormat(lambda row, tf: {"instruction": D.is_text, "input": D.optional(D.is_text),
                                            "output": D.is_text},
                           lambda row, tok, tf, o: [(alpaca_prompt(row.values), False), (row.values["output"], True)]),
    "messages": CausalFormat(lambda row, tf: {messages_field(row.values, tf) or MESSAGE_FIELDS[0]: check_chat},
                             _segments_messages, plain=False),
    "prompt-completion": CausalFormat(lambda row, tf: {"prompt": _check_prompt_part, "completion": _check_prompt_part},
                                      _segments_prompt_completion),
}


def tokenize_segments(tok: Any, segments: Sequence[Segment], max_length: int, plain: bool,
                      train_on_prompt: bool = False) -> Feature:
    """``{"input_ids", "labels"}`` of ``segments`` tokenised one by one (as a prompt is tokenised alone at
    generation): labels equal the ids on learned pieces and are -100 on read ones (unless ``train_on_prompt``).
    Plain text gets the tokenizer's special tokens at the start and EOS (learned) at the end; cut to
    ``max_length`` tokens."""
    ids: list[int] = []
    labels: list[int] = []
    for text, learned in segments:
        if not text:
            continue
        piece = tok(text, add_special_tokens=plain and not ids)["input_ids"]
        ids += piece
        labels += piece if learned or train_on_prompt else [IGNORE_INDEX] * len(piece)
    eos = tok.eos_token_id
    if plain and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def _encode_causal(row: Row, tok: Any, max_length: int, label_ids: dict[str, int], tf: str, lf: str | None,
                   options: DataOptions | None = None) -> Feature:
    options = options or DEFAULT_OPTIONS
    fmt = CAUSAL_FORMATS[options.format if options.format != "auto" else detect_format(row, tf)]
    return tokenize_segments(tok, fmt.segments(row, tok, tf, options), max_length, fmt.plain,
                             options.train_on_prompt)


# ---------------------------------------------------------------------------------------------------- other tasks
def _label_id(row: Row, field: str, value: Any, label_ids: dict[str, int]) -> int:
    if str(value) not in label_ids:
        raise CliError(f"{row.where}: field {field!r} has label {value!r}, which the training data does not "
                       f"have; known labels: {', '.join(label_ids)}")
    return label_ids[str(value)]


def _encode_seq_cls(row: Row, tok: Any, max_length: int, label_ids: dict[str, int], tf: str, lf: str | None,
                    options: DataOptions | None = None) -> Feature:
    assert lf is not None
    ids = tok(row.values[tf], truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": ids, "labels": _label_id(row, lf, row.values[lf], label_ids)}


def _encode_token_cls(row: Row, tok: Any, max_length: int, label_ids: dict[str, int], tf: str, lf: str | None,
                      options: DataOptions | None = None) -> Feature:
    assert lf is not None
    words = row.values[tf].split() if isinstance(row.values[tf], str) else row.values[tf]
    tags = row.values[lf]
    if len(tags) != len(words):
        raise CliError(f"{row.where}: field {lf!r} has {len(tags)} labels for {len(words)} words in {tf!r}")
    enc = tok(words, is_split_into_words=True, truncation=True, max_length=max_length)
    labels, previous = [], None
    for word in enc.word_ids():
        labels.append(-100 if word is None or word == previous else _label_id(row, lf, tags[word], label_ids))
        previous = word
    return {"input_ids": enc["input_ids"], "labels": labels}


def _encode_seq2seq(row: Row, tok: Any, max_length: int, label_ids: dict[str, int], tf: str, lf: str | None,
                    options: DataOptions | None = None) -> Feature:
    assert lf is not None
    ids = tok(row.values[tf], truncation=True, max_length=max_length)["input_ids"]
    target = tok(text_target=row.values[lf], truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": ids, "labels": target}


def _encode_qa(row: Row, tok: Any, max_length: int, label_ids: dict[str, int], tf: str, lf: str | None,
               options: DataOptions | None = None) -> Feature:
    assert lf is not None
    context, answer = row.values["context"], row.values[lf]
    start = context.find(answer)
    if start < 0:
        raise CliError(f"{row.where}: field {lf!r} ({answer!r:.40}) does not occur in field 'context'")
    end = start + len(answer)
    enc = tok(row.values[tf], context, truncation="only_second", max_length=max_length, return_offsets_mapping=True)
    context_tokens = [(i, a, b) for i, ((a, b), seq) in enumerate(zip(enc["offset_mapping"], enc.sequence_ids()))
                      if seq == 1 and b > a]
    start_tok = next((i for i, _, b in context_tokens if b > start), None)  # first token ending after the start
    end_tok = max((i for i, a, _ in context_tokens if a < end), default=None)  # last token starting before the end
    if start_tok is None or end_tok is None or end_tok < start_tok or context_tokens[-1][2] < end:
        start_tok = end_tok = 0  # an answer cut off by truncation points at the first token, as usual
    return {"input_ids": enc["input_ids"], "start_positions": start_tok, "end_positions": end_tok}


def _encode_pair(row: Row, tok: Any, max_length: int, label_ids: dict[str, int], tf: str, lf: str | None,
                 options: DataOptions | None = None) -> Feature:
    assert lf is not None
    return {"input_ids": tok(row.values[tf], truncation=True, max_length=max_length)["input_ids"],
            "pair_ids": tok(row.values[lf], truncation=True, max_length=max_length)["input_ids"]}


def _fields(**checks: D.Check) -> Callable[..., dict[str, D.Check]]:
    """Checks of a task whose fields are fixed: ``text``/``label`` stand for the text and label field names."""

    def build(text_field: str, label_field: str | None, options: DataOptions | None = None) -> dict[str, D.Check]:
        names = {"text": text_field, "label": label_field}
        return {names.get(k) or k: check for k, check in checks.items()}

    return build


TASK_SPECS: dict[str, Task] = {
    "causal-lm": Task("causal-lm", "text", None, causal_checks, _encode_causal,
                      row_format=D.ROW_FORMATS["causal-lm"], prompt_masked=True),
    "seq-cls": Task("seq-cls", "text", "label", _fields(text=D.is_text, label=D.is_label), _encode_seq_cls,
                    classes=True, row_format=D.ROW_FORMATS["seq-cls"]),
    "token-cls": Task("token-cls", "tokens", "tags", _fields(text=D.is_words, label=D.is_token_labels),
                      _encode_token_cls, classes=True, row_format=D.ROW_FORMATS["token-cls"]),
    "seq2seq-lm": Task("seq2seq-lm", "text", "target", _fields(text=D.is_text, label=D.is_text), _encode_seq2seq,
                       row_format=D.ROW_FORMATS["seq2seq-lm"]),
    "question-ans": Task("question-ans", "question", "answer",
                         _fields(text=D.is_text, context=D.is_text, label=D.is_text), _encode_qa,
                         row_format=D.ROW_FORMATS["question-ans"]),
    "feature-extraction": Task("feature-extraction", "text", "pair", _fields(text=D.is_text, label=D.is_text),
                               _encode_pair, row_format=D.ROW_FORMATS["feature-extraction"]),
}


# ---------------------------------------------------------------------------------------------- reading + encoding
def _check_task_options(task: str, options: DataOptions) -> None:
    changed = options.non_default()
    if task != "causal-lm" and changed:
        raise CliError(f"{changed[0]} applies to --task causal-lm only, not {task}")


def load_rows(source: str | Path, task: str, text_field: str | None = None, label_field: str | None = None,
              options: DataOptions | None = None) -> list[Row]:
    """The checked rows of a data source (file, ``save_to_disk`` directory or Hub id) for ``task``."""
    spec = TASK_SPECS[task]
    options = options or DEFAULT_OPTIONS
    _check_task_options(task, options)
    return D.read_rows(source, spec.checks(text_field or spec.text_field, label_field or spec.label_field, options))


def encode_rows(rows: Sequence[Row], task: str, tokenizer: Any, max_length: int, label_ids: dict[str, int],
                text_field: str | None = None, label_field: str | None = None, options: DataOptions | None = None,
                source: str | Path | None = None) -> list[Feature]:
    """Features of ``rows`` for ``task`` (errors name ``source`` and the row); packed into blocks of
    ``max_length`` tokens when ``options.packing``."""
    spec = TASK_SPECS[task]
    options = options or DEFAULT_OPTIONS
    tf, lf = text_field or spec.text_field, label_field or spec.label_field
    name = D.source_name(str(source)) if source is not None else "data"
    prefix = f"{name} " if source is not None else ""
    features = []
    for row in rows:
        try:
            features.append(spec.encode(row, tokenizer, max_length, label_ids, tf, lf, options))
        except CliError as exc:
            raise CliError(f"{prefix}{exc}") from None
    if spec.prompt_masked:
        features = _drop_unlearned(features, rows, name, max_length)
    if options.packing:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        features = pack(features, max_length, pad_id)
    return features


def _drop_unlearned(features: list[Feature], rows: Sequence[Row], name: str, max_length: int) -> list[Feature]:
    """``features`` without those whose labels are all -100 (the prompt filled ``max_length``), said on stderr."""
    left_out = [row for feature, row in zip(features, rows) if all(t == IGNORE_INDEX for t in feature["labels"])]
    if not left_out:
        return features
    if len(left_out) == len(features):
        raise CliError(f"{name}: no example has a token to learn within --max-length {max_length} (the prompts "
                       "fill it); raise --max-length")
    logging.getLogger("peftkit.cli").warning(
        "%s: %d of %d examples (the first: %s) have no token to learn within --max-length %d (the prompt fills it); "
        "they are left out", name, len(left_out), len(features), left_out[0].where, max_length)
    return [f for f in features if any(t != IGNORE_INDEX for t in f["labels"])]


# ---------------------------------------------------------------------------------------------------- packing
def pack(features: Sequence[Feature], block_size: int, pad_id: int) -> list[Feature]:
    """Causal-LM features packed whole into blocks of exactly ``block_size`` tokens (best fit, longest first).

    Each block holds ``input_ids``, ``labels`` and ``position_ids`` (restarting at 0 at every example, so models
    whose masks read packed sequences from the positions keep the examples apart: transformers 5 does when the
    batch has no attention mask (:func:`collate` leaves it out) and the model runs without a KV cache
    (``model.config.use_cache = False`` for training); flash attention reads them too).

    Labels keep their -100 masks; each example's first label becomes -100 (an unpacked example's first token is
    never a target either), and the block is filled up with ``pad_id`` tokens labelled -100 at positions of their
    own. Examples longer than ``block_size`` are cut. Sizes: every block is ``(block_size,)`` per key.
    """
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    blocks: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, block index), sorted: the best fit is the first that fits
    for i in order:
        size = min(len(features[i]["input_ids"]), block_size)
        if size == 0:
            continue
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            blocks.append([i])
            left, b = block_size - size, len(blocks) - 1
        else:
            left, b = free.pop(at)
            blocks[b].append(i)
            left -= size
        bisect.insort(free, (left, b))
    return [_fill_block([features[i] for i in sorted(block)], block_size, pad_id) for block in blocks]


def _fill_block(members: Sequence[Feature], block_size: int, pad_id: int) -> Feature:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for feature in members:
        piece = feature["input_ids"][:block_size]
        ids += piece
        labels += [IGNORE_INDEX, *feature["labels"][1:len(piece)]]
        positions += range(len(piece))
    pad = block_size - len(ids)
    return {"input_ids": ids + [pad_id] * pad, "labels": labels + [IGNORE_INDEX] * pad,
            "position_ids": positions + list(range(pad))}


# ---------------------------------------------------------------------------------------------------- batching
def _pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """``(batch, max_len)`` right-padded with ``value``."""
    width = max(len(s) for s in seqs)
    return torch.tensor([[*s, *([value] * (width - len(s)))] for s in seqs], dtype=torch.long)


def collate(features: Sequence[Feature], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch features: ``input_ids``/``pair_ids`` padded with ``pad_id`` (+ attention masks), ``position_ids``
    with 0, label sequences padded with -100 (pad positions of causal-LM labels too), scalars stacked.

    Packed blocks (features with ``position_ids``, all of one length) get no attention mask: the model reads the
    example boundaries from the positions (see :func:`pack`)."""
    packed = "position_ids" in features[0] and len({len(f["input_ids"]) for f in features}) == 1
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if key in ("input_ids", "pair_ids"):
            batch[key] = _pad(values, pad_id)
            if not (packed and key == "input_ids"):
                mask = _pad([[1] * len(v) for v in values], 0)
                batch["attention_mask" if key == "input_ids" else "pair_attention_mask"] = mask
        elif key == "position_ids":
            batch[key] = _pad(values, 0)
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
