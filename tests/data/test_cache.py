"""Tests of lowlearn.data.cache, offline: downloads come from file:// URLs."""

import errno
import hashlib
import http.client
import io
import lzma
import os
import urllib.request
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from lowlearn.data.cache import (
    ENV_VAR,
    ChecksumError,
    DataError,
    DatasetNotFoundError,
    Resource,
    UnsafeArchiveError,
    check_member_name,
    data_root,
    fetch,
    fetch_all,
    safe_extract,
    sha256_of,
)

CONTENT = b"lowlearn test payload\n" * 100


def _resource(*urls: str, content: bytes = CONTENT) -> Resource:
    return Resource("payload.bin", tuple(urls), hashlib.sha256(content).hexdigest(), "sub")


def _source(tmp_path: Path, content: bytes = CONTENT) -> str:
    """A file:// URL serving ``content``."""
    src = tmp_path / "server" / "payload.bin"
    src.parent.mkdir()
    src.write_bytes(content)
    return src.as_uri()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_sha256_of(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(CONTENT)
    assert sha256_of(path) == hashlib.sha256(CONTENT).hexdigest()
    large = bytes(range(256)) * (10 * 1024 + 3)                      # 2.5 MiB: read in several chunks
    path.write_bytes(large)
    assert sha256_of(path) == hashlib.sha256(large).hexdigest()


def test_the_errors_are_data_errors():
    for error in (ChecksumError, DatasetNotFoundError, UnsafeArchiveError):
        assert issubclass(error, DataError)
    assert issubclass(DatasetNotFoundError, FileNotFoundError)


def test_fetch_returns_present_verified_file(tmp_path):
    resource = _resource("https://example.invalid/payload.bin")
    path = tmp_path / "sub" / "payload.bin"
    path.parent.mkdir()
    path.write_bytes(CONTENT)
    assert fetch(resource, root=tmp_path, download=False) == path


def test_fetch_wrong_checksum_keeps_file(tmp_path):
    resource = _resource("https://example.invalid/payload.bin")
    path = tmp_path / "sub" / "payload.bin"
    path.parent.mkdir()
    path.write_bytes(b"something the user put there")
    with pytest.raises(ChecksumError, match="sha256"):
        fetch(resource, root=tmp_path)
    assert path.read_bytes() == b"something the user put there"


def test_fetch_wrong_checksum_compares_the_whole_digest(tmp_path):
    path = tmp_path / "sub" / "payload.bin"
    path.parent.mkdir()
    path.write_bytes(CONTENT)
    digest = hashlib.sha256(CONTENT).hexdigest()
    last = "0" if digest[-1] != "0" else "1"
    resource = Resource("payload.bin", ("https://example.invalid/payload.bin",), digest[:-1] + last, "sub")
    with pytest.raises(ChecksumError, match=f"its sha256 is {digest}"):
        fetch(resource, root=tmp_path, download=False)


def test_fetch_missing_without_download_names_file_url_and_path(tmp_path):
    url = "https://example.invalid/payload.bin"
    with pytest.raises(DatasetNotFoundError) as info:
        fetch(_resource(url), root=tmp_path, download=False)
    message = str(info.value)
    assert "payload.bin" in message and url in message
    assert str(tmp_path / "sub" / "payload.bin") in message
    assert "download=False" in message
    assert isinstance(info.value, FileNotFoundError)


def test_fetch_all_offline_never_downloads_and_reports_one_missing_file_as_fetch_does(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: pytest.fail("tried the network"))
    present = Resource("present.bin", ("https://example.invalid/present.bin",), hashlib.sha256(CONTENT).hexdigest(),
                       "sub")
    present.path(tmp_path).parent.mkdir()
    present.path(tmp_path).write_bytes(CONTENT)
    missing = _resource("https://example.invalid/payload.bin")
    with pytest.raises(DatasetNotFoundError) as single:
        fetch(missing, root=tmp_path, download=False)
    with pytest.raises(DatasetNotFoundError) as info:
        fetch_all([present, missing], root=tmp_path, download=False)
    assert str(info.value) == str(single.value)
    assert fetch_all([present], root=tmp_path, download=False) == [present.path(tmp_path)]


def test_fetch_downloads_from_file_url(tmp_path):
    root = tmp_path / "data"
    path = fetch(_resource(_source(tmp_path)), root=root)
    assert path == root / "sub" / "payload.bin"
    assert path.read_bytes() == CONTENT
    assert _leftovers(path.parent) == ["payload.bin"]


def test_fetch_never_replaces_what_is_at_the_path(tmp_path, monkeypatch):
    root = tmp_path / "data"
    target = root / "sub" / "payload.bin"
    target.parent.mkdir(parents=True)
    target.symlink_to(tmp_path / "unmounted" / "payload.bin")            # a link to something missing
    with pytest.raises(DataError, match="exists but is not a file"):
        fetch(_resource(_source(tmp_path)), root=root)
    assert target.is_symlink()
    target.unlink()
    # A file put there while the download runs is kept: returned if it is the right one, reported if not.
    real_urlopen = urllib.request.urlopen
    for placed, outcome in ((CONTENT, None), (b"the user's own file", ChecksumError)):
        def urlopen(request, timeout, placed=placed):
            response = real_urlopen(request, timeout=timeout)
            target.write_bytes(placed)
            return response

        monkeypatch.setattr(urllib.request, "urlopen", urlopen)
        mirror = tmp_path / f"mirror{len(placed)}"
        mirror.mkdir()
        if outcome is None:
            assert fetch(_resource(_source(mirror)), root=root).read_bytes() == placed
        else:
            with pytest.raises(ChecksumError, match="does not overwrite"):
                fetch(_resource(_source(mirror)), root=root)
        assert target.read_bytes() == placed and _leftovers(target.parent) == ["payload.bin"]
        target.unlink()


def test_fetch_falls_back_to_next_mirror(tmp_path):
    dead = (tmp_path / "nowhere" / "payload.bin").as_uri()
    path = fetch(_resource(dead, _source(tmp_path)), root=tmp_path / "data")
    assert path.read_bytes() == CONTENT


def test_fetch_falls_back_when_a_mirror_url_is_malformed(tmp_path):
    path = fetch(_resource("not a url", _source(tmp_path)), root=tmp_path / "data")   # urllib: ValueError
    assert path.read_bytes() == CONTENT


def test_fetch_falls_back_when_a_mirror_cuts_the_response_short(tmp_path, monkeypatch):
    class CutShort(io.BytesIO):
        def read(self, size=-1):
            raise http.client.IncompleteRead(b"partial", 100)

    real_urlopen = urllib.request.urlopen
    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout: (
        CutShort() if request.full_url.startswith("http://broken.invalid") else real_urlopen(request, timeout=timeout)))
    path = fetch(_resource("http://broken.invalid/payload.bin", _source(tmp_path)), root=tmp_path / "data")
    assert path.read_bytes() == CONTENT and _leftovers(path.parent) == ["payload.bin"]
    with pytest.raises(DatasetNotFoundError, match="IncompleteRead"):
        fetch(_resource("http://broken.invalid/payload.bin"), root=tmp_path / "other")


