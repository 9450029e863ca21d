"""Downloaded files: where they live, how they arrive, how they are checked.

Every downloaded file is a :class:`Resource` with its sha256. :func:`fetch` finds it
under the data root (``root=`` argument, else ``$LOWLEARN_DATA``, else
``~/.cache/lowlearn``), downloads it when missing, and verifies it:

* a download is written to a temporary file beside its target and renamed into
  place only once its checksum matches, so an interrupted or corrupted download
  never leaves a file that looks valid;
* a file already on disk with the wrong checksum is reported, never overwritten:
  it may be something the user put there;
* without a network, a missing file is one :class:`DatasetNotFoundError` that names
  the file, the URL to get it from and the path to put it at.

:func:`safe_extract` unpacks zip and tar archives and refuses members that would
land outside the destination (absolute paths, ``..``, links).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.client
import lzma
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..atomic import atomic_file, new_sibling_folder
from ..checks import check_flag

ENV_VAR = "LOWLEARN_DATA"
_CHUNK = 1 << 20


class DataError(RuntimeError):
    """Base class of the errors raised by :mod:`lowlearn.data`."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A data file is missing and cannot be downloaded.

    Attributes:
        timed_out: every mirror's download of it timed out (a network that drops
            packets): :func:`fetch_all` then tries no further downloads.
    """

    timed_out = False


class ChecksumError(DataError):
    """A data file's sha256 does not match the published one."""


class UnsafeArchiveError(DataError):
    """An archive member would be written outside the extraction folder."""


@dataclass(frozen=True)
class Resource:
    """A file that lowlearn downloads.

    Attributes:
        filename: name of the file on disk.
        urls: where to download it from, tried in order (mirrors).
        sha256: hex digest of the file's bytes (64 hex digits, either case; kept in
            lower case).
        subdir: folder under the data root that holds it (e.g. ``"omniglot"``).

    Raises:
        ValueError: ``sha256`` is not 64 hex digits, or ``urls`` is not a non-empty
            tuple or list of strings.
    """

    filename: str
    urls: tuple[str, ...]
    sha256: str
    subdir: str

    def __post_init__(self):
        digest = self.sha256.lower() if isinstance(self.sha256, str) else self.sha256
        if not isinstance(digest, str) or len(digest) != 64 or set(digest) - set("0123456789abcdef"):
            raise ValueError(f"the sha256 of {self.filename} must be 64 hex digits, got {self.sha256!r}")
        object.__setattr__(self, "sha256", digest)
        urls = self.urls
        if not isinstance(urls, (tuple, list)) or not urls or not all(isinstance(url, str) for url in urls):
            raise ValueError(f"the urls of {self.filename} must be a non-empty tuple of strings (mirrors, tried in "
                             f"order), got {urls!r}: for one URL, write (url,)")
        object.__setattr__(self, "urls", tuple(urls))

    def path(self, root: str | os.PathLike | None = None) -> Path:
        """Where the file lives under ``root`` (see :func:`data_root`)."""
        return data_root(root) / self.subdir / self.filename


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder that holds downloaded data.

    ``root`` if given, else ``$LOWLEARN_DATA``, else ``~/.cache/lowlearn``.
    """
    if root is None:
        root = os.environ.get(ENV_VAR) or Path.home() / ".cache" / "lowlearn"
    return Path(root).expanduser()


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(resource: Resource, root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Return the verified local path of ``resource``, downloading it if needed.

    Args:
        resource: the file to get.
        root: data root (see :func:`data_root`).
        download: if ``False``, never touch the network.

    Raises:
        ChecksumError: the file on disk (also one that appeared there during the
            download), or the downloaded one, has the wrong sha256.
        DataError: something other than a file is at the path (a folder, a broken link),
            a file stands where its folder should be, or the folder cannot be written
            (no permission, a read-only file system, a full disk or quota).
        DatasetNotFoundError: the file is missing and could not be downloaded.
        TypeError: ``download`` other than ``True`` or ``False``.
    """
    download = check_flag("download", download)
    path = resource.path(root)
    if path.is_file():
        return _verified(path, resource)
    if path.exists() or path.is_symlink():
        raise DataError(f"{path} exists but is not a file (a folder, or a link to something missing); lowlearn does "
                        f"not replace it: move it, then run again to download {resource.urls[0]}")
    failures, corrupted, timeouts = [], [], 0
    if download:
        for url in resource.urls:  # a mirror that fails or serves a wrong file: try the next
            try:
                _download(url, path, resource.sha256)
                return path
            except FileExistsError:                   # someone put a file there meanwhile: it is kept
                return _verified(path, resource)
            except ChecksumError as err:
                corrupted.append(str(err))
            except (urllib.error.URLError, http.client.HTTPException, OSError,   # cut-off responses too
                    ValueError) as err:                                          # a malformed URL
                if _cannot_write_here(err):                                      # no mirror can help
                    raise DataError(f"cannot save {resource.filename}: {err}") from err
                failures.append(f"{url}: {err}")
                timeouts += _timed_out(err)
        if corrupted:
            raise ChecksumError("no mirror served the expected file: " + "; ".join(corrupted + failures))
    reason = "downloading is switched off (download=False)" if not download else (
        "the download failed (" + "; ".join(failures) + ")")
    error = _not_found(resource, path, reason)
    error.timed_out = timeouts == len(resource.urls)
    raise error


