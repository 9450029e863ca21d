"""Write a file so that readers see all of it or none of it, and nothing saved is lost.

:func:`atomic_file` writes into a temporary file beside the target and publishes it
under the target's name only once the writing succeeded: a crash or an exception
leaves the target as it was (or absent), never half-written. The published file
has the permissions of any new file (``0o666`` less the umask), not the ``0o600`` of
a temporary file. Checkpoints (:func:`lowlearn.train.save_checkpoint`), results
files (:mod:`lowlearn.results`) and downloads (:mod:`lowlearn.data.cache`) are
written this way.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def new_file_mode(directory: bool = False) -> int:
    """The permissions a new file (or folder) gets: ``0o666`` (``0o777``) less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextmanager
def atomic_file(path: str | os.PathLike, *, overwrite: bool, text: bool = False) -> Iterator[IO]:
    """A handle on a temporary file beside ``path``, published as ``path`` when the block ends without error.

    Args:
        path: the target; its folder is created if needed.
        overwrite: replace an existing ``path``. With ``False`` the file is published
            by a hard link, which fails if ``path`` exists by then, so a file that
            another process wrote meanwhile is not replaced either (on a file system
            without hard links: a check just before the rename).
        text: a text handle (UTF-8) instead of a binary one.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is ``False``; it is left as it is.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists and is left as it is; pass overwrite=True to replace it, or choose "
                              "another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w" if text else "wb", **({"encoding": "utf-8"} if text else {})) as handle:
            yield handle
        os.chmod(tmp, new_file_mode())
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _publish_new(tmp: str, path: Path) -> None:
    """Give ``tmp`` the name ``path`` unless ``path`` exists (``tmp`` itself is removed by the caller)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} was created by someone else while this file was written; it is left as it "
                              "is, and nothing was saved: choose another path") from None
    except OSError:                                   # no hard links here: the check-then-rename of old
        if path.exists():
            raise FileExistsError(f"{path} exists and is left as it is; nothing was saved") from None
        os.replace(tmp, path)