def test_fetch_skips_a_mirror_that_serves_a_wrong_file(tmp_path):
    bad = tmp_path / "bad" / "payload.bin"
    bad.parent.mkdir()
    bad.write_bytes(b"not the payload")
    path = fetch(_resource(bad.as_uri(), _source(tmp_path)), root=tmp_path / "data")
    assert path.read_bytes() == CONTENT


def test_fetch_reports_a_wrong_file_even_when_another_mirror_is_down(tmp_path):
    bad = tmp_path / "bad" / "payload.bin"
    bad.parent.mkdir()
    bad.write_bytes(b"not the payload")
    dead = (tmp_path / "nowhere" / "payload.bin").as_uri()
    with pytest.raises(ChecksumError, match=f"no mirror served the expected file: .*{bad.as_uri()}.*; {dead}"):
        fetch(_resource(bad.as_uri(), dead), root=tmp_path / "data")
    assert _leftovers(tmp_path / "data" / "sub") == []


def test_fetch_download_with_wrong_checksum_leaves_nothing(tmp_path):
    root = tmp_path / "data"
    resource = _resource(_source(tmp_path), content=b"other bytes")
    with pytest.raises(ChecksumError):
        fetch(resource, root=root)
    assert _leftovers(root / "sub") == []


def test_fetch_download_compares_the_whole_digest(tmp_path):
    """A downloaded file whose sha256 differs from the expected one in its last hex digit only is refused."""
    root = tmp_path / "data"
    digest = hashlib.sha256(CONTENT).hexdigest()
    near = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    resource = Resource("payload.bin", (_source(tmp_path),), near, "sub")
    with pytest.raises(ChecksumError, match=f"has sha256 {digest}, expected {near}"):
        fetch(resource, root=root)
    assert _leftovers(root / "sub") == []


def test_fetch_failed_download_reports_every_mirror_and_leaves_no_folder(tmp_path):
    urls = [(tmp_path / name / "payload.bin").as_uri() for name in ("a", "b")]
    with pytest.raises(DatasetNotFoundError) as info:
        fetch(_resource(*urls), root=tmp_path / "data")
    assert all(url in str(info.value) for url in urls)
    assert not (tmp_path / "data").exists()


