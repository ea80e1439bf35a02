"""``peftkit chat``: an interactive conversation with an adapted causal LM, formatted by the tokenizer's chat
template and keeping the history; ``/exit`` (or Ctrl-D) quits, ``/reset`` forgets the history."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import typer

from .common import CliError, require_file
from .infer import Loaded, Sampling, generate_reply, load_adapter, task_of, tokenizer_for

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"

Message = dict[str, str]


def read_lines(interactive: bool) -> Iterator[str]:
    """Lines typed by the user (``input()`` with a prompt on a terminal, plain reads from a pipe) until end of
    input (Ctrl-D)."""
    while True:
        if interactive:
            try:
                yield input(">>> ")
            except EOFError:
                typer.echo("", err=True)
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
            yield line.rstrip("\r\n")


def _context_limit(loaded: Loaded) -> int | None:
    config = loaded.model.get_base_model().config
    return getattr(config, "max_position_embeddings", None)


def _fit(history: list[Message], encode: Callable[[list[Message]], Any], room: int | None,
         warn: Callable[[str], None]) -> Any:
    """The encoded conversation; while it leaves fewer than ``room`` positions, the oldest exchange after the
    system message is dropped from ``history`` (in place)."""
    encoding = encode(history)
    first = 1 if history and history[0]["role"] == "system" else 0
    while room is not None and encoding["input_ids"].shape[1] > room and len(history) - first > 1:
        del history[first:first + 2]
        warn("(the oldest exchange was dropped to fit the model's context)")
        encoding = encode(history)
    return encoding


def chat(directory: str, sampling: Sampling, model: str | None = None, system: str | None = None,
         chat_template: str | None = None, stream: bool = False, interactive: bool = False,
         lines: Iterator[str] | None = None, echo: Callable[[str], None] = print) -> list[Message]:
    """Answer each line of ``lines`` (default: stdin) with the adapted model, the whole conversation formatted by
    the tokenizer's chat template (or the Jinja file ``chat_template``); returns the final history."""
    loaded = load_adapter(directory, model)
    task_of(loaded, ("CAUSAL_LM",), "chat", "predict")
    tokenizer = tokenizer_for(loaded)
    if chat_template is not None:
        tokenizer.chat_template = require_file(chat_template, "chat template").read_text(encoding="utf-8")
    if not getattr(tokenizer, "chat_template", None):
        raise CliError(f"the tokenizer of {directory!r} has no chat template; pass --chat-template FILE (a Jinja "
                       "template) or use `peftkit generate`")
    if sampling.seed is not None:
        from transformers import set_seed

        set_seed(sampling.seed)
    start: list[Message] = [{"role": "system", "content": system}] if system else []
    history = list(start)
    if interactive:
        typer.echo(f"chatting with {directory} on {loaded.base_ref}; /exit or Ctrl-D quits, /reset forgets",
                   err=True)
    limit = _context_limit(loaded)
    room = None if limit is None else max(limit - sampling.max_new_tokens, 1)

    def encode(messages: list[Message]) -> Any:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)

    for line in lines if lines is not None else read_lines(interactive):
        text = line.strip()
        if text in EXIT_COMMANDS:
            break
        if text == RESET_COMMAND:
            history = list(start)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        encoding = _fit(history, encode, room, lambda m: typer.echo(m, err=True))
        reply = generate_reply(loaded, tokenizer, encoding, sampling, stream)
        if not stream:
            echo(reply)
        history.append({"role": "assistant", "content": reply})
    return history
