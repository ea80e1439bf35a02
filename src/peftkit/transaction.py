"""All-or-nothing replacement of the files of one adapter directory, safe against crashes and concurrent savers.

A save writes every new file into a fresh staging directory ``<dir>/.peftkit-save-<random>/`` (with a manifest
``.manifest.json`` naming the files to install and the stale files to remove), flushes it, and then *commits* with
one atomic rename of the staging directory to ``<dir>/.peftkit-commit``. Applying the commit moves each file onto
its final name and removes the stale ones; every step is idempotent. So at any moment:

- before the commit rename, the directory still holds the old adapter (the staging directory is ignored by loads
  and removed by the next save);
- after it, the new adapter is what the directory holds: a process killed while applying leaves
  ``.peftkit-commit`` behind, and the next load or save finishes applying it (roll forward) before reading.

Savers hold an exclusive ``flock`` on the directory for the whole save and readers a shared one while they read
an adapter's files, so concurrent savers serialize and a reader never sees half of a save. Where ``fcntl`` is
missing (Windows) or the file system refuses ``flock``, saves stay atomic but are not serialized.

Nothing outside the directory named is read or written; names in a manifest found on disk are checked to be plain
file names inside it before anything is moved.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping

from .errors import AdapterLoadError, ConfigError

#: the committed staging directory; its presence means "apply me before reading"
COMMIT_DIR = ".peftkit-commit"
#: prefix of staging directories that are not committed yet
STAGING_PREFIX = ".peftkit-save-"
MANIFEST = ".manifest.json"
_STAGING_RE = re.compile(r"\.peftkit-save-[0-9a-f]{16}\Z")
#: a manifest found on disk that is larger than this is refused unread
_MAX_MANIFEST_BYTES = 64 * 1024

_held_lock = threading.Lock()
#: (st_dev, st_ino, thread id) of the directory locks this process holds
_held: set[tuple[int, int, int]] = set()


def replace_files(
    directory: str | os.PathLike[str], files: Mapping[str, Callable[[str], None]], remove: Iterable[str] = ()
) -> None:
    """Install ``files`` (``{file name: write(path)}``) into ``directory`` and delete the files named in
    ``remove``, all or nothing: a crash at any point leaves the directory's old contents or, once committed, its
    new ones (completed by the next load or save). Each ``write`` is called with a path in the staging directory
    and must create or fill that file. New files get mode ``0o666 & ~umask``. Other files of ``directory`` are
    left alone. Raises :class:`ConfigError` for a name that is not a plain file name."""
    for name in (*files, *remove):
        _check_name(name, "file name")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    with locked(directory, exclusive=True):
        _recover_locked(directory)
        _remove_abandoned(directory)
        staging = _make_staging(directory)
        try:
            for name, write in files.items():
                _write_file(os.path.join(staging, name), write)
            manifest = json.dumps({"files": list(files), "remove": [n for n in remove if n not in files]})
            _write_file(os.path.join(staging, MANIFEST), lambda p: _write_text(p, manifest))
            _fsync_dir(staging)
            os.rename(staging, os.path.join(directory, COMMIT_DIR))  # the commit point
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(directory)
        _apply(directory)


def recover(directory: str | os.PathLike[str]) -> None:
    """Finish a save into ``directory`` that was committed but not fully applied (its process was killed), unless
    this thread already holds a lock on the directory. Cheap (one ``stat``) when there is nothing to do.

    Raises :class:`AdapterLoadError` when the pending save cannot be applied (read-only directory, a broken
    manifest)."""
    directory = os.fspath(directory)
    if not os.path.lexists(os.path.join(directory, COMMIT_DIR)) or _holds(directory):
        return
    with locked(directory, exclusive=True):
        _recover_locked(directory)


@contextlib.contextmanager
def reading(directory: str | os.PathLike[str] | None) -> Iterator[None]:
    """Hold a shared lock on ``directory`` (after finishing any pending save) while an adapter's files are read,
    so that no save replaces them half-way. ``None`` (a Hub repo) does nothing."""
    if directory is None or not os.path.isdir(directory):
        yield
        return
    directory = os.fspath(directory)
    if _holds(directory):  # already locked by this thread (a save reading back, a nested load)
        yield
        return
    for _ in range(100):
        recover(directory)
        with locked(directory, exclusive=False):
            if os.path.lexists(os.path.join(directory, COMMIT_DIR)):
                continue  # a save committed and died between the recovery and this lock: recover again
            yield
            return
    raise AdapterLoadError(f"{directory!r}: a pending save keeps reappearing; cannot read a consistent adapter")


@contextlib.contextmanager
def locked(directory: str, exclusive: bool) -> Iterator[None]:
    """An advisory ``flock`` on ``directory`` (exclusive or shared), reentrant per thread; a no-op where ``flock``
    is unavailable. Locks of different threads (and processes) exclude each other."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory directory locks
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        yield  # not openable for reading: nothing we could lock
        return
    try:
        info = os.fstat(fd)
        key = (info.st_dev, info.st_ino, threading.get_ident())
        with _held_lock:
            reentered = key in _held
        if reentered:  # this thread holds it already (the outer holder releases it)
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError:  # a file system without flock (some network mounts): atomic but unserialized
            yield
            return
        with _held_lock:
            _held.add(key)
        try:
            yield
        finally:
            with _held_lock:
                _held.discard(key)
    finally:
        os.close(fd)  # releases the flock