def test_fetch_with_a_file_where_the_folder_should_be_says_so_instead_of_blaming_the_download(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sub").write_bytes(b"a file of the user's")
    with pytest.raises(DataError, match=r"cannot save payload.bin: .*sub.* is a file, not a folder") as info:
        fetch(_resource(_source(tmp_path)), root=tmp_path / "data")
    assert not isinstance(info.value, DatasetNotFoundError)
    assert (tmp_path / "data" / "sub").read_bytes() == b"a file of the user's"


@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "Permission denied"),
                                   OSError(errno.EROFS, "Read-only file system"),
                                   OSError(errno.ENOSPC, "No space left on device"),
                                   OSError(errno.EDQUOT, "Disk quota exceeded")])
def test_fetch_into_a_folder_it_cannot_write_says_so_after_one_mirror(tmp_path, monkeypatch, error):
    """A data folder without write permission (a shared LOWLEARN_DATA), on a read-only file system, on a full
    disk or over its quota is no network failure: no other mirror is tried, and the error says it could not save
    the file."""
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    real_open, real_urlopen, opened = os.open, urllib.request.urlopen, []

    def read_only_root(path, flags, *args, **kwargs):         # what such a folder does
        if str(path).startswith(str(root)) and flags & os.O_CREAT:
            raise type(error)(*error.args, str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_root)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: opened.append(args) or real_urlopen(
        *args, **kwargs))
    source = _source(tmp_path)
    with pytest.raises(DataError, match=f"cannot save payload.bin: .*{error.strerror}") as info:
        fetch(_resource(source, source), root=root)
    assert not isinstance(info.value, DatasetNotFoundError)
    assert len(opened) == 1 and _leftovers(root / "sub") == []


def test_resource_digests_are_hex_and_kept_in_lower_case(tmp_path):
    digest = hashlib.sha256(CONTENT).hexdigest()
    resource = Resource("payload.bin", (_source(tmp_path),), digest.upper(), "sub")
    assert resource.sha256 == digest
    assert fetch(resource, root=tmp_path / "data").read_bytes() == CONTENT
    for bad in (digest[:-1], digest[:-1] + "g", None):
        with pytest.raises(ValueError, match="must be 64 hex digits"):
            Resource("payload.bin", ("u",), bad, "sub")


def test_resource_urls_are_a_non_empty_tuple_of_strings():
    digest = hashlib.sha256(CONTENT).hexdigest()
    for bad in ((), "https://example.org/payload.bin", ("https://example.org/payload.bin", None)):
        with pytest.raises(ValueError, match="must be a non-empty tuple of strings"):
            Resource("payload.bin", bad, digest, "sub")
    assert Resource("payload.bin", ["u", "v"], digest, "sub").urls == ("u", "v")   # hashable, like the rest


def test_data_root_selection(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert _resource("u").path() == tmp_path / "env" / "sub" / "payload.bin"
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root() == tmp_path / "home" / ".cache" / "lowlearn"
    monkeypatch.setenv(ENV_VAR, "")                                   # set but empty: not the current folder
    assert data_root() == tmp_path / "home" / ".cache" / "lowlearn"
    assert data_root("~/data") == tmp_path / "home" / "data"
    monkeypatch.setenv(ENV_VAR, "~/env")
    assert data_root() == tmp_path / "home" / "env"


def test_fetch_uses_env_root(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    path = fetch(_resource(_source(tmp_path)))
    assert path == tmp_path / "env" / "sub" / "payload.bin" and path.is_file()


# --- safe_extract ---------------------------------------------------------------


def _zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes], mode: str = "w:gz") -> Path:
    """A tar archive of ``members``, gzipped unless ``mode`` says otherwise; a file member's bytes from ``data``."""
    with tarfile.open(path, mode) as tf:
        for info in members:
            payload = data.get(info.name)
            if payload is not None:
                info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def _folder_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


@pytest.fixture
def archives(tmp_path):
    folder = tmp_path / "archives"
    folder.mkdir()
    return folder


def test_safe_extract_zip(tmp_path, archives):
    archive = _zip(archives / "a.zip", {"top/a.txt": b"a", "top/sub/b.txt": b"b"})
    dest = safe_extract(archive, tmp_path / "out" / "dest")
    assert (dest / "top" / "a.txt").read_bytes() == b"a"
    assert (dest / "top" / "sub" / "b.txt").read_bytes() == b"b"
    assert _leftovers(dest.parent) == ["dest"]
    assert stat.S_IMODE(dest.stat().st_mode) == 0o777 & ~_umask()                  # not a private 0o700


