"""Dataset parsing against hand-built files in the real on-disk layouts, and task generators against the paper.

Adds to tests/data: IDX headers written byte by byte as MNIST's own (magic 2051 / 2049), a CIFAR archive
whose members come in the real archive's (unsorted) order with its folder entry, Omniglot archives built
from *real* 1-bit Omniglot PNGs whose ink is checked against the raw bitmap (no grey conversion), the
rotations of a hand-drawn 2x2 character, and the sinusoid family's mean curve from the MAML ranges.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import math
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowlearn.data import cifar, mnist, omniglot
from lowlearn.data.cache import Resource, data_root, sha256_of
from lowlearn.data.mnist import load_mnist, read_idx
from lowlearn.data.omniglot import Omniglot, load_omniglot
from lowlearn.data.tasks import SinusoidTasks

SMALL1 = data_root() / "omniglot" / "images_background_small1.zip"        # $LOWLEARN_DATA, as .ci/run sets it


# ------------------------------------------------------------------ MNIST (IDX)

def test_mnist_headers_written_by_hand_parse_as_the_four_files_do(tmp_path, monkeypatch):
    """Images: magic 00 00 08 03 (2051), N, 28, 28; labels: 00 00 08 01 (2049), N (LeCun's page)."""
    pixels = bytes((7 * i) % 256 for i in range(2 * 784))            # two 28 x 28 images, every byte value
    images = bytes.fromhex("00000803 00000002 0000001c 0000001c") + pixels
    labels = bytes.fromhex("00000801 00000002") + bytes([9, 0])
    files = [images, labels, bytes.fromhex("00000803 00000001 0000001c 0000001c") + pixels[:784],
             bytes.fromhex("00000801 00000001") + bytes([4])]
    (tmp_path / "mnist").mkdir()
    resources = []
    for resource, data in zip(mnist.MNIST_RESOURCES, files):
        path = resource.path(tmp_path)
        path.write_bytes(gzip.compress(data))
        resources.append(dataclasses.replace(resource, sha256=hashlib.sha256(path.read_bytes()).hexdigest()))
    monkeypatch.setattr(mnist, "MNIST_RESOURCES", tuple(resources))
    train, test = load_mnist(root=tmp_path, download=False)
    x, y = train.tensors
    assert y.tolist() == [9, 0] and test.tensors[1].tolist() == [4]
    # pixel (n, r, c) is byte 784 n + 28 r + c of the data, divided by 255
    for n, r, c in ((0, 0, 0), (0, 0, 27), (0, 27, 0), (1, 5, 9), (1, 27, 27)):
        assert x[n, 0, r, c].item() == pytest.approx(pixels[784 * n + 28 * r + c] / 255, abs=1e-7)
    assert torch.equal(test.tensors[0], x[:1])


def test_idx_of_big_endian_int32_and_float64_by_hand(tmp_path):
    """0x0C int32 and 0x0E float64 values written as big-endian bytes by hand."""
    path = tmp_path / "a.idx"
    path.write_bytes(bytes.fromhex("00000c02 00000001 00000002 00000001 ffffffff"))
    assert read_idx(path).tolist() == [[1, -1]]
    path.write_bytes(bytes.fromhex("00000e01 00000001 3ff8000000000000"))          # 1.5
    assert read_idx(path).tolist() == [1.5] and read_idx(path).dtype == torch.float64


# ------------------------------------------------------------------ CIFAR-10

# The order of the members in the real cifar-10-python.tar.gz (not sorted).
REAL_ORDER = ["data_batch_4", "readme.html", "test_batch", "data_batch_3", "batches.meta", "data_batch_2",
              "data_batch_5", "data_batch_1"]


def test_cifar_batches_are_concatenated_1_to_5_whatever_the_archive_order(tmp_path, monkeypatch):
    """Train = data_batch_1 .. data_batch_5 in that order (Krizhevsky's page), from an archive in the real order."""
    batches = {}
    for i in range(1, 6):
        data = np.full((2, 3072), 10 * i, np.uint8)
        data[1] += 1
        batches[f"data_batch_{i}"] = (data, [i, (i + 5) % 10])
    batches["test_batch"] = (np.full((1, 3072), 200, np.uint8), [7])
    path = cifar.CIFAR10_RESOURCE.path(tmp_path)
    path.parent.mkdir(parents=True)
    with tarfile.open(path, "w:gz") as tf:
        folder = tarfile.TarInfo("cifar-10-batches-py")
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
        for name in REAL_ORDER:
            payload = (pickle.dumps({b"data": batches[name][0], b"labels": batches[name][1]}, protocol=4)
                       if name in batches else b"other")
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    monkeypatch.setattr(cifar, "CIFAR10_RESOURCE", dataclasses.replace(cifar.CIFAR10_RESOURCE,
                                                                       sha256=sha256_of(path)))
    train, test = cifar.load_cifar10(root=tmp_path, download=False)
    x, y = train.tensors
    assert y.tolist() == [1, 6, 2, 7, 3, 8, 4, 9, 5, 0]
    assert (x[:, 0, 0, 0] * 255).round().tolist() == [10, 11, 20, 21, 30, 31, 40, 41, 50, 51]
    assert test.tensors[1].tolist() == [7] and (test.tensors[0] * 255).round().eq(200).all()


# ------------------------------------------------------------------ Omniglot

def _real_members(count: int) -> dict[str, bytes]:
    """The PNGs of the first ``count`` characters of Greek in the real small1 archive, under their own names."""
    with zipfile.ZipFile(SMALL1) as archive:
        names = sorted(n for n in archive.namelist() if "/Greek/character0" in n and n.endswith(".png"))
        wanted = [n for n in names if int(n.split("/")[2][-2:]) <= count]
        return {n: archive.read(n) for n in wanted}


def _install(monkeypatch, root: Path, members: dict[str, bytes]) -> None:
    path = root / "omniglot" / "tiny.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name in reversed(list(members)):                          # not in sorted order
            archive.writestr(name, members[name])
    resource = Resource(path.name, ("https://example.invalid/tiny.zip",), sha256_of(path), "omniglot")
    monkeypatch.setitem(omniglot.OMNIGLOT_RESOURCES, "small2", resource)


@pytest.mark.skipif(not SMALL1.is_file(), reason="needs the real images_background_small1.zip")
def test_real_omniglot_pngs_give_the_inverted_bitmap_drawer_by_drawer(tmp_path, monkeypatch):
    """Ink = 1 where the 1-bit PNG is black; drawing d of a character is its file '..._{d+1:02d}.png'."""
    members = _real_members(2)
    assert len(members) == 40
    _install(monkeypatch, tmp_path, members)
    data = load_omniglot("small2", root=tmp_path, image_size=None, download=False)
    assert data.characters == ["Greek/character01", "Greek/character02"] and data.images.shape == (2, 20, 1, 105, 105)
    for name, png in members.items():
        c, d = int(name.split("/")[2][-2:]) - 1, int(name[-6:-4]) - 1
        with Image.open(io.BytesIO(png)) as image:
            assert image.mode == "1"
            black = ~np.asarray(image, dtype=bool)
        assert torch.equal(data.images[c, d, 0], torch.from_numpy(black).float()), name
    # 28 x 28: the resize keeps the amount of ink (a Lanczos filter has gain 1), up to clipping at 0 and 1
    small = load_omniglot("small2", root=tmp_path, image_size=28, download=False).images
    ratio = small.sum(dim=(-1, -2, -3)) * (105 / 28) ** 2 / data.images.sum(dim=(-1, -2, -3))
    assert ratio.min() > 0.9 and ratio.max() < 1.2


def test_rotations_of_a_hand_drawn_character():
    """90 degrees counterclockwise: [[a, b], [c, d]] -> [[b, d], [a, c]]; 180 -> [[d, c], [b, a]]; rotation-major."""
    images = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(2, 20, 1, 2, 2).clone()
    images[1] *= 10
    data = Omniglot.from_characters(images, ["B/character01", "A/character01"])
    rotated = data.with_rotations()
    assert rotated.characters == ["B/character01/rot0", "A/character01/rot0", "B/character01/rot90",
                                  "A/character01/rot90", "B/character01/rot180", "A/character01/rot180",
                                  "B/character01/rot270", "A/character01/rot270"]
    assert rotated.images[2, 7, 0].tolist() == [[2, 4], [1, 3]]
    assert rotated.images[4, 0, 0].tolist() == [[4, 3], [2, 1]]
    assert rotated.images[6, 0, 0].tolist() == [[3, 1], [4, 2]]
    assert rotated.images[3, 0, 0].tolist() == [[20, 40], [10, 30]]
    assert rotated.alphabets == ["A", "B"] and rotated.alphabet_index.tolist() == [1, 0] * 4


# ------------------------------------------------------------------ sinusoids

def test_the_mean_sinusoid_is_minus_two_over_pi_times_the_mean_amplitude_times_cos_x():
    """Docstring claim, by hand: E_φ~U[0,π] sin(x − φ) = −(2/π) cos x and E[amp] = 2.55: the mean is −1.623 cos x."""
    batch = SinusoidTasks().sample(20000, 1, 0, generator=torch.Generator().manual_seed(0))
    grid = torch.linspace(-5, 5, 21, dtype=torch.float64)[:, None]
    mean_curve = SinusoidTasks.curve(batch.amplitude.double(), batch.phase.double(), grid).mean(0)[:, 0]
    expected = -(2 / math.pi) * 2.55 * torch.cos(grid[:, 0])
    assert (mean_curve - expected).abs().max() < 0.06                  # ~2.7 / sqrt(20000) = 0.02 standard error
