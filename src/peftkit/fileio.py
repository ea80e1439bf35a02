"""File helpers at the bottom layer: atomic writes and locating a file in a local directory or on the Hub."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import AdapterLoadError

#: Keyword arguments of ``hf_hub_download`` that callers may pass through ``**kwargs``.
HUB_KWARGS = ("revision", "cache_dir", "token", "force_download", "local_files_only", "proxies", "repo_type")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` (atomic on POSIX).

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``hf_hub_download`` understands."""
    return {k: v for k, v in kwargs.items() if k in HUB_KWARGS and v is not None}


def resolve_file(
    path_or_id: str | os.PathLike[str], filename: str, subfolder: str | None = None, **kwargs: Any
) -> str | None:
    """Path of ``filename`` in a local directory, or downloaded from the Hub repo ``path_or_id``.

    Returns None when the file does not exist there. Hub errors other than "not found" propagate.
    """
    base = Path(path_or_id)
    local = base / subfolder / filename if subfolder else base / filename
    if base.is_dir():
        return str(local) if local.is_file() else None
    if os.path.isabs(str(path_or_id)) or str(path_or_id).startswith((".", "~")):
        return None  # a local path that does not exist: never ask the Hub
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return huggingface_hub.hf_hub_download(
            str(path_or_id), filename, subfolder=subfolder or None, **hub_kwargs(kwargs)
        )
    except LocalEntryNotFoundError as exc:  # offline and not cached
        raise AdapterLoadError(
            f"{filename!r} is not in the local directory {str(path_or_id)!r} (no such directory) and could not be "
            f"fetched from the Hub: {exc}"
        ) from exc
    except (EntryNotFoundError, RepositoryNotFoundError):
        return None