def test_safe_extract_onto_a_file_is_an_error(tmp_path, archives):
    archive = _zip(archives / "a.zip", {"a.txt": b"a"})
    (tmp_path / "dest").write_bytes(b"mine")
    with pytest.raises(DataError, match="dest exists and is not a folder"):
        safe_extract(archive, tmp_path / "dest")
    assert (tmp_path / "dest").read_bytes() == b"mine"
    (tmp_path / "link").symlink_to(tmp_path / "unmounted")            # a link to something missing
    with pytest.raises(DataError, match="link exists and is not a folder"):
        safe_extract(archive, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and not (tmp_path / "unmounted").exists()


def test_safe_extract_returns_an_existing_folder_as_it_is(tmp_path, archives):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine.txt").write_bytes(b"mine")
    (archives / "a.zip").write_bytes(b"not even an archive")
    assert safe_extract(archives / "a.zip", dest) == dest
    assert _leftovers(dest) == ["mine.txt"] and _leftovers(tmp_path) == ["archives", "dest"]


def test_safe_extract_creates_the_folders_above_dest(tmp_path, archives):
    archive = _zip(archives / "a.zip", {"a.txt": b"a"})
    dest = safe_extract(archive, tmp_path / "x" / "y" / "dest")
    assert (dest / "a.txt").read_bytes() == b"a"


def test_safe_extract_reports_a_failure_to_publish_and_leaves_nothing(tmp_path, archives, monkeypatch):
    from lowlearn.data import cache

    def refuse(source, target):
        raise PermissionError(13, "Permission denied", str(target))

    archive = _zip(archives / "a.zip", {"a.txt": b"a"})
    monkeypatch.setattr(cache.os, "replace", refuse)
    with pytest.raises(PermissionError):
        safe_extract(archive, tmp_path / "out" / "dest")
    assert _leftovers(tmp_path / "out") == []


def test_safe_extract_tar(tmp_path, archives):
    archive = _tar(archives / "a.tar.gz", [_folder_info("top"), tarfile.TarInfo("top/a.txt")], {"top/a.txt": b"a"})
    dest = safe_extract(archive, tmp_path / "out" / "dest")
    assert (dest / "top" / "a.txt").read_bytes() == b"a"
    assert _leftovers(dest.parent) == ["dest"]


def _symlink_info() -> tarfile.TarInfo:
    link = tarfile.TarInfo("top/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    return link


def _special_info(kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo("top/special")
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize("make_archive", [
    lambda folder: _zip(folder / "dotdot.zip", {"ok.txt": b"ok", "../evil": b"evil"}),
    lambda folder: _zip(folder / "absolute.zip", {"ok.txt": b"ok", "/evil": b"evil"}),
    lambda folder: _zip(folder / "drive.zip", {"ok.txt": b"ok", "C:evil": b"evil"}),
    lambda folder: _tar(folder / "dotdot.tar.gz", [tarfile.TarInfo("ok.txt"), tarfile.TarInfo("../evil")],
                           {"ok.txt": b"ok", "../evil": b"evil"}),
    lambda folder: _tar(folder / "symlink.tar.gz", [tarfile.TarInfo("ok.txt"), _symlink_info()],
                           {"ok.txt": b"ok"}),
    lambda folder: _zip(folder / "backslash.zip", {"ok.txt": b"ok", "top\\..\\..\\evil": b"evil"}),
    lambda folder: _tar(folder / "hardlink-out.tar.gz", [tarfile.TarInfo("ok.txt"), _special_info(tarfile.LNKTYPE,
                                                                                                 "/etc/passwd")],
                        {"ok.txt": b"ok"}),
    lambda folder: _tar(folder / "hardlink-in.tar.gz", [tarfile.TarInfo("ok.txt"), _special_info(tarfile.LNKTYPE,
                                                                                                "ok.txt")],
                        {"ok.txt": b"ok"}),
    lambda folder: _tar(folder / "device.tar.gz", [tarfile.TarInfo("ok.txt"), _special_info(tarfile.CHRTYPE)],
                        {"ok.txt": b"ok"}),
    lambda folder: _tar(folder / "fifo.tar.gz", [tarfile.TarInfo("ok.txt"), _special_info(tarfile.FIFOTYPE)],
                        {"ok.txt": b"ok"}),
], ids=["zip-dotdot", "zip-absolute", "zip-drive", "tar-dotdot", "tar-symlink", "zip-backslash-dotdot",
        "tar-hardlink-outside", "tar-hardlink-inside", "tar-device", "tar-fifo"])
def test_safe_extract_refuses_unsafe_members_and_writes_nothing(tmp_path, archives, make_archive):
    archive = make_archive(archives)
    out = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match=archive.name):
        safe_extract(archive, out / "dest")
    assert _leftovers(out) == []  # neither dest, nor its temporary folder, nor out/evil


@pytest.mark.parametrize("make_archive", [
    lambda folder: _zip(folder / "file-then-inside.zip", {"a": b"a", "a/b": b"b"}),
    lambda folder: _zip(folder / "folder-then-file.zip", {"a/": b"", "a": b"a"}),
    lambda folder: _zip(folder / "file-then-folder.zip", {"a": b"a", "a/": b""}),
    lambda folder: _tar(folder / "file-then-inside.tar", [tarfile.TarInfo("a"), tarfile.TarInfo("a/b")],
                        {"a": b"a", "a/b": b"b"}, mode="w"),
    lambda folder: _tar(folder / "folder-then-file.tar", [_folder_info("a/"), tarfile.TarInfo("a")], {"a": b"a"},
                        mode="w"),
], ids=["zip-file-then-inside", "zip-folder-then-file", "zip-file-then-folder", "tar-file-then-inside",
        "tar-folder-then-file"])
def test_an_archive_with_a_file_and_a_folder_of_one_name_is_damaged_and_writes_nothing(tmp_path, archives,
                                                                                        make_archive):
    archive = make_archive(archives)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"holds a file and a folder of the same name \(at a.*\), so nothing was "
                                        "extracted from it: delete it and download it again"):
        safe_extract(archive, out / "dest")
    assert _leftovers(out) == []


def test_a_zip_with_two_files_of_one_name_is_damaged_and_writes_nothing(tmp_path, archives):
    archive = archives / "twice.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("top/", b"")
        zf.writestr("top/a.txt", b"first")
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("top/a.txt", b"second")
            zf.writestr("top/", b"")           # a folder named twice is harmless
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"damaged \(BadZipFile: it holds more than one member named 'top/a.txt', "
                                        r"so which one is meant is unclear\), so nothing was extracted"):
        safe_extract(archive, out / "dest")
    assert _leftovers(out) == []