def _holds(directory: str) -> bool:
    """Whether this thread holds a lock on ``directory``."""
    try:
        info = os.stat(directory)
    except OSError:
        return False
    with _held_lock:
        return (info.st_dev, info.st_ino, threading.get_ident()) in _held


def _check_name(name: object, what: str) -> str:
    """``name`` when it is a plain file name (no separator, not ``.``/``..``, not empty, no NUL)."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or name == COMMIT_DIR):
        raise ConfigError(what, name, "allowed: a plain file name inside the directory (no path separator, "
                          "not '.' or '..', not empty)")
    return name


def _make_staging(directory: str) -> str:
    """A new empty directory ``.peftkit-save-<16 hex>`` in ``directory`` (mode ``0o777 & ~umask``)."""
    for _ in range(100):
        path = os.path.join(directory, STAGING_PREFIX + secrets.token_hex(8))
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"could not create a staging directory in {directory!r}")


def _write_file(path: str, write: Callable[[str], None]) -> None:
    """Create ``path`` (mode ``0o666 & ~umask``), let ``write`` fill it, keep that mode, and flush it to disk."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    os.close(os.open(path, flags, 0o666))
    mode = stat.S_IMODE(os.stat(path).st_mode)
    write(path)
    if stat.S_IMODE(os.stat(path).st_mode) != mode:  # safetensors' save_file creates 0o600 files
        os.chmod(path, mode)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _fsync_dir(directory: str) -> None:
    """Flush ``directory``'s entries (renames, creations) to disk where the OS allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # Windows and some file systems cannot sync a directory
    finally:
        os.close(fd)


def _recover_locked(directory: str) -> None:
    """Apply a pending commit, if any (the caller holds the exclusive lock)."""
    if os.path.lexists(os.path.join(directory, COMMIT_DIR)):
        try:
            _apply(directory)
        except OSError as exc:
            raise AdapterLoadError(f"{directory!r} holds a save that was interrupted after it committed "
                                   f"({COMMIT_DIR}), and it cannot be completed here: {exc}") from exc


def _apply(directory: str) -> None:
    """Move the committed files onto their names and remove the stale ones; idempotent (a killed run is simply
    repeated). Removes ``.peftkit-commit`` at the end."""
    commit = os.path.join(directory, COMMIT_DIR)
    if os.path.islink(commit) or not os.path.isdir(commit):
        raise AdapterLoadError(f"{commit!r} is not a directory written by a peftkit save; remove it by hand")
    manifest_path = os.path.join(commit, MANIFEST)
    if os.path.lexists(manifest_path):
        files, remove = _read_manifest(manifest_path)
        for name in remove:
            path = os.path.join(directory, name)
            if os.path.islink(path) or os.path.isfile(path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        for name in files:
            source = os.path.join(commit, name)
            if os.path.lexists(source):  # absent: moved by the run that was killed
                os.replace(source, os.path.join(directory, name))
        _fsync_dir(directory)
        os.unlink(manifest_path)
    shutil.rmtree(commit)
    _fsync_dir(directory)


def _read_manifest(path: str) -> tuple[list[str], list[str]]:
    """``(files, remove)`` of a manifest, every name checked to be a plain file name."""
    try:
        if os.path.islink(path) or os.path.getsize(path) > _MAX_MANIFEST_BYTES:
            raise ValueError("not a small regular file")
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        files, remove = data["files"], data["remove"]
        if not isinstance(files, list) or not isinstance(remove, list):
            raise TypeError("'files' and 'remove' must be lists")
        names = [_check_name(n, "manifest entry") for n in (*files, *remove)]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise AdapterLoadError(f"the pending save's manifest {path!r} is broken ({exc}); remove "
                               f"{os.path.dirname(path)!r} by hand") from None
    return names[:len(files)], names[len(files):]


def _remove_abandoned(directory: str) -> None:
    """Remove staging directories of saves that died before committing (the caller holds the exclusive lock, so
    no live save owns one)."""
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if _STAGING_RE.match(entry.name) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
