"""Omniglot: 1623 handwritten characters from 50 alphabets, 20 drawings each.

Lake, Salakhutdinov and Tenenbaum (2015), "Human-level concept learning through
probabilistic program induction", Science 350(6266). Every character was drawn
once by each of 20 people ("drawers"), so Omniglot is the transpose of MNIST:
many classes, few examples per class, the standard benchmark of few-shot learning.

The archives come from the authors' repository (https://github.com/brendenlake/omniglot):

* ``"background"`` (30 alphabets, 964 characters) and ``"evaluation"``
  (20 other alphabets, 659 characters): the full split;
* ``"small1"`` and ``"small2"`` (5 background alphabets each, 136 and 156
  characters; Greek and Latin are in both): the small training sets of the paper;
* ``"runs"``: the 20 runs of the paper's one-shot classification task
  (see :func:`load_omniglot_runs`).

Images are read straight from the verified zip (nothing is extracted to disk) and
returned as float32 *ink*: 1.0 where the pen drew, 0.0 on the background (the
files are black ink on white paper). The last four archives decoded (each at one
image size) are kept in memory, so loading one of them again is instant.
"""

from __future__ import annotations

import functools
import io
import os
import zipfile
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lowlearn.checks import is_integer
from lowlearn.data.cache import DataError, Resource, check_member_name, fetch, fetch_all

DRAWERS = 20
"""Number of drawings of each character (one by each of 20 people)."""

RUN_WAYS = 20
"""Number of classes in each 20-way one-shot run of Lake et al. (2015)."""

ORIGINAL_SIZE = 105
"""Side of the original Omniglot images, in pixels."""

_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
_CHARACTER_SETS = ("background", "evaluation", "small1", "small2")
_ROTATIONS = (0, 90, 180, 270)


def _resource(filename: str, path: str, sha256: str) -> Resource:
    return Resource(filename=filename, urls=(_URL + path,), sha256=sha256, subdir="omniglot")


OMNIGLOT_RESOURCES: dict[str, Resource] = {
    "background": _resource(
        "images_background.zip", "images_background.zip",
        "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640"),
    "evaluation": _resource(
        "images_evaluation.zip", "images_evaluation.zip",
        "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee"),
    "small1": _resource(
        "images_background_small1.zip", "images_background_small1.zip",
        "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4"),
    "small2": _resource(
        "images_background_small2.zip", "images_background_small2.zip",
        "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f"),
    "runs": _resource(
        "all_runs.zip", "one-shot-classification/all_runs.zip",
        "437c1eeab0af8484112e1b4cc0f3d541ec727f7c47b9b202da738af9dfd6c325"),
}
"""The Omniglot archives, by the keys that :func:`load_omniglot` accepts (plus ``"runs"``)."""


