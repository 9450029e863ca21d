"""Omniglot loading: the real small sets when present, generated archives otherwise."""

from __future__ import annotations

import hashlib
import io
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowlearn.data import omniglot
from lowlearn.data.cache import (ENV_VAR, ChecksumError, DataError, DatasetNotFoundError, Resource, UnsafeArchiveError,
                                 data_root)
from lowlearn.data.omniglot import Omniglot, load_omniglot, load_omniglot_runs

DATA = data_root()          # $LOWLEARN_DATA, as .ci/run sets it
needs_real_data = pytest.mark.skipif(
    not (DATA / "omniglot" / "images_background_small1.zip").is_file()
    or not (DATA / "omniglot" / "images_background_small2.zip").is_file(),
    reason=f"the Omniglot small sets are not in {DATA / 'omniglot'}")


# ---------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def small1() -> Omniglot:
    return load_omniglot("small1", root=DATA, download=False)


@needs_real_data
def test_small1_shape_and_ink(small1):
    assert small1.images.shape == (136, 20, 1, 28, 28)
    assert small1.images.dtype == torch.float32
    assert small1.num_characters == len(small1.characters) == 136
    assert 0.0 <= small1.images.min() and small1.images.max() <= 1.0
    assert small1.images.mean() < 0.3  # ink on a mostly empty page
    assert small1.alphabets == sorted(set(small1.alphabets)) and len(small1.alphabets) == 5
    assert all(small1.characters[c].startswith(small1.alphabets[a] + "/character")
               for c, a in enumerate(small1.alphabet_index.tolist()))


@needs_real_data
def test_returned_tensors_are_independent_of_the_cache():
    load_omniglot("small1", root=DATA, download=False).images.fill_(7.0)
    assert load_omniglot("small1", root=DATA, download=False).images.max() <= 1.0


@needs_real_data
def test_sets_are_merged_by_character_name():
    small2 = load_omniglot("small2", root=DATA, download=False)
    assert small2.num_characters == 156
    both = load_omniglot(["small1", "small2"], root=DATA, download=False)
    assert both.num_characters == len(set(both.characters)) == 242
    small1 = load_omniglot("small1", root=DATA, download=False)
    for part in (small1, small2):                  # every character keeps its own drawings
        own = dict(zip(part.characters, part.images))
        for name, images in zip(both.characters, both.images):
            if name in own:
                assert torch.equal(images, own[name]), name
    extra = small2.without(["Greek", "Latin"])
    assert extra.num_characters == 106 and len(extra.alphabets) == 3
    assert extra.images.shape == (106, 20, 1, 28, 28)


@needs_real_data
def test_meta_train_and_meta_test_splits_share_no_character(small1):
    """small1 for meta-training, small2 without its Greek and Latin for meta-testing."""
    test_set = load_omniglot("small2", root=DATA, download=False).without(["Greek", "Latin"])
    assert not set(small1.characters) & set(test_set.characters)
    assert not set(small1.alphabets) & set(test_set.alphabets)

    def fingerprints(images):
        return {hashlib.sha256(drawing.numpy().tobytes()).hexdigest() for drawing in images.flatten(0, 1)}

    assert not fingerprints(small1.images) & fingerprints(test_set.images)
    # Greek and Latin are in both small sets: leaving them in would leak test classes.
    small2 = load_omniglot("small2", root=DATA, download=False)
    assert fingerprints(small1.subset("Greek").images) == fingerprints(small2.subset("Greek").images)


@needs_real_data
def test_original_size_and_env_var(monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(DATA))
    original = load_omniglot("small1", image_size=None, download=False)
    assert original.images.shape == (136, 20, 1, 105, 105)
    assert ((original.images == 0) | (original.images == 1)).all()  # the files are 1-bit


@needs_real_data
def test_rotations(small1):
    rotated = small1.with_rotations()
    c = small1.num_characters
    assert rotated.num_characters == 4 * c
    assert rotated.characters[c] == small1.characters[0] + "/rot90"
    image = small1.images[0, 3, 0]
    counterclockwise = torch.from_numpy(np.rot90(image.numpy()).copy())
    assert torch.equal(rotated.images[c, 3, 0], counterclockwise)
    assert torch.equal(rotated.images[0], small1.images[0])
    assert torch.equal(rotated.alphabet_index, small1.alphabet_index.repeat(4))
    with pytest.raises(ValueError, match="once"):
        rotated.with_rotations()


