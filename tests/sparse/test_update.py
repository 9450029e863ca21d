import pytest
import torch

from lowlearn.sparse.schedule import UpdateSchedule
from lowlearn.sparse.update import drop_and_grow


def test_drop_and_grow_on_a_hand_built_case():
    mask = torch.tensor([True, True, True, False, False, False])
    weight = torch.tensor([0.5, -0.1, 2.0, 0.0, 0.0, 0.0])
    grad = torch.tensor([9.0, 9.0, 9.0, 0.3, -4.0, 1.0])   # active entries must not matter
    new, grown = drop_and_grow(mask, weight.abs(), grad.abs(), 1)
    # -0.1 is the smallest active weight; |-4.0| the largest inactive gradient.
    assert new.tolist() == [True, False, True, False, True, False]
    assert grown.tolist() == [False, False, False, False, True, False]
    new, grown = drop_and_grow(mask, weight.abs(), grad.abs(), 2)
    assert new.tolist() == [False, False, True, False, True, True]
    assert grown.tolist() == [False, False, False, False, True, True]


def test_drop_and_grow_keeps_the_count_and_the_sets_disjoint():
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        mask = torch.rand(30, 40, generator=generator) < 0.2
        active = int(mask.sum())
        n = trial * 3 % (active + 1)
        drop = torch.randn(30, 40, generator=generator)
        grow = torch.randn(30, 40, generator=generator)
        new, grown = drop_and_grow(mask, drop, grow, n)
        dropped = mask & ~new
        assert int(new.sum()) == active
        assert int(grown.sum()) == n and int(dropped.sum()) == n
        assert not (grown & mask).any()             # grown weights were inactive before the update
        assert not (dropped & grown).any()
        # The drop removes the n lowest active scores, the growth adds the n best inactive ones.
        if n:
            assert drop[dropped].max() <= drop[mask & new].min()
            assert grow[grown].min() >= grow[~mask & ~new].max()


def test_infinite_scores_keep_the_counts_exact():
    # an active weight scored +inf tied with the +inf written over the inactive ones, so a "drop" could land on
    # an inactive weight (3 active after the update instead of 2); likewise -inf on the grow side
    inf = float("inf")
    mask = torch.tensor([True, True, False, False])
    new, grown = drop_and_grow(mask, torch.tensor([inf, inf, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 2.0]), 1)
    assert int(new.sum()) == 2 and int((mask & ~new).sum()) == 1 and grown.tolist() == [False, False, False, True]
    new, grown = drop_and_grow(mask, torch.tensor([1.0, 2.0, 0.0, 0.0]), torch.tensor([5.0, 5.0, -inf, -inf]), 1)
    assert new.tolist() == [False, True, True, False] or new.tolist() == [False, True, False, True]
    assert int(grown.sum()) == 1 and not (grown & mask).any()
    scores = torch.tensor([1 + 1e-12, 1.0, 0.0, 0.0], dtype=torch.float64)      # float64 ranked in float64
    assert drop_and_grow(mask, scores, torch.zeros(4), 1, 0)[0].tolist() == [True, False, False, False]


def test_nan_scores_keep_the_counts_exact_and_rank_lowest():
    # topk ranks NaN above +inf: an active NaN weight survived while the "drop" landed on an inactive one
    nan = float("nan")
    mask = torch.tensor([True, True, True, False, False])
    new, _ = drop_and_grow(mask, torch.tensor([nan, 1.0, 2.0, 0.0, 0.0]), torch.zeros(5), 1, 0)
    assert new.tolist() == [False, True, True, False, False]                  # the diverged weight goes first
    new, _ = drop_and_grow(mask, torch.tensor([nan, nan, nan, 0.0, 0.0]), torch.zeros(5), 3, 0)
    assert int(new.sum()) == 0
    new, grown = drop_and_grow(mask, torch.ones(5), torch.tensor([0.0, 0.0, 0.0, nan, 5.0]), 0, 1)
    assert grown.tolist() == [False, False, False, False, True]                # grown last


def test_unequal_counts_change_the_density():
    mask = torch.tensor([True, True, False, False, False])
    new, grown = drop_and_grow(mask, torch.arange(5.0), torch.arange(5.0), 1, 3)
    assert new.tolist() == [False, True, True, True, True]
    new, _ = drop_and_grow(mask, torch.arange(5.0), torch.arange(5.0), 2, 0)
    assert not new.any()