def test_a_tar_with_two_files_of_one_name_keeps_the_later_as_tar_does(tmp_path, archives):
    first, second = tarfile.TarInfo("a.txt"), tarfile.TarInfo("a.txt")
    with tarfile.open(archives / "twice.tar", "w") as tf:
        for info, payload in ((first, b"first"), (second, b"second")):
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    assert (safe_extract(archives / "twice.tar", tmp_path / "dest") / "a.txt").read_bytes() == b"second"


def test_a_tar_whose_last_member_is_a_zip_is_extracted_as_a_tar(tmp_path, archives):
    inner = _zip(archives / "inner.zip", {"inner_only.txt": b"inner"}).read_bytes()
    members = {"top/a.txt": b"a", "top/extras.zip": inner}
    archive = _tar(archives / "a.tar", [tarfile.TarInfo(name) for name in members], members, mode="w")
    assert zipfile.is_zipfile(archive)            # uncompressed: the zip's end record is near the file's end
    dest = safe_extract(archive, tmp_path / "out" / "dest")
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == ["top", "top/a.txt", "top/extras.zip"]
    assert (dest / "top" / "extras.zip").read_bytes() == inner


def _cut(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _flip_last_payload_byte(path: Path, payload: bytes) -> Path:
    data = path.read_bytes()
    at = data.index(payload) + len(payload) - 1
    path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
    return path


def _flip_byte(path: Path, at: int) -> Path:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _edit_zip(path: Path, edit) -> Path:
    """``path`` rewritten with ``edit(bytes, central)`` applied, ``central`` being where its first central-directory
    record (``PK\\1\\2``) starts."""
    data = bytearray(path.read_bytes())
    edit(data, data.index(b"PK\x01\x02"))
    path.write_bytes(bytes(data))
    return path


def _xor(data: bytearray, at: int, bits: int) -> None:
    data[at] ^= bits


_PAYLOAD = bytes(range(256)) * 64


@pytest.mark.parametrize("make_archive", [
    lambda folder: _cut(_tar(folder / "a.tar.gz", [tarfile.TarInfo("a.bin")], {"a.bin": _PAYLOAD})),
    lambda folder: _cut(_zip(folder / "a.zip", {"a.bin": _PAYLOAD})),
    lambda folder: _flip_last_payload_byte(_zip(folder / "a.zip", {"a.bin": _PAYLOAD}), _PAYLOAD),
    # A damaged deflate stream: zlib reports it before the CRC-32 is checked.
    lambda folder: _flip_byte(_zip(folder / "a.zip", {"a.bin": _PAYLOAD}, zipfile.ZIP_DEFLATED), 30 + len("a.bin") + 5),
    lambda folder: (folder / "a.txt").write_bytes(b"not an archive") and folder / "a.txt",
    # The stream's checksum at its end: bz2 reports it as a plain OSError once the whole archive is read.
    lambda folder: _flip_byte(_tar(folder / "a.tar.bz2", [tarfile.TarInfo("a.bin")], {"a.bin": _PAYLOAD},
                                   mode="w:bz2"), -3),
    # Damage that Python's zipfile reports as OSError, NotImplementedError or RuntimeError, not BadZipFile:
    # a damaged bz2 stream; the central directory's offset moved (a seek before the file's start); a compression
    # method it does not know (99); the encryption flag; a version it cannot extract (7.4).
    lambda folder: _flip_byte(_zip(folder / "a.zip", {"a.bin": _PAYLOAD}, zipfile.ZIP_BZIP2), 30 + len("a.bin") + 20),
    lambda folder: _edit_zip(_zip(folder / "a.zip", {"a.bin": b"a" * 500, "b.bin": b"b" * 500}),
                             lambda data, central: _xor(data, len(data) - 6, 0x40)),
    lambda folder: _edit_zip(_zip(folder / "a.zip", {"a.bin": b"a"}),
                             lambda data, central: _xor(data, central + 10, 99)),
    lambda folder: _edit_zip(_zip(folder / "a.zip", {"a.bin": b"a"}), lambda data, central: _xor(data, central + 8, 1)),
    lambda folder: _edit_zip(_zip(folder / "a.zip", {"a.bin": b"a"}),
                             lambda data, central: data.__setitem__(central + 6, 74)),
], ids=["tar.gz-cut", "zip-cut", "zip-damaged-byte", "zip-damaged-deflate-stream", "not-an-archive",
        "tar.bz2-damaged-checksum", "zip-damaged-bz2-stream", "zip-directory-offset", "zip-unknown-method",
        "zip-encrypted", "zip-future-version"])
def test_a_damaged_archive_is_a_data_error_and_writes_nothing(tmp_path, archives, make_archive):
    archive = make_archive(archives)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=f"{archive.name} .*download it again"):
        safe_extract(archive, out / "dest")
    assert _leftovers(out) == []