# ---------------------------------------------------------------- generated archives

def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _install(monkeypatch, root: Path, key: str, members: dict[str, bytes]) -> None:
    """Write ``members`` as a zip under ``root/omniglot`` and make it OMNIGLOT_RESOURCES[key]."""
    path = root / "omniglot" / f"{key}-test.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    resource = Resource(path.name, ("https://example.invalid/" + path.name,), sha, "omniglot")
    monkeypatch.setitem(omniglot.OMNIGLOT_RESOURCES, key, resource)


def _grey(value: int) -> np.ndarray:
    """A 4x4 image whose top-left pixel is ``value`` on white."""
    pixels = np.full((4, 4), 255)
    pixels[0, 0] = value
    return pixels


def _tiny_set(drawers: int = 20) -> dict[str, bytes]:
    """2 alphabets x 2 characters x ``drawers`` drawings; pixel (0, 0) encodes the drawing."""
    members = {}
    for a, alphabet in enumerate(["Beta", "Alpha"]):
        for c in (1, 2):
            for d in range(drawers):
                value = 10 * d + 5 * c + a  # distinct grey levels < 255
                members[f"tiny/{alphabet}/character{c:02d}/{c:02d}{a:02d}_{d + 1:02d}.png"] = _png(_grey(value))
    return members


def test_parsing_and_exact_ink(tmp_path, monkeypatch):
    _install(monkeypatch, tmp_path, "small1", _tiny_set())
    data = load_omniglot("small1", root=tmp_path, image_size=None, download=False)
    assert data.characters == ["Alpha/character01", "Alpha/character02", "Beta/character01", "Beta/character02"]
    assert data.alphabets == ["Alpha", "Beta"]
    assert data.alphabet_index.tolist() == [0, 0, 1, 1]
    assert data.images.shape == (4, 20, 1, 4, 4)
    values = torch.tensor([[10 * d + 5 * c + a for d in range(20)] for a in (1, 0) for c in (1, 2)])
    assert torch.equal(data.images[:, :, 0, 0, 0], (255 - values).float() / 255)
    assert torch.equal(data.images[:, :, 0, 1:, :], torch.zeros(4, 20, 3, 4))
    assert data.subset("Beta").characters == ["Beta/character01", "Beta/character02"]
    assert data.subset("Beta").alphabet_index.tolist() == [0, 0]
    assert load_omniglot("small1", root=tmp_path, image_size=2, download=False).images.shape == (4, 20, 1, 2, 2)
    assert load_omniglot("small1", root=tmp_path, image_size=np.int64(2), download=False).images.shape[-1] == 2


def test_unknown_names_are_refused(tmp_path, monkeypatch):
    _install(monkeypatch, tmp_path, "small1", _tiny_set())
    data = load_omniglot("small1", root=tmp_path, image_size=None, download=False)
    with pytest.raises(ValueError, match=r"unknown alphabet.*'Gamma'.*\['Alpha', 'Beta'\]"):
        data.without(["Gamma"])
    with pytest.raises(ValueError, match="runs"):
        load_omniglot("runs", root=tmp_path)
    with pytest.raises(ValueError, match=r"sets must be one or more of .*; got \[\]"):
        load_omniglot([], root=tmp_path)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="image_size"):
            load_omniglot("small1", root=tmp_path, image_size=bad, download=False)
    with pytest.raises(ValueError, match="image_size"):                   # before looking for the files
        load_omniglot("small2", root=tmp_path / "empty", image_size=0, download=False)


def test_a_dataset_built_from_names_has_sorted_alphabets_and_checks_its_shapes():
    data = Omniglot.from_characters(torch.zeros(3, 20, 1, 4, 4), ["Beta/character01", "Alpha/character01",
                                                                   "Beta/character02"])
    assert data.alphabets == ["Alpha", "Beta"] and data.alphabet_index.tolist() == [1, 0, 1]
    assert repr(data) == "Omniglot(characters=3, alphabets=2, drawers=20, image_size=4)"
    with pytest.raises(ValueError, match=r"got images \(3, 20, 4, 4\), 3 names, 3 alphabet indices"):
        Omniglot.from_characters(torch.zeros(3, 20, 4, 4), data.characters)
    with pytest.raises(ValueError, match="got images .*, 2 names, 2 alphabet indices"):
        Omniglot.from_characters(data.images, data.characters[:2])
    with pytest.raises(ValueError, match="3 names, 2 alphabet indices"):
        Omniglot(data.images, data.characters, data.alphabets, data.alphabet_index[:2])