@dataclass(repr=False)
class Omniglot:
    """Omniglot characters as one class-indexed tensor.

    Attributes:
        images: float32 ``(characters, 20, 1, S, S)``, ink 1.0 on background 0.0;
            ``images[c, d]`` is character ``c`` as drawn by drawer ``d``.
        characters: ``"Alphabet/characterNN"`` name of each character (rotated
            copies add ``"/rot90"`` etc., see :meth:`with_rotations`).
        alphabets: sorted names of the alphabets present.
        alphabet_index: int64 ``(characters,)``, the alphabet of each character
            as an index into ``alphabets``.

    ``images`` is the ``(C, M, *shape)`` layout that
    :class:`lowlearn.data.episodes.EpisodeSampler` samples episodes from.
    """

    images: Tensor
    characters: list[str]
    alphabets: list[str]
    alphabet_index: Tensor

    def __post_init__(self) -> None:
        if self.images.dim() != 5 or not (
                self.images.shape[0] == len(self.characters) == self.alphabet_index.shape[0]):
            raise ValueError(
                f"Omniglot needs images of shape (characters, drawers, 1, S, S) with one name and "
                f"one alphabet index per character; got images {tuple(self.images.shape)}, "
                f"{len(self.characters)} names, {self.alphabet_index.shape[0]} alphabet indices")

    @classmethod
    def from_characters(cls, images: Tensor, characters: list[str]) -> Omniglot:
        """Build a dataset from images and ``"Alphabet/..."`` names; derive the alphabets from the names."""
        of_character = [name.split("/")[0] for name in characters]
        alphabets = sorted(set(of_character))
        position = {name: i for i, name in enumerate(alphabets)}
        alphabet_index = torch.tensor([position[a] for a in of_character], dtype=torch.long)
        return cls(images, list(characters), alphabets, alphabet_index)

    @property
    def num_characters(self) -> int:
        """Number of characters (classes)."""
        return len(self.characters)

    def __repr__(self) -> str:
        drawers, size = self.images.shape[1], self.images.shape[-1]
        return (f"Omniglot(characters={self.num_characters}, alphabets={len(self.alphabets)}, "
                f"drawers={drawers}, image_size={size})")

    def subset(self, alphabets: str | Iterable[str]) -> Omniglot:
        """The characters of the given alphabets (one name or several), in their current order."""
        wanted = self._known(alphabets)
        return self._select([a in wanted for a in self.alphabets])

    def without(self, alphabets: str | Iterable[str]) -> Omniglot:
        """The characters of every alphabet except the given ones.

        E.g. ``small2.without(["Greek", "Latin"])`` drops the alphabets that
        ``small1`` shares with ``small2``.
        """
        unwanted = self._known(alphabets)
        return self._select([a not in unwanted for a in self.alphabets])

    def with_rotations(self) -> Omniglot:
        """Each character rotated by 0, 90, 180 and 270 degrees, each rotation a new class.

        Santoro et al. (2016), "Meta-learning with memory-augmented neural
        networks" (ICML), and Finn et al. (2017, MAML) augment Omniglot this way:
        a rotated character is a new character. The result holds 4x the
        characters, rotation-major: all characters at 0 degrees (named
        ``".../rot0"``), then all at 90 degrees counterclockwise (``".../rot90"``),
        and so on. Rotate only the training alphabets, never the test ones.
        """
        if any("/rot" in name for name in self.characters):
            raise ValueError("this dataset already holds rotated characters: call with_rotations() once")
        images = torch.cat([torch.rot90(self.images, angle // 90, dims=(-2, -1)) for angle in _ROTATIONS])
        names = [f"{name}/rot{angle}" for angle in _ROTATIONS for name in self.characters]
        return Omniglot.from_characters(images, names)

    def _known(self, alphabets: str | Iterable[str]) -> set[str]:
        """The given alphabet names as a set; raise for a name that is not in this dataset."""
        names = {alphabets} if isinstance(alphabets, str) else set(alphabets)
        unknown = sorted(names - set(self.alphabets))
        if unknown:
            raise ValueError(f"unknown alphabet(s) {unknown}; this dataset holds {self.alphabets}")
        return names

    def _select(self, keep_alphabet: list[bool]) -> Omniglot:
        """The characters whose alphabet has ``keep_alphabet[alphabet_index]`` true."""
        keep = torch.tensor(keep_alphabet, dtype=torch.bool)[self.alphabet_index].nonzero().squeeze(1)
        return Omniglot.from_characters(self.images[keep], [self.characters[i] for i in keep.tolist()])


class OneShotRun(NamedTuple):
    """One run of Lake et al. (2015)'s 20-way one-shot classification task.

    Attributes:
        support: float32 ``(20, 1, S, S)`` ink, one drawing of each of 20 characters
            (``training/class01.png`` .. ``class20.png``, in that order).
        support_labels: int64 ``(20,)``, ``arange(20)``.
        query: float32 ``(20, 1, S, S)`` ink, another drawing of each character
            by another drawer (``test/item01.png`` .. ``item20.png``).
        query_labels: int64 ``(20,)``, the support index of each query's character.
    """

    support: Tensor
    support_labels: Tensor
    query: Tensor
    query_labels: Tensor


def load_omniglot(sets: str | Iterable[str] = "small1", root: str | os.PathLike | None = None,
                  image_size: int | None = 28, download: bool = True) -> Omniglot:
    """Load Omniglot characters from one or more of its archives.

    Args:
        sets: a key of :data:`OMNIGLOT_RESOURCES` (``"background"``,
            ``"evaluation"``, ``"small1"``, ``"small2"``) or several. Characters
            are identified by ``"Alphabet/characterNN"``: one that is in several
            sets is kept once, so ``["small1", "small2"]`` gives 242 characters.
        root: data root (see :func:`lowlearn.data.cache.data_root`); the archives
            live in ``<root>/omniglot/``.
        image_size: side ``S`` of the returned images. The 105x105 originals are
            converted to grey and resized with a Lanczos filter, so the images are
            anti-aliased; the MAML and Prototypical Networks code resizes the 1-bit
            originals to 28x28, which Pillow does by nearest neighbour, and gets
            black-and-white images. ``None`` keeps 105x105.
        download: whether a missing archive may be downloaded.

    Returns:
        An :class:`Omniglot` with characters sorted by name and drawers sorted by
        file name; ``images`` is float32 ``(characters, 20, 1, S, S)``.

    Raises:
        ValueError: an unknown set name or a bad ``image_size``.
        DataError: an archive does not have Omniglot's layout (see also the
            errors of :func:`lowlearn.data.cache.fetch`).

    The last four archives decoded (each at one image size) are kept in memory, as
    uint8; every call returns new tensors, which callers may modify freely.
    """
    keys = [sets] if isinstance(sets, str) else list(sets)
    unknown = [key for key in keys if key not in _CHARACTER_SETS]
    if not keys or unknown:
        raise ValueError(f"sets must be one or more of {list(_CHARACTER_SETS)}; got {sets!r}")
    size = _check_size(image_size)                 # before anything is downloaded
    resources = [OMNIGLOT_RESOURCES[key] for key in keys]
    drawings: dict[str, Tensor] = {}
    for resource, path in zip(resources, fetch_all(resources, root, download)):
        names, ink = _character_set(path.resolve(), resource.sha256, size)
        for name, character in zip(names, ink):
            drawings.setdefault(name, character)
    characters = sorted(drawings)
    return Omniglot.from_characters(_to_float(torch.stack([drawings[c] for c in characters])), characters)


def load_omniglot_runs(root: str | os.PathLike | None = None, image_size: int | None = 28,
                       download: bool = True) -> list[OneShotRun]:
    """Load the 20 runs of Lake et al. (2015)'s one-shot classification task.

    Each run is a 20-way one-shot problem within one alphabet (from the
    evaluation set): classify each of 20 query drawings as one of 20 characters
    seen once each. The paper reports error rates averaged over the 20 runs.

    Args:
        root, image_size, download: as for :func:`load_omniglot`.

    Returns:
        The runs in order ``run01`` .. ``run20``, as :class:`OneShotRun`.

    Raises:
        ValueError: a bad ``image_size``.
        DataError: the archive does not have the layout of ``all_runs.zip``, or a
            ``class_labels.txt`` is malformed (see also the errors of
            :func:`lowlearn.data.cache.fetch`).
    """
    size = _check_size(image_size)
    resource = OMNIGLOT_RESOURCES["runs"]
    path = fetch(resource, root, download).resolve()
    members, ink = _decode_archive(path, resource.sha256, size)
    position = {name: i for i, name in enumerate(members)}
    runs = sorted({name.split("/")[0] for name in members})
    with zipfile.ZipFile(path) as archive:
        labels = {run: _read_text(archive, path, f"{run}/class_labels.txt") for run in runs}
    result = []
    for run in runs:
        support, query, query_labels = _parse_run(run, labels[run], members, path)
        result.append(OneShotRun(
            support=_to_float(ink[[position[name] for name in support]]),
            support_labels=torch.arange(len(support)),
            query=_to_float(ink[[position[name] for name in query]]),
            query_labels=torch.tensor(query_labels, dtype=torch.long),
        ))
    return result


def _check_size(image_size: int | None) -> int | None:
    """``image_size`` as an int (or None), or a ValueError unless it is None or a positive integer."""
    if image_size is None:
        return None
    if not is_integer(image_size) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, or None for the original "
                         f"{ORIGINAL_SIZE}x{ORIGINAL_SIZE}; got {image_size!r}")
    return int(image_size)


def _character_set(path: Path, sha256: str, image_size: int | None) -> tuple[list[str], Tensor]:
    """Names ``"Alphabet/characterNN"`` and uint8 ink ``(characters, 20, S, S)`` of one verified image archive."""
    members, ink = _decode_archive(path, sha256, image_size)
    drawings: dict[str, list[int]] = defaultdict(list)
    for i, member in enumerate(members):
        parts = member.split("/")
        if len(parts) != 4:
            raise DataError(
                f"{path} holds {member!r}, but an Omniglot image archive holds only "
                f"<set>/<alphabet>/<character>/<drawing>.png; it is not an Omniglot archive")
        drawings[f"{parts[1]}/{parts[2]}"].append(i)  # members are sorted: drawers in file-name order
    for name, indices in drawings.items():
        if len(indices) != DRAWERS:
            raise DataError(
                f"{path}: character {name} has {len(indices)} drawings, expected {DRAWERS} "
                f"(one per drawer); the archive is incomplete: delete it and download it again")
    names = sorted(drawings)
    return names, ink[torch.tensor([drawings[name] for name in names], dtype=torch.long)]


@functools.lru_cache(maxsize=4)
def _decode_archive(path: Path, sha256: str, image_size: int | None) -> tuple[tuple[str, ...], Tensor]:
    """Every PNG of a zip archive: sorted member names and uint8 ink ``(images, S, S)``.

    Cached for the process, keyed by the archive's path and checksum; callers
    must copy what they return (indexing and :func:`_to_float` do).
    """
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            check_member_name(info.filename, path)
        infos = sorted((info for info in archive.infolist() if info.filename.lower().endswith(".png")),
                       key=lambda info: info.filename)
        if not infos:
            raise DataError(f"{path} holds no PNG images, so it is not an Omniglot archive: "
                            f"delete it and download it again")
        images = [_decode_png(archive.read(info), image_size) for info in infos]
    return tuple(info.filename for info in infos), torch.from_numpy(np.stack(images))


def _decode_png(data: bytes, image_size: int | None) -> np.ndarray:
    """Decode one black-on-white PNG to uint8 ink ``(S, S)``: 255 where fully inked, 0 on white paper.

    The image is converted to 8-bit grey first, so that the Lanczos filter sees
    grey levels (Pillow resizes 1-bit images with nearest-neighbour only).
    """
    with Image.open(io.BytesIO(data)) as image:
        grey = image.convert("L")
    if image_size is not None and grey.size != (image_size, image_size):
        grey = grey.resize((image_size, image_size), resample=Image.Resampling.LANCZOS)
    return 255 - np.asarray(grey, dtype=np.uint8)


def _to_float(ink: Tensor) -> Tensor:
    """uint8 ink ``(..., S, S)`` to a new float32 tensor ``(..., 1, S, S)`` in [0, 1]."""
    return ink.unsqueeze(-3).float().div_(255)


def _read_text(archive: zipfile.ZipFile, path: Path, member: str) -> str:
    """The text of ``member``, or a DataError that names the missing file."""
    try:
        return archive.read(member).decode("utf-8")
    except KeyError:
        raise DataError(f"{path} has no {member}; it is not Omniglot's all_runs.zip") from None


def _parse_run(run: str, labels: str, members: tuple[str, ...],
               path: Path) -> tuple[list[str], list[str], list[int]]:
    """Support files, query files and query labels of one run, from its ``class_labels.txt``.

    Each line of ``labels`` reads ``runNN/test/itemMM.png runNN/training/classKK.png``:
    test item MM shows the character of training class KK.
    """
    support = [m for m in members if m.startswith(f"{run}/training/")]
    query = [m for m in members if m.startswith(f"{run}/test/")]
    where = f"{path}: {run}/class_labels.txt"
    if len(support) != RUN_WAYS or len(query) != RUN_WAYS:
        raise DataError(f"{path}: {run} has {len(support)} training and {len(query)} test images, "
                        f"expected {RUN_WAYS} of each; it is not Omniglot's all_runs.zip")
    lines = [line.split() for line in labels.splitlines() if line.strip()]
    if len(lines) != RUN_WAYS:
        raise DataError(f"{where} has {len(lines)} lines, expected {RUN_WAYS} (one per test image)")
    class_of: dict[str, str] = {}
    for line in lines:
        if len(line) != 2 or line[0] not in query or line[1] not in support:
            raise DataError(f"{where}: the line {' '.join(line)!r} does not name a test image and a "
                            f"training image of {run}, like '{query[0]} {support[0]}'")
        class_of[line[0]] = line[1]
    missing = [item for item in query if item not in class_of]
    if missing:
        raise DataError(f"{where} gives no class for {missing}")
    unmatched = [image for image in support if image not in class_of.values()]
    if unmatched:
        raise DataError(f"{where} matches no test image to {unmatched} (a run has one test image per class)")
    return support, query, [support.index(class_of[item]) for item in query]