@pytest.mark.parametrize("where", ["folder", "missing", "under-a-file"])
def test_an_archive_path_that_is_no_file_is_a_data_error_that_says_so(tmp_path, archives, where):
    """Not a damaged archive (whose message says to delete it): the path names no file at all."""
    (archives / "folder").mkdir()
    (archives / "file").write_bytes(b"mine")
    archive = {"folder": archives / "folder", "missing": archives / "a.zip",
               "under-a-file": archives / "file" / "a.zip"}
    message = "is a folder" if where == "folder" else "is not there"
    with pytest.raises(DataError, match=f"{message}, so there is nothing to extract: pass the path of a tar or zip"):
        safe_extract(archive[where], tmp_path / "out" / "dest")
    assert not (tmp_path / "out").exists() and (archives / "file").read_bytes() == b"mine"


def test_a_cut_tar_is_a_data_error(tmp_path, archives):
    archive = _tar(archives / "a.tar", [tarfile.TarInfo("a.bin")], {"a.bin": _PAYLOAD}, mode="w")
    archive.write_bytes(archive.read_bytes()[: 512 + len(_PAYLOAD) // 2])     # the header and half the payload
    with pytest.raises(DataError, match="damaged .*download it again"):
        safe_extract(archive, tmp_path / "out" / "dest")
    assert _leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("cut", ["between-members", "after-the-last-member", "in-a-header", "garbage"])
def test_a_tar_cut_where_tarfile_sees_an_end_is_a_data_error(tmp_path, archives, cut):
    members = {"a.bin": _PAYLOAD, "b.bin": _PAYLOAD}
    archive = _tar(archives / "a.tar", [tarfile.TarInfo(name) for name in members], members, mode="w")
    whole, first = archive.read_bytes(), 512 + -(-len(_PAYLOAD) // 512) * 512     # header and padded data
    end = 2 * first if cut == "after-the-last-member" else first                  # where tarfile stops
    archive.write_bytes({"between-members": whole[:first], "after-the-last-member": whole[:2 * first],
                         "in-a-header": whole[:first + 100],
                         "garbage": whole[:first] + b"\xff" * 512 + whole[first:]}[cut])
    with pytest.raises(DataError, match="damaged .*no end-of-archive block after its last member, at byte "
                                        f"{end}.*download it again"):
        safe_extract(archive, tmp_path / "out" / "dest")
    assert _leftovers(tmp_path / "out") == []


def test_an_archive_extracted_meanwhile_by_another_process_is_kept(tmp_path, archives, monkeypatch):
    from lowlearn.data import cache

    archive = _zip(archives / "a.zip", {"a.txt": b"ours"})
    dest = tmp_path / "out" / "dest"
    extract = cache._extract

    def racing(archive, folder):
        extract(archive, folder)
        dest.mkdir()
        (dest / "a.txt").write_bytes(b"theirs")

    monkeypatch.setattr(cache, "_extract", racing)
    assert safe_extract(archive, dest) == dest
    assert (dest / "a.txt").read_bytes() == b"theirs"
    assert _leftovers(dest.parent) == ["dest"]


def _umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _missing(name: str) -> Resource:
    return Resource(name, (f"https://example.invalid/{name}",), "0" * 64, "sub")


def test_fetch_all_names_every_missing_file_in_one_error(tmp_path, monkeypatch):
    """fetch_all's docstring: one DatasetNotFoundError for *all* the missing files, each named with its URL and
    path (reference: the three resources given, the first of which is missing, and a present one in between)."""
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: pytest.fail("tried the network"))
    present = Resource("present.bin", ("https://example.invalid/present.bin",), hashlib.sha256(b"x").hexdigest(),
                       "sub")
    present.path(tmp_path).parent.mkdir()
    present.path(tmp_path).write_bytes(b"x")
    with pytest.raises(DatasetNotFoundError) as info:
        fetch_all([_missing("a.bin"), present, _missing("b.bin")], root=tmp_path, download=False)
    message = str(info.value)
    assert message.startswith("2 files are missing:")
    for name in ("a.bin", "b.bin"):
        assert f"https://example.invalid/{name}" in message and str(tmp_path / "sub" / name) in message
    assert "present.bin" not in message


@pytest.mark.skipif(not hasattr(tarfile, "data_filter"), reason="tarfile has no extraction filters")
def test_a_tar_member_is_extracted_without_setuid_and_without_write_for_others(tmp_path):
    """The "data" filter that safe_extract passes (tarfile docs, "Extraction filters": it clears the setuid,
    setgid and sticky bits and the group and other write bits): a member stored with mode 0o6777 is unpacked
    as 0o755, not as a set-user-ID file that anyone may rewrite."""
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("tool")
        info.size, info.mode = 3, 0o6777
        tf.addfile(info, io.BytesIO(b"abc"))
    dest = safe_extract(archive, tmp_path / "out")
    assert (dest / "tool").read_bytes() == b"abc"
    assert stat.S_IMODE((dest / "tool").stat().st_mode) == 0o755


def test_a_file_that_appears_at_dest_during_extraction_is_an_error_and_is_kept(tmp_path, monkeypatch):
    """safe_extract publishes its folder by renaming it to dest; if another process puts a *file* at dest meanwhile,
    the rename fails (a folder cannot replace a file: ENOTDIR) and, dest not being a folder, that is an error, not
    a success that returns a file as the extracted folder (docstring: "a file there is an error"). The file is kept
    and the temporary folder removed."""
    from lowlearn.data import cache

    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("x.txt", b"x")
    dest = tmp_path / "out"
    real_replace = os.replace

    def racing_replace(source, target):
        if os.fspath(target) == os.fspath(dest):
            dest.write_bytes(b"someone else's")          # another process writes a file there first
        return real_replace(source, target)

    monkeypatch.setattr(cache.os, "replace", racing_replace)
    with pytest.raises(OSError):
        safe_extract(archive, dest)
    assert dest.read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip", "out"]


def test_fetch_with_a_folder_at_the_files_path_is_a_data_error_and_keeps_the_folder(tmp_path):
    """A folder where the file should be is "something other than a file": a DataError that says so (not an
    IsADirectoryError from trying to checksum it), and the folder is left as it is."""
    resource = _resource(_source(tmp_path))
    folder = resource.path(tmp_path / "data")
    folder.mkdir(parents=True)
    (folder / "keep.txt").write_text("the user's")
    with pytest.raises(DataError, match="exists but is not a file"):
        fetch(resource, root=tmp_path / "data")
    assert (folder / "keep.txt").read_text() == "the user's"


def test_a_download_names_lowlearn_and_gives_up_on_a_silent_server(tmp_path, monkeypatch):
    """Each download sends a ``User-Agent`` of lowlearn's (some mirrors refuse Python's default one) and has a
    finite timeout, so that a mirror that stops answering fails over to the next instead of hanging forever."""
    real_urlopen, calls = urllib.request.urlopen, []

    def spy(request, *args, **kwargs):
        calls.append((request, kwargs.get("timeout", args[1] if len(args) > 1 else None)))
        return real_urlopen(request, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", spy)
    fetch(_resource(_source(tmp_path)), root=tmp_path / "data")
    (request, timeout), = calls
    assert request.get_header("User-agent") == "lowlearn"
    assert timeout is not None and 0 < timeout < float("inf")


@pytest.mark.parametrize("name", ["..", "top/..", "top\\.."])
def test_a_member_name_that_ends_in_dotdot_is_refused(name):
    """``..`` anywhere in a member's name is refused, also as its last part (``top/..`` is the folder above
    ``top``; a bare ``..`` the folder above the destination)."""
    with pytest.raises(UnsafeArchiveError, match="unsafe member name"):
        check_member_name(name, "a.tar")


def test_safe_extract_refuses_a_tar_folder_member_named_dotdot(tmp_path):
    """A tar whose folder member is ``..`` is unsafe (UnsafeArchiveError), and nothing is extracted."""
    archives = tmp_path / "archives"
    archives.mkdir()
    info = tarfile.TarInfo("..")
    info.type = tarfile.DIRTYPE
    with tarfile.open(archives / "up.tar", "w") as tf:
        tf.addfile(info)
    out = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match="up.tar"):
        safe_extract(archives / "up.tar", out / "dest")
    assert _leftovers(out) == []


def test_a_damaged_xz_tar_is_a_data_error_and_writes_nothing(tmp_path):
    """A .tar.xz with a damaged byte in the middle of its stream is a damaged archive (lzma reports it as
    LZMAError while the members are read): a DataError that says to download it again, and nothing extracted."""
    payload = b"".join(b"%d squared is %d\n" % (i, i * i) for i in range(40_000))   # compressed by lzma
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tf:
        for name in ("a.bin", "b.bin"):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    data = bytearray(buffer.getvalue())
    data[len(data) // 2] ^= 0xFF
    archive = tmp_path / "a.tar.xz"
    archive.write_bytes(bytes(data))
    with pytest.raises(lzma.LZMAError):                           # the damage is one lzma reports
        with tarfile.open(archive) as tf:
            tf.getmembers()
    out = tmp_path / "out"
    with pytest.raises(DataError, match="a.tar.xz is damaged .*download it again"):
        safe_extract(archive, out / "dest")
    assert _leftovers(out) == []


@pytest.mark.parametrize("silent", [True, False])
def test_fetch_all_stops_downloading_once_every_mirror_of_a_file_timed_out(tmp_path, monkeypatch, silent):
    """A network that drops packets makes every download wait for its timeout (60 s): after the first file whose
    mirrors all timed out, the others are only looked for on disk, and the one error still names every missing file.
    A network that refuses at once (reference: the same files, connection refused) keeps being tried for each file."""
    tried = []

    def urlopen(request, timeout):
        tried.append(request.full_url)
        raise urllib.error.URLError(TimeoutError("timed out") if silent else ConnectionRefusedError("refused"))

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    present = Resource("present.bin", ("https://example.invalid/present.bin",), hashlib.sha256(b"x").hexdigest(),
                       "sub")
    present.path(tmp_path).parent.mkdir()
    present.path(tmp_path).write_bytes(b"x")
    two_mirrors = [Resource(name, (f"https://a.invalid/{name}", f"https://b.invalid/{name}"), "0" * 64, "sub")
                   for name in ("a.bin", "b.bin", "c.bin")]
    with pytest.raises(DatasetNotFoundError) as info:
        fetch_all([two_mirrors[0], present, *two_mirrors[1:]], root=tmp_path)
    message = str(info.value)
    assert message.startswith("3 files are missing:")
    assert all(f"https://a.invalid/{name}" in message for name in ("a.bin", "b.bin", "c.bin"))
    if silent:
        assert tried == ["https://a.invalid/a.bin", "https://b.invalid/a.bin"]
        assert message.count("its download was not tried, since every mirror of a.bin timed out") == 2
    else:
        assert len(tried) == 6 and "not tried" not in message


def test_fetch_all_keeps_downloading_when_only_some_mirrors_of_a_file_timed_out(tmp_path, monkeypatch):
    """A mirror that timed out beside one that refused at once is no sign of a network that drops everything: the
    next files' mirrors are still tried."""
    tried = []

    def urlopen(request, timeout):
        tried.append(request.full_url)
        slow = request.full_url.startswith("https://a.invalid/")
        raise urllib.error.URLError(TimeoutError("timed out") if slow else ConnectionRefusedError("refused"))

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    two_mirrors = [Resource(name, (f"https://a.invalid/{name}", f"https://b.invalid/{name}"), "0" * 64, "sub")
                   for name in ("a.bin", "b.bin")]
    with pytest.raises(DatasetNotFoundError) as info:
        fetch_all(two_mirrors, root=tmp_path)
    assert tried == [f"https://{host}.invalid/{name}" for name in ("a.bin", "b.bin") for host in "ab"]
    assert "not tried" not in str(info.value)