def test_merged_sets_are_sorted_by_character_name(tmp_path, monkeypatch):
    tiny = _tiny_set()
    _install(monkeypatch, tmp_path, "small1", {k: v for k, v in tiny.items() if "/Beta/" in k})
    _install(monkeypatch, tmp_path, "small2", {k: v for k, v in tiny.items() if "/Alpha/" in k})
    both = load_omniglot(["small1", "small2"], root=tmp_path, image_size=None, download=False)
    assert both.characters == ["Alpha/character01", "Alpha/character02", "Beta/character01", "Beta/character02"]
    assert both.images[:, 0, 0, 0, 0].mul(255).round().tolist() == [255 - (5 * c + a) for a in (1, 0) for c in (1, 2)]


def test_drawers_are_in_file_name_order_whatever_the_order_in_the_archive(tmp_path, monkeypatch):
    _install(monkeypatch, tmp_path, "small1", dict(reversed(list(_tiny_set().items()))))
    data = load_omniglot("small1", root=tmp_path, image_size=None, download=False)
    values = torch.tensor([[10 * d + 5 * c + a for d in range(20)] for a in (1, 0) for c in (1, 2)])
    assert torch.equal(data.images[:, :, 0, 0, 0], (255 - values).float() / 255)


@pytest.mark.parametrize("side", [4, 8])        # 8 to 2: one Lanczos pass, no box-averaging first (reducing_gap)
def test_images_are_resized_with_a_lanczos_filter(tmp_path, monkeypatch, side):
    pixels = np.random.default_rng(0).integers(0, 256, (side, side))
    members = {name: _png(pixels) for name in _tiny_set()}
    _install(monkeypatch, tmp_path, "small1", members)
    data = load_omniglot("small1", root=tmp_path, image_size=2, download=False)
    resized = Image.fromarray(pixels.astype(np.uint8), mode="L").resize((2, 2), resample=Image.Resampling.LANCZOS)
    expected = torch.from_numpy(255 - np.asarray(resized, dtype=np.float32)) / 255
    assert torch.equal(data.images[0, 0, 0], expected) and torch.equal(data.images[3, 19, 0], expected)


@pytest.mark.parametrize("edit, message", [
    (lambda m: {**m, "tiny/Alpha/character01/extra/0101_01.png": m["tiny/Alpha/character01/0101_01.png"]},
     "holds 'tiny/Alpha/character01/extra/0101_01.png', but an Omniglot image archive holds only"),
    (lambda m: {**m, "tiny/Alpha/character01/0101_21.png": m["tiny/Alpha/character01/0101_01.png"]},
     "Alpha/character01 has 21 drawings, expected 20"),
    (lambda m: {"tiny/readme.txt": b"no images"}, "holds no PNG images"),
], ids=["too-deep", "21-drawings", "no-png"])
def test_an_archive_without_omniglots_layout_is_an_error(tmp_path, monkeypatch, edit, message):
    _install(monkeypatch, tmp_path, "small1", edit(_tiny_set()))
    with pytest.raises(DataError, match=message):
        load_omniglot("small1", root=tmp_path, download=False)


def test_unsafe_member_is_refused(tmp_path, monkeypatch):
    _install(monkeypatch, tmp_path, "small1", {**_tiny_set(), "../evil.png": _png(_grey(0))})
    with pytest.raises(UnsafeArchiveError, match=r"\.\./evil\.png"):
        load_omniglot("small1", root=tmp_path, download=False)


def test_missing_drawing_is_an_error(tmp_path, monkeypatch):
    members = _tiny_set()
    del members["tiny/Alpha/character02/0201_20.png"]
    _install(monkeypatch, tmp_path, "small1", members)
    with pytest.raises(DataError, match="Alpha/character02 has 19 drawings, expected 20"):
        load_omniglot("small1", root=tmp_path, download=False)


def test_checksum_mismatch_is_an_error(tmp_path, monkeypatch):
    _install(monkeypatch, tmp_path, "small1", _tiny_set())
    resource = omniglot.OMNIGLOT_RESOURCES["small1"]
    monkeypatch.setitem(omniglot.OMNIGLOT_RESOURCES, "small1",
                        Resource(resource.filename, resource.urls, "0" * 64, resource.subdir))
    with pytest.raises(ChecksumError):
        load_omniglot("small1", root=tmp_path, download=False)


