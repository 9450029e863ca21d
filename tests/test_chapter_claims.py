"""Claims the book's chapters make about the library, checked against hand computations and the papers.

Each test names the chapter whose statement (or computation) it checks.
"""

import math

import pytest
import torch
from torch import nn

from lowlearn.data.tasks import SinusoidTasks
from lowlearn.models import MLP
from lowlearn.sparse import SET, SNFS, RigL, StaticSparse, masks_of, prune_channels
from lowlearn.sparse.export import compact
from lowlearn.sparse.lottery import iterative_magnitude_pruning
from lowlearn.train import History, seed_everything


def test_imp_on_lenet_300_100_keeps_frankle_and_carbins_remaining_fractions():
    """lottery_tickets: pruning 20% of each hidden layer and 10% of the output layer per round
    leaves P_m = 100, 51.3, 21.1, 7.0, 3.6 and 1.9% of LeNet-300-100's weights after 0, 3, 7, 12, 15 and 18
    rounds, the P_m of Frankle & Carbin (2019) that the chapter quotes. Nothing is trained: the rounds only prune."""
    seed_everything(0)
    lottery = iterative_magnitude_pruning(MLP(), lambda model, callbacks: History(), 18, prune_fraction=0.2,
                                          output_fraction=0.1)
    published = {0: 100.0, 3: 51.3, 7: 21.1, 12: 7.0, 15: 3.6, 18: 1.9}
    for r, p_m in published.items():
        assert round(100 * lottery.rounds[r].density, 1) == p_m, (r, lottery.rounds[r].density)
    # by hand: round(0.8^r · n) of each hidden layer, round(0.9^r · 1000) of the output layer
    for r in published:
        kept = round(0.8 ** r * 784 * 300) + round(0.8 ** r * 300 * 100) + round(0.9 ** r * 100 * 10)
        assert lottery.rounds[r].density == pytest.approx(kept / 266_200, abs=1e-9)


def test_static_set_rigl_and_snfs_start_from_one_mask_for_one_seed():
    """dynamic_sparse_training: "for a given seed all methods start from the same initial weights and
    [...] the same initial mask, so they differ only in how the mask changes"."""
    masks = {}
    for name, cls in (("static", StaticSparse), ("SET", SET), ("RigL", RigL), ("SNFS", SNFS)):
        seed_everything(3)
        model = MLP(hidden=(30, 10))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        options = dict(distribution="erk", seed=3)
        if cls is not StaticSparse:
            options.update(end=100, every=10, drop_fraction=0.3)
        cls(model, optimizer, 0.1, **options)
        masks[name] = masks_of(model)
    for name, layer_masks in masks.items():
        assert layer_masks.keys() == masks["static"].keys()
        assert all(torch.equal(layer_masks[k], masks["static"][k]) for k in layer_masks), name


def test_sinusoid_errors_without_the_support_set_match_the_chapters_closed_form():
    """meta_learning: for A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5], predicting y = 0 has
    expected squared error E[A²]/2 ≈ 4.25, and predicting the mean task −(2 E[A]/π) cos x has
    E[A²]/2 − (2 E[A]/π)² E[cos² x] ≈ 3.0. Checked by Monte Carlo on SinusoidTasks' own draws."""
    tasks = SinusoidTasks()
    batch = tasks.sample(20_000, 10, 0, generator=torch.Generator().manual_seed(0))
    x, y = batch.support_x.double(), batch.support_y.double()
    mean_amplitude = (0.1 + 5) / 2
    mean_square = (5 ** 3 - 0.1 ** 3) / (3 * (5 - 0.1))
    mean_cos2 = 0.5 + (math.sin(10) - math.sin(-10)) / (4 * 10)
    zero, mean_task = mean_square / 2, mean_square / 2 - (2 * mean_amplitude / math.pi) ** 2 * mean_cos2
    assert (round(zero, 2), round(mean_task, 1)) == (4.25, 3.0)                      # the chapter's numbers
    assert y.square().mean().item() == pytest.approx(zero, abs=0.06)
    prediction = -2 * mean_amplitude / math.pi * torch.cos(x)
    assert (y - prediction).square().mean().item() == pytest.approx(mean_task, abs=0.06)


@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.1])
def test_neuron_pruning_leaves_the_weights_the_pruning_chapter_counts(fraction):
    """pruning: keeping a fraction u of both hidden layers' units leaves
    784·u1 + u1·u2 + u2·10 weights that still matter (u1 = round(300u), u2 = round(100u)): exactly the
    weights of the compacted, narrower dense network, which computes what the masked one does."""
    seed_everything(0)
    model = MLP()
    units = prune_channels(model, fraction)
    u1, u2 = (int(u.sum()) for u in units.values())
    assert (u1, u2) == (round(300 * fraction), round(100 * fraction))
    small = compact(model)
    weights = sum(layer.weight.numel() for layer in small.modules() if isinstance(layer, nn.Linear))
    assert weights == 784 * u1 + u1 * u2 + u2 * 10
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
