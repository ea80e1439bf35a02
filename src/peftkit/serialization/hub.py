"""Uploading adapters to the Hugging Face Hub (``push_to_hub``); reading from the Hub lives in ``fileio``."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .model_card import card_for_hub


def push_to_hub(
    save: Callable[[str], None],
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
) -> Any:
    """Create ``repo_id`` if needed (``exist_ok``), call ``save(tmp_dir)``, fix up its ``README.md`` for the Hub
    (``tags`` added, local-path ``base_model`` dropped: see ``card_for_hub``) and upload the folder as one commit.
    A ``README.md`` already in the repo is kept (with ``tags`` added) instead of the freshly written card.

    Returns what ``huggingface_hub.upload_folder`` returns (a ``CommitInfo``). Network and authentication errors are
    ``huggingface_hub``'s own.
    """
    import huggingface_hub

    repo = huggingface_hub.create_repo(repo_id, private=private, token=token, exist_ok=True, repo_type="model")
    repo_id = getattr(repo, "repo_id", None) or repo_id
    with tempfile.TemporaryDirectory() as tmp_dir:
        save(tmp_dir)
        card = Path(tmp_dir, "README.md")
        text = _existing_card(repo_id, token, revision)
        if text is None:
            text = card.read_text(encoding="utf-8") if card.is_file() else ""
        card.write_text(card_for_hub(text, tags), encoding="utf-8")
        return huggingface_hub.upload_folder(
            repo_id=repo_id,
            folder_path=os.fspath(tmp_dir),
            repo_type="model",
            commit_message=commit_message or "Upload model",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


def _existing_card(repo_id: str, token: bool | str | None, revision: str | None) -> str | None:
    """The ``README.md`` already in the Hub repo (at ``revision``), or None when there is none."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    try:
        path = huggingface_hub.hf_hub_download(repo_id, "README.md", token=token, revision=revision)
    except (EntryNotFoundError, RevisionNotFoundError):
        return None
    return Path(path).read_text(encoding="utf-8")