# ---------------------------------------------------------------- one-shot runs

def _tiny_runs(runs: int = 20) -> tuple[dict[str, bytes], list[list[int]]]:
    """``runs`` runs of 20 classes; test item i belongs to a permuted class; pixel (0, 0) encodes the class."""
    generator = torch.Generator().manual_seed(0)
    members, truth = {}, []
    for r in range(1, runs + 1):
        labels = torch.randperm(20, generator=generator).tolist()
        truth.append(labels)
        lines = []
        for i in range(20):
            members[f"run{r:02d}/training/class{i + 1:02d}.png"] = _png(_grey(i))
            members[f"run{r:02d}/test/item{i + 1:02d}.png"] = _png(_grey(labels[i]))
            lines.append(f"run{r:02d}/test/item{i + 1:02d}.png run{r:02d}/training/class{labels[i] + 1:02d}.png")
        members[f"run{r:02d}/class_labels.txt"] = ("\n".join(lines) + "\n").encode()
    return members, truth


def test_runs(tmp_path, monkeypatch):
    members, truth = _tiny_runs()
    _install(monkeypatch, tmp_path, "runs", members)
    runs = load_omniglot_runs(root=tmp_path, image_size=None, download=False)
    assert len(runs) == 20
    for run, labels in zip(runs, truth):
        assert run.support.shape == run.query.shape == (20, 1, 4, 4)
        assert torch.equal(run.support_labels, torch.arange(20))
        assert run.query_labels.tolist() == labels
        assert torch.equal(run.query[:, 0, 0, 0], run.support[run.query_labels, 0, 0, 0])


@pytest.mark.skipif(not (DATA / "omniglot" / "all_runs.zip").is_file(),
                    reason=f"the official runs (all_runs.zip) are not in {DATA / 'omniglot'}")
def test_the_official_runs():
    # Lake et al.'s archive: run01/class_labels.txt begins "run01/test/item01.png run01/training/class08.png",
    # then class09 and class02; run20's begins with class16, class04 and class17.
    runs = load_omniglot_runs(root=DATA, image_size=None, download=False)
    assert len(runs) == 20 and runs[0].support.shape == runs[0].query.shape == (20, 1, 105, 105)
    assert runs[0].query_labels[:3].tolist() == [7, 8, 1] and runs[19].query_labels[:3].tolist() == [15, 3, 16]
    assert all(sorted(run.query_labels.tolist()) == list(range(20)) for run in runs)   # one test item per class


def test_the_pairing_follows_the_names_on_each_line_not_the_order_of_the_lines(tmp_path, monkeypatch):
    """Lake et al.'s demo sorts the test files but takes the answers in line order (right only because every
    official class_labels.txt lists item01 .. item20 in order); the loader maps by name, whatever the order."""
    members, truth = _tiny_runs(runs=2)
    for r, order in ((1, range(19, -1, -1)), (2, [3, 0, 19, 7, 1, 2, *range(4, 7), *range(8, 19)])):
        lines = members[f"run{r:02d}/class_labels.txt"].decode().splitlines()
        members[f"run{r:02d}/class_labels.txt"] = "\n".join(lines[j] for j in order).encode()
    _install(monkeypatch, tmp_path, "runs", members)
    runs = load_omniglot_runs(root=tmp_path, image_size=None, download=False)
    assert [run.query_labels.tolist() for run in runs] == truth
    for run in runs:
        assert torch.equal(run.query[:, 0, 0, 0], run.support[run.query_labels, 0, 0, 0])


