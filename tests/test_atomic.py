import os
import stat

import numpy as np
import pytest
import torch

from lowlearn import atomic
from lowlearn.atomic import atomic_file, new_file_mode
from lowlearn.train import save_checkpoint


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")]


def test_a_published_file_is_whole_and_has_the_mode_of_a_new_file(tmp_path):
    with atomic_file(tmp_path / "sub" / "a.txt", overwrite=False, text=True) as handle:
        handle.write("héllo")
        assert not (tmp_path / "sub" / "a.txt").exists()          # nothing visible while writing
    assert (tmp_path / "sub" / "a.txt").read_text(encoding="utf-8") == "héllo"
    assert mode(tmp_path / "sub" / "a.txt") == new_file_mode() == 0o666 & ~_umask()
    assert not leftovers(tmp_path / "sub")


def test_an_error_while_writing_publishes_nothing(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(tmp_path / "a.bin", overwrite=True) as handle:
            handle.write(b"new")
            raise RuntimeError("boom")
    assert (tmp_path / "a.bin").read_bytes() == b"old" and not leftovers(tmp_path)


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_file_that_appears_while_writing_is_not_replaced(tmp_path, monkeypatch, hard_links):
    if not hard_links:
        def no_links(source, target):
            raise PermissionError("this file system has no hard links")
        monkeypatch.setattr(atomic.os, "link", no_links)
    target = tmp_path / "run.pt"
    with pytest.raises(FileExistsError, match="left as it is"):
        with atomic_file(target, overwrite=False) as handle:
            handle.write(b"mine")
            target.write_bytes(b"another run's")                 # another writer finishes first
    assert target.read_bytes() == b"another run's" and not leftovers(tmp_path)
    with atomic_file(tmp_path / "new.pt", overwrite=False) as handle:   # the fallback still publishes new files
        handle.write(b"mine")
    assert (tmp_path / "new.pt").read_bytes() == b"mine"


def test_checkpoint_extras_are_checked_before_anything_is_written(tmp_path):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="best=np.float64.*float\\(x\\)"):
        save_checkpoint(tmp_path / "c.pt", model, best=np.float64(0.9))
    assert not list(tmp_path.iterdir())
    save_checkpoint(tmp_path / "c.pt", model, best=0.9, sizes=[1, 2], note={"a": torch.ones(2)})
    assert mode(tmp_path / "c.pt") == new_file_mode()


def _umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask
