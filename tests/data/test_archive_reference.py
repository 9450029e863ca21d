"""Archive extraction safety: hand-built tar and zip files with the attacks tests/data/test_cache.py does not build.

tests/data/test_cache.py covers '..' and absolute names in zip, '..' in tar, symlinks/hardlinks/devices/fifos
in tar. These add: absolute tar names, a '..' hidden in a pax extended header or a GNU long name (the
header's own name field is harmless), relative symlinks that stay inside the folder, zip members flagged as
Unix symlinks (zipfile must write them as plain files, never as links), and the checksum-before-use and
no-overwrite guarantees of fetch seen from the loaders' side.
"""

from __future__ import annotations

import hashlib
import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from lowlearn.data.cache import ChecksumError, Resource, UnsafeArchiveError, fetch, safe_extract


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], fmt=tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as tf:
        for info, payload in members:
            if payload is not None:
                info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def _file(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


@pytest.mark.parametrize("name", ["/tmp/evil", "top/../../evil", "./../evil", "top/sub/../../../evil"])
def test_tar_names_that_leave_the_folder_are_refused_and_nothing_is_written(tmp_path, name):
    """A tar member with an absolute name or one whose '..' climbs out of dest (zip slip, tar flavour)."""
    archive = _tar(tmp_path / "a.tar", [(_file("ok.txt"), b"ok"), (_file(name), b"evil")])
    out = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match="a.tar"):
        safe_extract(archive, out / "dest")
    assert _leftovers(out) == [] and not (tmp_path / "evil").exists()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax-path", "gnu-longname"])
def test_a_traversal_hidden_in_a_long_name_record_is_refused(tmp_path, fmt):
    """The long name lives in a pax 'path' record or a GNU ././@LongLink block; the 100-byte field is harmless."""
    long_name = "a" * 120 + "/../../../evil"
    archive = _tar(tmp_path / "a.tar", [(_file(long_name), b"evil")], fmt=fmt)
    raw = archive.read_bytes()
    assert long_name.encode() in raw                                  # really stored in the extended record
    out = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, out / "dest")
    assert _leftovers(out) == []


def test_even_a_relative_symlink_that_stays_inside_is_refused(tmp_path):
    """Links are refused outright (the docstring's promise), not only those that point outside."""
    link = tarfile.TarInfo("top/link")
    link.type, link.linkname = tarfile.SYMTYPE, "a.txt"
    archive = _tar(tmp_path / "a.tar", [(_file("top/a.txt"), b"a"), (link, None)])
    with pytest.raises(UnsafeArchiveError, match="link or device"):
        safe_extract(archive, tmp_path / "out" / "dest")
    assert _leftovers(tmp_path / "out") == []


def test_a_symlink_then_a_file_written_through_it_is_refused(tmp_path):
    """The classic two-step tar attack: a link 'top/dir' -> '/tmp' then a file 'top/dir/evil'."""
    link = tarfile.TarInfo("top/dir")
    link.type, link.linkname = tarfile.SYMTYPE, str(tmp_path / "victim")
    (tmp_path / "victim").mkdir()
    archive = _tar(tmp_path / "a.tar", [(link, None), (_file("top/dir/evil"), b"evil")])
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, tmp_path / "out" / "dest")
    assert _leftovers(tmp_path / "victim") == [] and _leftovers(tmp_path / "out") == []


def test_a_zip_member_flagged_as_a_unix_symlink_is_written_as_a_plain_file(tmp_path):
    """zipfile never creates links: a member whose external attributes say S_IFLNK becomes a small file
    holding the target's name, so it cannot redirect later writes outside dest."""
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("top/link")
        info.create_system = 3                                         # Unix
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc")
        zf.writestr("top/ok.txt", b"ok")
    dest = safe_extract(archive, tmp_path / "out" / "dest")
    link = dest / "top" / "link"
    assert not link.is_symlink() and link.is_file() and link.read_bytes() == b"/etc"
    assert (dest / "top" / "ok.txt").read_bytes() == b"ok"


def test_fetch_refuses_a_present_file_with_the_wrong_digest_and_leaves_it_byte_for_byte(tmp_path):
    """Checksum before use, and a user's file is never replaced, even with a working mirror to download from."""
    good = b"the real dataset"
    server = tmp_path / "server.bin"
    server.write_bytes(good)
    resource = Resource("data.bin", (server.as_uri(),), hashlib.sha256(good).hexdigest(), "sub")
    mine = tmp_path / "root" / "sub" / "data.bin"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my own notes")
    with pytest.raises(ChecksumError, match="does not overwrite"):
        fetch(resource, tmp_path / "root")
    assert mine.read_bytes() == b"my own notes" and _leftovers(mine.parent) == ["data.bin"]
