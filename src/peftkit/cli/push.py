"""``peftkit push``: upload a saved adapter directory to the Hugging Face Hub (``huggingface_hub``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .common import CliError, _one_line, read_json, require_adapter_dir

#: what a training run leaves in its output directory that does not belong in the uploaded adapter
SKIPPED_PREFIXES = ("checkpoint", ".")


def files_to_upload(directory: Path) -> list[Path]:
    """The files of an adapter directory to upload, relative to it: everything except training checkpoints
    (``checkpoint*``) and hidden entries, at any depth."""
    return sorted(p.relative_to(directory) for p in directory.rglob("*")
                  if p.is_file() and not any(part.startswith(SKIPPED_PREFIXES)
                                             for part in p.relative_to(directory).parts))


def _is_local(ref: str | None) -> bool:
    return bool(ref) and (os.path.isabs(str(ref)) or str(ref).startswith((".", "~")) or os.path.exists(str(ref)))


def _copier(directory: Path, files: list[Path], base_model: str | None) -> Any:
    """``save(tmp_dir)`` for ``serialization.hub.push_to_hub``: copy ``files``; with ``base_model`` the copied
    ``adapter_config.json`` files name it as ``base_model_name_or_path``."""

    def save(tmp_dir: str) -> None:
        for rel in files:
            target = Path(tmp_dir, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(directory / rel, target)
            if base_model and rel.name == "adapter_config.json":
                config = json.loads(target.read_text(encoding="utf-8"))
                config["base_model_name_or_path"] = base_model
                target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    return save


def _hint(exc: BaseException) -> str:
    from huggingface_hub.errors import LocalTokenNotFoundError

    if isinstance(exc, LocalTokenNotFoundError) or "401" in str(exc) or "403" in str(exc):
        return " (log in with `hf auth login`, set HF_TOKEN, or pass --token)"
    return ""


def push(directory: str, repo_id: str, private: bool = False, token: str | None = None,
         commit_message: str | None = None, base_model: str | None = None, echo: Any = print,
         warn: Any = print) -> str:
    """Upload the adapter in ``directory`` to the Hub model repo ``repo_id`` (created if needed) as one commit;
    returns the commit URL. Every failure (bad repo id, no token, network, permissions) is a one-line
    :class:`CliError`."""
    from huggingface_hub.utils import validate_repo_id

    from ..serialization.hub import push_to_hub

    path = require_adapter_dir(directory)
    try:
        validate_repo_id(repo_id)
    except ValueError as exc:
        raise CliError(f"{repo_id!r} is not a valid Hub repo id ({_one_line(exc)[:160]}); "
                       "use NAME or USER_OR_ORG/NAME") from None
    recorded = read_json(path / "adapter_config.json").get("base_model_name_or_path")
    if base_model is None and _is_local(recorded):
        warn(f"note: the adapter's base model is the local path {recorded!r}; users of {repo_id} will need "
             "--model (or push with --base-model HUB_ID)")
    files = files_to_upload(path)
    try:
        info = push_to_hub(_copier(path, files, base_model), repo_id, private=True if private else None,
                           token=token, commit_message=commit_message or "Upload adapter with peftkit")
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot push to {repo_id!r}: {_one_line(exc)[:300]}{_hint(exc)}") from None
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    echo(f"pushed {len(files)} files from {path} to https://huggingface.co/{repo_id} ({url})")
    return str(url)
