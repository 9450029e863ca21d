"""Write a file so that readers see all of it or none of it, and nothing saved is lost.

:func:`atomic_file` writes into a temporary file beside the target, flushes it to the
disk, and publishes it under the target's name only once the writing succeeded: a
crash, a power loss or an exception leaves the target as it was (or absent), never
half-written. The folder's new entry is flushed too, once the file is in place; a
failure there leaves the file saved and gives a warning, not an error. An exception
removes the temporary file; a process killed while it writes cannot, and leaves it
behind, hidden, as ``.<name>.<8 hex>.part`` beside the target (the name cut to 32
characters); it is safe to delete once nothing writes there. A new file gets the
permissions of any new file (``0o666`` less the umask, which the system applies when
the temporary file is created); a replaced file keeps its own. Checkpoints
(:func:`lowlearn.train.save_checkpoint`), results files (:mod:`lowlearn.results`) and
downloads (:mod:`lowlearn.data.cache`) are written this way; :func:`new_sibling_folder`
gives archive extraction its temporary folder.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TypeVar

from .checks import check_flag

T = TypeVar("T")


def _fresh_sibling(path: Path, create: Callable[[Path], T]) -> T:
    """``create(name)`` for a new hidden name beside ``path``, retried while the name is taken.

    The name is short whatever the target's (``.<first 32 characters>.<8 hex>.part``),
    so that a target whose name is as long as the file system allows still gets one.
    """
    while True:
        try:
            return create(path.parent / f".{path.name[:32]}.{secrets.token_hex(4)}.part")
        except FileExistsError:
            continue


def new_sibling_folder(path: str | os.PathLike) -> Path:
    """A new empty folder beside ``path``, with the permissions of any new folder (``0o777`` less the umask)."""
    def create(name: Path) -> Path:
        name.mkdir(0o777)
        return name

    return _fresh_sibling(Path(path), create)


def _ensure_folder(folder: Path) -> None:
    """Create ``folder`` and its parents, with a clear error if a file stands where a folder should."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(f"{folder} (or a folder above it) is a file, not a folder: move it away so that "
                                 "files can be saved there") from None


_NO_FOLDER_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}   # the file system cannot flush folders


def _sync_folder(folder: Path, published: Path) -> None:
    """Flush a folder's entries (the file ``published``, new or renamed) to the disk, where the system allows it.

    The file is in place by then, so a failure is not an error of the save: a file system
    that cannot flush folders (``EINVAL``, ``ENOTSUP``) is skipped, as Windows is, and any
    other failure is a warning that the file may not survive a power loss.
    """
    if not hasattr(os, "O_DIRECTORY"):               # Windows: folders cannot be opened
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        if error.errno not in _NO_FOLDER_SYNC:
            warnings.warn(f"{published} is saved, but its folder could not be flushed to the disk ({error}): the "
                          "file may be lost if the machine loses power before the system writes it out",
                          RuntimeWarning, stacklevel=4)


@contextmanager
def atomic_file(path: str | os.PathLike, *, overwrite: bool, text: bool = False) -> Iterator[IO]:
    """A handle on a temporary file beside ``path``, published as ``path`` when the block ends without error.

    Args:
        path: the target; its folder is created if needed. With ``overwrite``, a link
            is followed: the file it points to is replaced, and the link stays.
        overwrite: replace an existing ``path`` (keeping its permissions). With
            ``False`` the file is published by a hard link, which fails if ``path``
            exists by then, so a file that another process wrote meanwhile is not
            replaced either (on a file system without hard links: a check just before
            the rename).
        text: a text handle (UTF-8) instead of a binary one.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is ``False``, or it is a device, a pipe or a
            socket (which a rename would replace by a file, ``/dev/null`` too); it is left as it is.
        IsADirectoryError: ``path`` is a folder and ``overwrite`` is ``True``, before the block runs.
        NotADirectoryError: a file stands where ``path``'s folder should be.
        TypeError: ``overwrite`` other than ``True`` or ``False``.
    """
    overwrite = check_flag("overwrite", overwrite)
    path = Path(path)
    if os.path.lexists(path) and not overwrite:
        dangling = " (a link whose target is missing)" if not path.exists() else ""
        raise FileExistsError(f"{path} exists{dangling} and is left as it is; pass overwrite=True to replace it, or "
                              "choose another path")
    if overwrite:
        path = Path(os.path.realpath(path))
        if path.exists() and not path.is_file():        # a rename would put a file in its place
            folder = path.is_dir()
            raise (IsADirectoryError if folder else FileExistsError)(
                f"{path} is {'a folder' if folder else 'not a file but a device, a pipe or a socket'} and is left as "
                "it is: overwrite=True replaces files only; choose another path")
    _ensure_folder(path.parent)
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0)
    fd, tmp = _fresh_sibling(path, lambda name: (os.open(name, flags, 0o666), name))
    try:
        with os.fdopen(fd, "w" if text else "wb", **({"encoding": "utf-8"} if text else {})) as handle:
            if overwrite and path.exists():
                # A replaced file keeps its permissions, set before the first byte: the new content is never
                # readable by more people than the old.
                os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
        _sync_folder(path.parent, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _publish_new(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the name ``path`` unless ``path`` exists (``tmp`` itself is removed by the caller)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} was created by someone else while this file was written; it is left as it "
                              "is, and nothing was saved: choose another path") from None
    except OSError:                                   # no hard links here: the check-then-rename of old
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists and is left as it is; nothing was saved") from None
        os.replace(tmp, path)