def _not_found(resource: Resource, path: Path, reason: str) -> DatasetNotFoundError:
    """The error for ``resource`` missing at ``path`` for ``reason``: where to get it and where to put it."""
    return DatasetNotFoundError(
        f"{resource.filename} is not at {path} and {reason}. "
        f"Download it from {resource.urls[0]} and save it as {path} "
        f"(or point {ENV_VAR} or root= at a folder that holds {resource.subdir}/{resource.filename})."
    )


def _timed_out(error: Exception) -> bool:
    """Whether a failed download waited for a network that never answered (not one that refused or erred)."""
    return isinstance(error, TimeoutError) or isinstance(getattr(error, "reason", None), TimeoutError)


def fetch_all(resources: Sequence[Resource], root: str | os.PathLike | None = None,
              download: bool = True) -> list[Path]:
    """:func:`fetch` every resource; the verified local paths, in order.

    Once every mirror of a file has timed out (a network that drops packets rather
    than refusing), the files after it are looked for on disk only, instead of
    waiting a minute for each of their mirrors.

    Raises:
        DatasetNotFoundError: one for all the missing files, naming each with where
            to get it and where to put it (rather than one file per run).
        ChecksumError, DataError: as :func:`fetch`, for the first file that has them.
        TypeError: ``download`` other than ``True`` or ``False``.
    """
    download = check_flag("download", download)
    paths, missing, silent = [], [], None
    for resource in resources:
        try:
            paths.append(fetch(resource, root, download and silent is None))
        except DatasetNotFoundError as error:
            if download and silent is not None:
                missing.append(str(_not_found(resource, resource.path(root), "its download was not tried, since "
                                              f"every mirror of {silent} timed out")))
                continue
            if error.timed_out:
                silent = resource.filename
            missing.append(str(error))
    if len(missing) == 1:
        raise DatasetNotFoundError(missing[0])
    if missing:
        raise DatasetNotFoundError(f"{len(missing)} files are missing:\n" + "\n".join(f"- {m}" for m in missing))
    return paths


def _verified(path: Path, resource: Resource) -> Path:
    """``path`` if its sha256 is the resource's, else a ChecksumError (the file is left as it is)."""
    actual = sha256_of(path)
    if actual != resource.sha256:
        raise ChecksumError(
            f"{path} is corrupted or not the expected file: its sha256 is {actual}, "
            f"expected {resource.sha256}. lowlearn does not overwrite files it did not "
            f"write: delete or move it, then run again to download {resource.urls[0]}"
        )
    return path


_LOCAL_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT}
"""Errors of the data folder's file system: read-only, full, over quota."""


def _cannot_write_here(error: Exception) -> bool:
    """Whether a failed download failed on this machine's side (the data folder), not the network's."""
    if isinstance(error, urllib.error.URLError):         # the network's (its reason may be an OSError too)
        return False
    return isinstance(error, (NotADirectoryError, PermissionError)) or (
        isinstance(error, OSError) and error.errno in _LOCAL_ERRNOS)


def _download(url: str, path: Path, sha256: str) -> None:
    """Stream ``url`` into a temporary file beside ``path``; publish it there if its sha256 matches.

    The connection is opened first: a download that cannot start leaves no folder behind.

    Raises:
        FileExistsError: something appeared at ``path`` during the download; it is kept.
        NotADirectoryError: a file stands where ``path``'s folder should be.
    """
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "lowlearn"})
    with urllib.request.urlopen(request, timeout=60) as response, atomic_file(path, overwrite=False) as out:
        for chunk in iter(lambda: response.read(_CHUNK), b""):
            digest.update(chunk)
            out.write(chunk)
        if digest.hexdigest() != sha256:
            raise ChecksumError(
                f"the download of {url} has sha256 {digest.hexdigest()}, expected {sha256}; "
                f"nothing was saved. Try again later, or download it by hand to {path}"
            )


