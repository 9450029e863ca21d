"""Edge cases of lowlearn.atomic.atomic_file: failures, folders, read-only files, long names, links."""

import errno
import os
import stat
import warnings

import pytest

from lowlearn import atomic
from lowlearn.atomic import atomic_file


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")]


def test_an_error_while_writing_a_new_file_creates_nothing(tmp_path):
    """overwrite=False and an exception in the block: no target, no temporary file."""
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(tmp_path / "new.bin", overwrite=False) as handle:
            handle.write(b"half")
            raise RuntimeError("boom")
    assert not (tmp_path / "new.bin").exists() and not leftovers(tmp_path)


def test_a_folder_at_the_target_is_never_replaced(tmp_path):
    """A folder where the file should go: both modes refuse, the folder and its content stay, nothing is left behind."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "inside.txt").write_text("kept")
    with pytest.raises(FileExistsError):
        with atomic_file(folder, overwrite=False) as handle:
            handle.write(b"x")
    with pytest.raises(IsADirectoryError):
        with atomic_file(folder, overwrite=True) as handle:
            handle.write(b"x")
    assert (folder / "inside.txt").read_text() == "kept" and not leftovers(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_overwrite_replaces_files_only_and_refuses_a_pipe_or_a_folder_before_the_block_runs(tmp_path):
    """A rename would replace a pipe or a device (such as /dev/null) by a file: it is refused, as a folder is."""
    pipe, folder = tmp_path / "pipe", tmp_path / "folder"
    os.mkfifo(pipe)
    folder.mkdir()
    for target, error in ((pipe, FileExistsError), (folder, IsADirectoryError)):
        ran = []
        with pytest.raises(error, match="overwrite=True replaces files only"):
            with atomic_file(target, overwrite=True) as handle:
                ran.append(handle)
        assert ran == []
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode) and folder.is_dir() and not leftovers(tmp_path)


def test_a_read_only_file_is_replaced_with_overwrite_and_stays_read_only(tmp_path):
    """The temporary file takes mode 0o444 before the first byte; writing through the open descriptor still works."""
    target = tmp_path / "frozen.json"
    target.write_text("old")
    target.chmod(0o444)
    with atomic_file(target, overwrite=True, text=True) as handle:
        handle.write("new")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o444
    assert not leftovers(tmp_path)


def test_a_replacement_is_synced_before_and_its_folder_after_the_rename(tmp_path, monkeypatch):
    """overwrite=True: fsync of the full file while the old content is still published, then of the folder."""
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append((os.fstat(fd), target.read_bytes()))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with atomic_file(target, overwrite=True) as handle:
        handle.write(b"x" * 100)
    (first, seen_first), (second, seen_second) = synced
    assert stat.S_ISREG(first.st_mode) and first.st_size == 100 and seen_first == b"old"
    assert second.st_ino == tmp_path.stat().st_ino and seen_second == b"x" * 100


@pytest.mark.parametrize("char", ["é", "\N{GRINNING FACE}"], ids=["2-byte", "4-byte"])
def test_a_unicode_name_as_long_as_the_file_system_allows(tmp_path, char):
    """NAME_MAX counts bytes: a name of multi-byte characters at the limit still gets a temporary name, both modes."""
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    size = len(char.encode())
    name = char * ((name_max - 4) // size) + ".bin"
    assert len(name.encode()) > name_max - size
    target = tmp_path / name
    with atomic_file(target, overwrite=False) as handle:
        handle.write(b"first")
    with atomic_file(target, overwrite=True) as handle:
        handle.write(b"second")
    assert target.read_bytes() == b"second" and not leftovers(tmp_path)


def test_a_chain_of_links_into_another_folder_keeps_its_links(tmp_path):
    """overwrite=True through link -> link -> file in another folder: the file is replaced there, both links stay."""
    (tmp_path / "store").mkdir()
    real = tmp_path / "store" / "cpu.json"
    real.write_text("old")
    (tmp_path / "middle.json").symlink_to(real)
    (tmp_path / "front.json").symlink_to(tmp_path / "middle.json")
    with atomic_file(tmp_path / "front.json", overwrite=True, text=True) as handle:
        handle.write("new")
    assert (tmp_path / "front.json").is_symlink() and (tmp_path / "middle.json").is_symlink()
    assert real.read_text() == "new" and not leftovers(tmp_path) and not leftovers(tmp_path / "store")


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EIO], ids=["unsupported", "failed"])
def test_a_folder_that_cannot_be_flushed_does_not_turn_a_saved_file_into_an_error(tmp_path, monkeypatch, code):
    """The folder's fsync comes after the file is published: a file system that cannot flush folders (EINVAL) is
    skipped silently, any other failure (EIO) is a warning that names the saved file, and in both cases the file
    is in place with its new content, nothing is left behind, and the caller gets no exception."""
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    target = tmp_path / "a.json"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for overwrite, text in ((False, "first"), (True, "second")):
            with atomic_file(target, overwrite=overwrite, text=True) as handle:
                handle.write(text)
    assert target.read_text() == "second" and not leftovers(tmp_path)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if code == errno.EINVAL:
        assert messages == []
    else:
        assert len(messages) == 2 and all(f"{target} is saved" in m and "power" in m for m in messages)
        assert all(w.filename == __file__ for w in caught)               # pointed at the caller's with-block
