"""File helpers at the bottom layer: atomic writes and locating a file in a local directory or on the Hub."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path, PureWindowsPath
from typing import Any

from .errors import AdapterLoadError, ConfigError
from .transaction import recover

#: Keyword arguments of ``hf_hub_download`` that callers may pass through ``**kwargs``.
HUB_KWARGS = ("revision", "cache_dir", "token", "force_download", "local_files_only", "proxies", "repo_type")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` (atomic on POSIX).

    On an exception the temporary file is removed and ``path`` is left as it was. The file is created with mode
    ``0o666`` minus the process umask (as ``open(path, "w")``, and as transformers writes its files), not the
    owner-only ``0o600`` of ``tempfile.mkstemp``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp_beside(target)
    mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o666 & ~umask, as the kernel created it
    try:
        yield tmp
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # safetensors' save_file leaves 0o600 whatever it opens
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _create_temp_beside(target: Path) -> str:
    """Create a new empty file ``.<name>.<random>.tmp`` in ``target``'s directory, mode ``0o666 & ~umask`` (the
    kernel applies the umask and any default ACL); ``O_EXCL`` so an existing file or symlink is never reused."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = os.path.join(target.parent, f".{target.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {os.fspath(target)!r}")


def check_subfolder(subfolder: str | os.PathLike[str] | None) -> str | None:
    """``subfolder`` as a relative path inside the directory (or repo) it is joined to; None for None or "".

    Raises :class:`ConfigError` for one that could lead outside it: absolute (``/x``, ``C:\\x``, ``\\\\srv``), a
    ``..`` component (with ``/`` or ``\\`` separators), or a NUL character.
    """
    if subfolder is None:
        return None
    if not isinstance(subfolder, (str, os.PathLike)):
        raise ConfigError("subfolder", subfolder, "allowed: None or a relative path (str) inside the directory")
    sub = os.fspath(subfolder)
    if not isinstance(sub, str):
        raise ConfigError("subfolder", subfolder, "allowed: None or a relative path (str) inside the directory")
    if not sub:
        return None
    parts = sub.replace("\\", "/").split("/")
    if "\0" in sub or os.path.isabs(sub) or PureWindowsPath(sub).drive or sub.startswith(("/", "\\")) or ".." in parts:
        raise ConfigError(
            "subfolder", subfolder,
            "allowed: a relative path inside the directory named (no absolute path, no '..' component, no NUL)",
        )
    return sub


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

    Returns None when the file does not exist there; raises :class:`AdapterLoadError` naming the id when the repo
    (or revision) cannot be found, online or in the local cache. ``kwargs``: ``revision``, ``cache_dir``, ``token``,
    ``local_files_only``, ... (see ``HUB_KWARGS``).
    """
    subfolder = check_subfolder(subfolder)
    base = Path(path_or_id)
    local = base / subfolder / filename if subfolder else base / filename
    if base.is_dir():
        recover(local.parent)  # finish a save that was killed after it committed
        return str(local) if local.is_file() else None
    if os.path.isabs(str(path_or_id)) or str(path_or_id).startswith((".", "~")):
        return None  # a local path that does not exist: never ask the Hub
    return _resolve_hub_file(str(path_or_id), filename, subfolder, hub_kwargs(kwargs))


def _resolve_hub_file(repo_id: str, filename: str, subfolder: str | None, hub: dict[str, Any]) -> str | None:
    """``filename`` from the Hub repo ``repo_id`` (or the local Hugging Face cache when offline).

    Offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) only the cache is read: a file missing from a cached
    snapshot gives None, a repo/revision that is not cached raises :class:`AdapterLoadError` naming the id.
    Online, a missing file gives None; a missing repo or revision raises :class:`AdapterLoadError`.
    """
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise AdapterLoadError(f"{repo_id!r} is neither a local directory nor a valid Hub repo id: {exc}") from exc
    revision = hub.get("revision") or "main"
    where = f"Hub repo {repo_id!r} (revision {revision!r})"
    if constants.is_offline_mode() or hub.get("local_files_only"):
        cache_dir = hub.get("cache_dir") or constants.HF_HUB_CACHE
        repo_type = hub.get("repo_type") or "model"
        full_name = f"{subfolder}/{filename}" if subfolder else filename
        cached = huggingface_hub.try_to_load_from_cache(
            repo_id, full_name, cache_dir=cache_dir, revision=revision, repo_type=repo_type
        )
        if isinstance(cached, str):
            return cached
        if _snapshot_is_cached(repo_id, revision, os.fspath(cache_dir), repo_type):
            return None  # the repo is cached and this file is not part of it
        raise AdapterLoadError(
            f"{repo_id!r} is not a local directory, and the {where} is not in the Hugging Face cache "
            f"{os.fspath(cache_dir)!r}; offline mode is on (HF_HUB_OFFLINE=1 or local_files_only=True), so it "
            "cannot be downloaded"
        )
    try:
        return huggingface_hub.hf_hub_download(repo_id, filename, subfolder=subfolder or None, **hub)
    except LocalEntryNotFoundError as exc:  # no connection and not cached
        raise AdapterLoadError(
            f"{filename!r}: {repo_id!r} is not a local directory, and the {where} could not be reached and is not "
            f"cached: {exc}"
        ) from exc
    except RevisionNotFoundError as exc:
        raise AdapterLoadError(f"the {where} has no such revision: {exc}") from exc
    except RepositoryNotFoundError as exc:  # also gated/private repos without a valid token
        raise AdapterLoadError(
            f"{repo_id!r} is neither a local directory nor a Hub repo you can access (pass token= for a private "
            f"or gated repo): {exc}"
        ) from exc
    except EntryNotFoundError:
        return None


def _snapshot_is_cached(repo_id: str, revision: str, cache_dir: str, repo_type: str) -> bool:
    """Whether the cache holds a snapshot of ``repo_id`` at ``revision`` (a branch/tag in ``refs/`` or a commit)."""
    from huggingface_hub.file_download import repo_folder_name

    storage = os.path.join(cache_dir, repo_folder_name(repo_id=repo_id, repo_type=repo_type))
    commit = revision
    ref_file = os.path.join(storage, "refs", revision)
    if os.path.isfile(ref_file):
        with open(ref_file, encoding="utf-8") as fh:
            commit = fh.read().strip()
    return os.path.isdir(os.path.join(storage, "snapshots", commit))