def test_a_drawing_reads_the_same_in_the_runs_as_in_a_background_set(tmp_path, monkeypatch):
    """The same PNG in a background archive and in the runs archive gives the same tensor at 105 px and after the
    resize to 28 px: the runs are scored with the training data's polarity (ink 1 on black pixels), orientation
    and filter."""
    rng = np.random.default_rng(0)
    page = np.where(rng.random((105, 105)) < 0.1, 0, 255)
    page[:30, :5] = 0                                              # a bar at the top left: the orientation
    _install(monkeypatch, tmp_path, "small1", {f"bg/Alpha/character01/0101_{d + 1:02d}.png": _png(page)
                                               for d in range(20)})
    runs = {f"run01/{kind}{k + 1:02d}.png": _png(page) for kind in ("training/class", "test/item") for k in range(20)}
    runs["run01/class_labels.txt"] = "\n".join(f"run01/test/item{k + 1:02d}.png run01/training/class{k + 1:02d}.png"
                                               for k in range(20)).encode()
    _install(monkeypatch, tmp_path, "runs", runs)
    for size in (None, 28):
        drawn = load_omniglot("small1", root=tmp_path, image_size=size, download=False).images[0, 0]
        run = load_omniglot_runs(root=tmp_path, image_size=size, download=False)[0]
        assert torch.equal(run.support[3], drawn) and torch.equal(run.query[7], drawn)
    original = load_omniglot_runs(root=tmp_path, image_size=None, download=False)[0].support[0, 0]
    assert torch.equal(original, torch.from_numpy((page == 0).astype(np.float32)))


def test_blank_lines_and_windows_line_ends_in_class_labels_are_accepted(tmp_path, monkeypatch):
    members, truth = _tiny_runs(runs=2)
    members["run02/class_labels.txt"] = (b"\r\n" + members["run02/class_labels.txt"].replace(b"\n", b"\r\n")
                                         + b"\r\n")
    _install(monkeypatch, tmp_path, "runs", members)
    runs = load_omniglot_runs(root=tmp_path, image_size=None, download=False)
    assert [run.query_labels.tolist() for run in runs] == truth


@pytest.mark.parametrize("edit, message", [
    (lambda text: text.split("\n", 1)[1], "has 19 lines, expected 20"),
    (lambda text: text.replace("training/class", "training/klass", 1), "does not name"),
    (lambda text: text.replace(".png\n", ".png run02/training/class01.png\n", 1), "does not name"),
    (lambda text: text.replace("item02.png", "item01.png", 1), r"gives no class for \['run02/test/item02.png'\]"),
    (lambda text: text.replace(text.split()[3], text.split()[1], 1),
     r"matches no test image to \['run02/training/class\d\d.png'\]"),
], ids=["19-lines", "not-a-training-image", "three-names", "an-item-twice", "a-class-twice"])
def test_malformed_class_labels(tmp_path, monkeypatch, edit, message):
    members, _ = _tiny_runs(runs=2)
    members["run02/class_labels.txt"] = edit(members["run02/class_labels.txt"].decode()).encode()
    _install(monkeypatch, tmp_path, "runs", members)
    with pytest.raises(DataError, match=f"run02/class_labels.txt.*{message}"):
        load_omniglot_runs(root=tmp_path, download=False)


@pytest.mark.parametrize("edit, message", [
    (lambda m: {k: v for k, v in m.items() if k != "run02/test/item07.png"},
     "run02 has 20 training and 19 test images, expected 20 of each"),
    (lambda m: {k: v for k, v in m.items() if k != "run02/training/class07.png"},
     "run02 has 19 training and 20 test images, expected 20 of each"),
    (lambda m: {k: v for k, v in m.items() if k != "run02/class_labels.txt"}, "has no run02/class_labels.txt"),
], ids=["missing-test-image", "missing-training-image", "missing-class-labels"])
def test_an_incomplete_run_is_an_error(tmp_path, monkeypatch, edit, message):
    members, _ = _tiny_runs(runs=2)
    _install(monkeypatch, tmp_path, "runs", edit(members))
    with pytest.raises(DataError, match=message):
        load_omniglot_runs(root=tmp_path, download=False)


@pytest.mark.parametrize("load", [lambda root: load_omniglot("small1", root=root, download=False),
                                  lambda root: load_omniglot_runs(root=root, download=False)], ids=["sets", "runs"])
def test_offline_a_missing_archive_is_not_downloaded(tmp_path, monkeypatch, load):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: pytest.fail("tried the network"))
    with pytest.raises(DatasetNotFoundError, match=r"download=False.* Download it from https://"):
        load(tmp_path)


def test_every_missing_set_is_named_in_one_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="2 files are missing") as error:
        load_omniglot(["small1", "small2"], root=tmp_path, download=False)
    for name in ("images_background_small1.zip", "images_background_small2.zip"):
        assert f"{name} is not at {tmp_path / 'omniglot' / name}" in str(error.value)
