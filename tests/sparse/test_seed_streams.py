"""A method's random draws never repeat the model's initialisation drawn under the same seed.

On a CPU, ``torch.Generator().manual_seed(s)`` and ``torch.manual_seed(s)`` are one Mersenne
twister: a mask drawn from the first, for a model made after the second, keeps the first layer's
largest initial weights, all positive, and a "fresh" initialisation repeats the first one. Every
method seeds its draws through :func:`lowlearn.train.stream_seed`.
"""

import hashlib

import pytest
import torch

from lowlearn.models import MLP
from lowlearn.sparse.dst import SET, SNFS, RigL, StaticSparse
from lowlearn.sparse.lottery import random_mask, random_reinit, reshuffle
from lowlearn.sparse.mask import attach_masks, masks_of, raw_weight, set_masks
from lowlearn.sparse.packnet import PackNet
from lowlearn.train import seeded_generator, stream_seed

SEED = 3


def model_made_under(seed=SEED):
    """A small MLP made after ``torch.manual_seed(seed)``, and a copy of its first layer's initial weights."""
    torch.manual_seed(seed)
    model = MLP(in_features=200, hidden=(100,), out_features=10)
    return model, model[1].weight.detach().clone()


def test_a_generator_seeded_like_the_model_repeats_its_initial_weights():
    # The hazard itself, on this torch: the reason for stream_seed.
    _, first = model_made_under()
    bound = 200 ** -0.5
    u = torch.rand(first.shape, generator=torch.Generator().manual_seed(SEED))
    assert torch.allclose(first, (2 * u - 1) * bound, atol=1e-7)


def test_stream_seed_is_the_documented_hash_and_refuses_bad_seeds():
    expected = int.from_bytes(hashlib.sha256(b"random_mask/7").digest()[:8], "big") >> 1
    assert stream_seed(7, "random_mask") == expected and 0 <= expected < 2**63
    assert len({stream_seed(7, "random_mask"), stream_seed(8, "random_mask"), stream_seed(7, "reshuffle")}) == 3
    a, b = (torch.rand(5, generator=seeded_generator(7, "x")) for _ in range(2))
    assert torch.equal(a, b)
    for bad in (-1, 1.5, "7", None):
        with pytest.raises(ValueError, match="seed must be an int >= 0"):
            stream_seed(bad, "x")


def assert_unbiased(kept_initial):
    """The kept initial weights of a uniform random choice: about as many negative as positive."""
    positive = (kept_initial > 0).float().mean().item()
    assert 0.4 < positive < 0.6, f"{positive:.1%} of the kept weights are positive"


@pytest.mark.parametrize("method, schedule", [(StaticSparse, {}), (SET, {}), (RigL, {"end": 1000}), (SNFS, {})])
def test_sparse_training_starts_from_masks_independent_of_the_initial_weights(method, schedule):
    model, initial = model_made_under()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    method(model, optimizer, 0.1, distribution="uniform", seed=SEED, **schedule)
    assert_unbiased(initial[masks_of(model)["1"]])     # (one stream for all: tests/test_chapter_claims.py)


def test_packnet_draws_released_weights_afresh():
    model, initial = model_made_under()
    packnet = PackNet(model, seed=SEED)
    packnet.start_task()
    packnet.assign(0.1)                               # untrained: the released weights still hold their start
    released = packnet.owner["1"] == 0
    repeated = (raw_weight(model[1]).detach()[released] - initial[released]).abs() < 1e-6
    assert repeated.float().mean() < 0.01


def test_random_reinit_draws_another_initialisation_than_the_seed_the_model_was_made_with():
    model, initial = model_made_under()
    attach_masks(model)
    random_reinit(model, seed=SEED)
    assert (raw_weight(model[1]).detach() != initial).float().mean() > 0.99


def test_random_mask_and_reshuffle_choose_independently_of_the_initial_weights():
    model, initial = model_made_under()
    attach_masks(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    half = torch.ones_like(initial, dtype=torch.bool)
    half[:, 100:] = False
    set_masks(model, {"1": half})                      # half the layer: the control draws 10,000 of 20,000
    random_mask(model, state, seed=SEED)
    kept = masks_of(model)["1"]                        # reshuffle keeps the mask
    assert_unbiased(initial[kept])
    reshuffle(model, state, seed=SEED)
    # The kept values in a fresh order: as often larger as smaller than the value the position started with.
    assert_unbiased(raw_weight(model[1]).detach()[kept] - initial[kept])