def check_member_name(name: str, archive: str | os.PathLike) -> None:
    """Refuse an archive member name that is absolute, names a drive (``C:x``) or contains ``..``.

    Such a name would land outside the folder it is extracted to ("zip slip"); a
    genuine dataset archive never holds one.

    Raises:
        UnsafeArchiveError: naming the archive and the member.
    """
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or PureWindowsPath(name).drive:
        raise UnsafeArchiveError(
            f"{archive} holds the unsafe member name {name!r} (absolute, on a drive, or with '..'), so it is not "
            f"a genuine archive and nothing was extracted from it: delete it and download it again")


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a tar or zip archive into ``dest`` and return ``dest``.

    Every member is checked before anything is written: absolute paths, ``..``
    components, and (in tar archives) links and device files are refused with
    :class:`UnsafeArchiveError`. The archive is unpacked into a temporary folder
    that is renamed to ``dest`` at the end, so ``dest`` either holds the whole
    archive or does not exist. If ``dest`` already exists (also when another process
    has just extracted it) it is returned as is; a file there is an error.

    Only a zip archive checks its members' contents (CRC-32, every member read before
    any is written); a tar archive with a damaged byte unpacks without complaint. A zip
    with two files of one name is refused (which one is meant is unclear); in a tar the
    later one wins, as ``tar -x`` does (``tar -r`` appends a newer version of a file).
    :func:`fetch` an archive, which checks its sha256, before extracting it.

    Raises:
        UnsafeArchiveError: a member that would land outside ``dest``, or a link or device file.
        DataError: no file at ``archive``, a file that is not a tar or zip archive, one that
            is damaged (e.g. cut off, or a zip with two files of one name) or that Python cannot
            read (an unknown compression method, encryption), or a file at ``dest``.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.is_dir():
        return dest
    if dest.exists() or dest.is_symlink():
        raise DataError(f"{dest} exists and is not a folder, so {archive} cannot be extracted there: move it away")
    if not archive.is_file():
        raise DataError(f"{archive} is {'a folder' if archive.is_dir() else 'not there'}, so there is nothing to "
                        "extract: pass the path of a tar or zip archive")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_sibling_folder(dest)
    try:
        try:
            _extract(archive, tmp)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as error:
            raise DataError(f"{archive} is damaged ({type(error).__name__}: {error}), so nothing was extracted from "
                            "it: delete it and download it again") from error
        except (NotADirectoryError, IsADirectoryError, FileExistsError) as error:   # "a", "a/b"; "a/", "a"; "a", "a/"
            member = os.path.relpath(error.filename, tmp) if error.filename else "?"
            raise DataError(f"{archive} is damaged: it holds a file and a folder of the same name (at {member}), so "
                            "nothing was extracted from it: delete it and download it again") from error
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise                     # else another process extracted the archive meanwhile: theirs is kept
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


def _extract(archive: Path, folder: Path) -> None:
    """Check every member of ``archive``, then unpack it into ``folder`` (see :func:`safe_extract`)."""
    # Tar first: a tar whose last member is a zip file also passes zipfile.is_zipfile, which looks for a
    # zip's end record in the last 64 KiB; a zip never passes for a tar.
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            try:
                members = tf.getmembers()             # reads (and decompresses) the whole archive
            except OSError as error:                  # bz2 reports a damaged stream as a plain OSError
                raise tarfile.ReadError(f"{type(error).__name__}: {error}") from error
            for member in members:
                check_member_name(member.name, archive)
                if not (member.isfile() or member.isdir()):
                    raise UnsafeArchiveError(
                        f"{archive} holds {member.name!r}, a link or device file, and nothing was extracted from it: "
                        "only plain files and folders are, since a link can point outside the folder")
            # The checks above suffice; the "data" filter (Python >= 3.10.12) adds a second guard.
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tf.extractall(folder, members=members, **kwargs)
            _check_tar_end(tf)
    elif zipfile.is_zipfile(archive):
        # testzip reads every member, so damage shows before anything is written; zipfile reports some of it as
        # OSError (an offset before the file's start, a broken bz2 stream), NotImplementedError (an unknown
        # compression method or version) or RuntimeError (encryption). Writing comes after, so a full disk is
        # not taken for damage.
        try:
            with zipfile.ZipFile(archive) as zf:
                members, damaged = zf.infolist(), zf.testzip()
        except (OSError, NotImplementedError, RuntimeError) as error:
            raise zipfile.BadZipFile(f"{type(error).__name__}: {error}") from error
        if damaged is not None:
            raise zipfile.BadZipFile(f"its member {damaged!r} fails its CRC-32 check")
        for info in members:
            check_member_name(info.filename, archive)
        repeated = [name for name, count in Counter(info.filename for info in members).items()
                    if count > 1 and not name.endswith("/")]
        if repeated:                          # zipfile would keep the last silently
            raise zipfile.BadZipFile(f"it holds more than one member named {repeated[0]!r}, so which one is meant "
                                     "is unclear")
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(folder)
    else:
        raise DataError(f"{archive} is neither a tar nor a zip archive, or is cut off before its end (an interrupted "
                        "download?): delete it and download it again")


def _check_tar_end(tf: tarfile.TarFile) -> None:
    """Raise :class:`tarfile.ReadError` unless the block after the last member of ``tf`` is the end-of-archive block.

    tarfile stops without complaint where a header is missing, cut or garbled after the first
    one, so it takes an uncompressed tar cut off between two members for a whole archive; a
    genuine archive ends with a block of zeros there.
    """
    tf.fileobj.seek(tf.offset)                # just past the last member's data: a forward seek
    if tf.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"no end-of-archive block after its last member, at byte {tf.offset}: it is cut "
                                "off there or holds something that is not a tar header")
