"""A small model card (``README.md``) with the YAML header the Hub and the reference read."""

from __future__ import annotations

import os

from ..config import PEFTKIT_VERSION, PeftConfig
from ..fileio import atomic_write_text

_PIPELINE_TAGS = {"CAUSAL_LM": "text-generation"}


def is_local_path(ref: str) -> bool:
    """Whether ``ref`` (a ``base_model_name_or_path``) is a local path rather than a Hub id (``owner/name``)."""
    return (os.path.isabs(ref) or ref.startswith((".", "~")) or ref.count("/") > 1 or "\\" in ref
            or os.path.exists(ref))


def render_model_card(configs: dict[str, PeftConfig], is_transformers: bool, quantization: dict | None = None) -> str:
    """README text: header (``base_model``, ``library_name: peft``, tags), a short body, framework versions.

    A base model loaded from a local directory is named in the body by the directory's name only: the card is
    meant to be shared, and an absolute path would publish the author's file system (``adapter_config.json`` keeps
    the full path, which loading needs).
    """
    first = next(iter(configs.values()))
    base = first.base_model_name_or_path
    local_base = os.path.basename(os.path.normpath(base)) if base and is_local_path(base) else None
    if local_base is not None:
        base = None
    tags = {f"base_model:adapter:{base}"} if base else set()
    tags.update(str(c.peft_type).lower() for c in configs.values() if c.peft_type is not None)
    if is_transformers:
        tags.add("transformers")
    lines = ["---"]
    if base:
        lines.append(f"base_model: {base}")
    lines.append("library_name: peft")
    pipeline = _PIPELINE_TAGS.get(str(first.task_type))
    if pipeline:
        lines.append(f"pipeline_tag: {pipeline}")
    lines.append("tags:")
    lines += [f"- {tag}" for tag in sorted(tags)]
    lines += ["---", "", "# Adapter", ""]
    if local_base is not None:
        lines += [f"Base model: a local directory `{local_base}`.", ""]
    for name, cfg in configs.items():
        lines.append(f"- `{name}`: {cfg.peft_type} adapter, task type {cfg.task_type}")
    if quantization:
        lines += ["", "## Training procedure", "",
                  "The following `bitsandbytes` quantization config was used during training:"]
        lines += [f"- {k}: {v}" for k, v in quantization.items()]
    lines += ["", "### Framework versions", "", f"- peftkit {PEFTKIT_VERSION}", ""]
    return "\n".join(lines)


def write_model_card(directory: str, text: str) -> None:
    """Write ``README.md`` unless the directory already has one (a user's card is never overwritten)."""
    path = os.path.join(directory, "README.md")
    if not os.path.exists(path):
        atomic_write_text(path, text)


def card_for_hub(text: str, tags: list[str] | None = None) -> str:
    """The model card ``text`` made ready for upload: ``tags`` merged into the header's ``tags`` list, and a
    ``base_model`` that is a local path (which the Hub rejects as metadata) dropped with its ``base_model:`` tag.

    A card without a YAML header (a user's own) gets a header holding only ``library_name: peft`` and the tags.
    """
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        text = "---\nlibrary_name: peft\n---\n" + text
    header, body = text[4:].split("\n---\n", 1)
    kept: list[str] = []
    found: list[str] = []
    in_tags = False
    local_base = False
    for line in header.splitlines():
        if line.startswith("base_model:"):
            local_base = is_local_path(line.split(":", 1)[1].strip())
            if local_base:
                continue
        if line == "tags:":
            in_tags = True
            continue
        if in_tags and line.startswith("- "):
            found.append(line[2:].strip())
            continue
        in_tags = False
        kept.append(line)
    merged = set(found) | set(tags or ())
    if local_base:
        merged = {t for t in merged if not t.startswith("base_model:")}
    if merged:
        kept += ["tags:", *[f"- {tag}" for tag in sorted(merged)]]
    return "---\n" + "\n".join(kept) + "\n---\n" + body