def test_regrow_dropped_follows_the_rigl_code():
    # The weight at index 0 has the smallest magnitude but the largest gradient.
    mask = torch.tensor([True, True, False, False])
    drop = torch.tensor([0.1, 0.5, 0.0, 0.0])
    grow = torch.tensor([5.0, 0.0, 1.0, 2.0])
    new, grown = drop_and_grow(mask, drop, grow, 1)
    assert new.tolist() == [False, True, False, True] and grown.tolist() == [False, False, False, True]
    # Allowed to come back, it is kept and counts as neither dropped nor grown.
    new, grown = drop_and_grow(mask, drop, grow, 1, regrow_dropped=True)
    assert new.tolist() == [True, True, False, False] and not grown.any()


def test_drop_and_grow_bad_input():
    mask = torch.tensor([True, False, False])
    scores = torch.zeros(3)
    with pytest.raises(ValueError, match="must be boolean"):
        drop_and_grow(mask.float(), scores, scores, 1)
    with pytest.raises(ValueError, match="drop scores have shape"):
        drop_and_grow(mask, torch.zeros(4), scores, 1)
    with pytest.raises(ValueError, match="only 1 are active"):
        drop_and_grow(mask, scores, scores, 2)
    with pytest.raises(ValueError, match="cannot grow 3 weights: only 2"):
        drop_and_grow(mask, scores, scores, 1, 3)
    with pytest.raises(ValueError, match="non-negative"):
        drop_and_grow(mask, scores, scores, -1)
    with pytest.raises(ValueError, match="non-negative, got 0 and -1"):
        drop_and_grow(mask, scores, scores, 0, -1)
    # scores of the mask's size but another shape (a transposed weight) are refused, not ranked position by position
    square = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(ValueError, match=r"grow scores have shape \(3, 2\), the mask \(2, 3\)"):
        drop_and_grow(square, torch.zeros(2, 3), torch.zeros(3, 2), 1)


def test_update_schedule_defaults_are_rigls():
    # Evci et al. (2020): update every ΔT = 100 steps, drop fraction α = 0.3, cosine decay.
    schedule = UpdateSchedule(end=750)
    assert (schedule.every, schedule.drop_fraction, schedule.cosine) == (100, 0.3, True)
    assert schedule.fraction(0) == 0.3


def test_update_schedule_cosine_values():
    schedule = UpdateSchedule(end=750, every=100, drop_fraction=0.3)
    # f(t) = α/2 (1 + cos(π t / T_end)), hand-computed.
    assert schedule.fraction(0) == pytest.approx(0.3)
    assert schedule.fraction(375) == pytest.approx(0.15)
    assert schedule.fraction(250) == pytest.approx(0.15 * (1 + 0.5))
    assert schedule.fraction(500) == pytest.approx(0.15 * (1 - 0.5))
    assert schedule.fraction(750) == pytest.approx(0.0)
    assert schedule.fraction(2000) == pytest.approx(0.0)
    fractions = [schedule.fraction(t) for t in range(0, 751, 10)]
    assert all(a >= b for a, b in zip(fractions, fractions[1:]))
    assert UpdateSchedule(end=750, drop_fraction=0.3, cosine=False).fraction(700) == 0.3


def test_update_schedule_steps():
    schedule = UpdateSchedule(end=750, every=100)
    assert [t for t in range(0, 2000) if schedule.updates_at(t)] == [100, 200, 300, 400, 500, 600, 700]
    # f(T_end) = 0 under the cosine: no update at T_end (Algorithm 1: t < T_end); a constant fraction updates there.
    assert [t for t in range(0, 20) if UpdateSchedule(end=10, every=5).updates_at(t)] == [5]
    assert [t for t in range(0, 20) if UpdateSchedule(end=10, every=5, cosine=False).updates_at(t)] == [5, 10]


def test_update_schedule_bad_input():
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match=r"every \(steps between updates\) must be an int >= 1"):
            UpdateSchedule(end=10, every=bad)
        with pytest.raises(ValueError, match=r"end \(the last step that may update\) must be an int >= 1"):
            UpdateSchedule(end=bad)
    for bad in (-0.1, 0, 0.0, 1.0, 2):
        with pytest.raises(ValueError, match=r"drop_fraction \(α\) must be in \(0, 1\)"):
            UpdateSchedule(end=1000, drop_fraction=bad)
    with pytest.raises(ValueError, match="every=100 steps between updates is more than end=10.*would never change"):
        UpdateSchedule(end=10)
    with pytest.raises(ValueError, match="every=10 steps between updates is no fewer than, under the cosine whose "
                                         r"f\(end\) = 0, end=10.*would never change"):
        UpdateSchedule(end=10, every=10)
    assert UpdateSchedule(end=10, every=10, cosine=False).updates_at(10)
    with pytest.raises(TypeError, match="cosine must be True or False, got 'no'"):   # a string would mean True
        UpdateSchedule(end=10, every=5, cosine="no")
