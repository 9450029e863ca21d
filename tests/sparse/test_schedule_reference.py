"""Reference tests for lowlearn.sparse.schedule and lowlearn.sparse.update against slow re-implementations."""

from fractions import Fraction

import pytest
import torch
from torch import nn

from lowlearn.sparse.mask import masks_of
from lowlearn.sparse.schedule import GradualPruning, cubic_density, geometric_densities
from lowlearn.sparse.update import drop_and_grow
from lowlearn.train import TrainState


def zhu_gupta_sparsity(t, s_i, s_f, t0, n, dt):
    """Zhu & Gupta (2017) eq. 1 with its domain: s_i before t0, s_f from t0 + nΔt on, the cubic in between,
    in exact rational arithmetic. With n = 0 (begin == end) the one pruning step at t0 reaches s_f (the
    documented reading of the degenerate case)."""
    if t >= t0 + n * dt:
        return Fraction(s_f)
    if t <= t0:
        return Fraction(s_i)
    return Fraction(s_f) + (Fraction(s_i) - Fraction(s_f)) * (1 - Fraction(t - t0, n * dt)) ** 3


@pytest.mark.parametrize("s_i,s_f,t0,n,dt", [("0", "0.9", 0, 10, 10), ("0.5", "0.95", 7, 3, 13),
                                             ("0.25", "0.75", 1, 1, 1), ("0", "0.5", 5, 0, 1)])
def test_cubic_density_at_every_integer_step_including_outside_the_pruning_range(s_i, s_f, t0, n, dt):
    """1 − s_t for every integer step from t0 − 5 to t0 + nΔt + 5 (not only the pruning steps t0 + kΔt),
    within 1e-12 of the exact rational value; monotone non-increasing in t and convex in sparsity's complement
    (the per-step drops shrink)."""
    s_i, s_f = Fraction(s_i), Fraction(s_f)
    end = t0 + n * dt
    steps = range(t0 - 5, end + 6)
    got = [cubic_density(t, float(1 - s_f), t0, end, float(1 - s_i)) for t in steps]
    for t, d in zip(steps, got):
        assert d == pytest.approx(float(1 - zhu_gupta_sparsity(t, s_i, s_f, t0, n, dt)), abs=1e-12), t
    assert all(a >= b for a, b in zip(got, got[1:]))
    drops = [a - b for a, b in zip(got[5:], got[6:])][:max(end - t0, 0)]
    assert all(a >= b - 1e-15 for a, b in zip(drops, drops[1:]))


def test_geometric_densities_are_one_minus_p_to_the_k():
    """Iterative pruning removing p of the survivors each round: d_k = (1 − p)^k with p = 1 − d_R^(1/R), checked
    by repeated multiplication for Frankle & Carbin's p = 20% and an arbitrary p."""
    for p, rounds in ((0.2, 12), (0.37, 5), (0.5, 1)):
        d = geometric_densities((1 - p) ** rounds, rounds)
        survivors, expected = 1.0, []
        for _ in range(rounds):
            survivors -= p * survivors               # remove p of what is left
            expected.append(survivors)
        assert d == pytest.approx(expected, rel=1e-12)


class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(7, 9), nn.Linear(9, 5)


@pytest.mark.parametrize("initial", ["1", "0.7"])
def test_gradual_pruning_every_step_against_a_slow_schedule_of_whole_weights(initial):
    """GradualPruning driven step by step (the weights perturbed between steps as training would): at each
    pruning step t0, t0 + Δt, ..., and at end, each layer keeps min(alive, max(1, round(d_t · n))) weights, the
    ones of largest |w| among the survivors (a slow sort), d_t from the initial density d_i = 1 − s_i; nothing
    changes between pruning steps; the counts never grow and end at round(d_f · n)."""
    torch.manual_seed(0)
    model = _Counter()
    sizes = {"a": 63, "b": 45}
    schedule = GradualPruning(0.1, begin=3, end=20, every=4, initial_density=float(Fraction(initial)))
    g = torch.Generator().manual_seed(5)
    ref = {name: [True] * n for name, n in sizes.items()}
    history = []
    for step in range(1, 26):
        with torch.no_grad():
            for name in sizes:
                layer = getattr(model, name)
                w = layer.parametrizations.weight.original if hasattr(layer, "parametrizations") else layer.weight
                w.add_(0.3 * torch.randn(w.shape, generator=g))
        before = {name: getattr(model, name).weight.detach().abs().flatten().tolist() for name in sizes}
        schedule(TrainState(step=step, epoch=0, loss=torch.zeros(()), model=model, optimizer=None))
        if step in (3, 7, 11, 15, 19, 20):
            s = zhu_gupta_sparsity(step, 1 - Fraction(initial), Fraction("0.9"), 3, 1, 17)
            for name, n in sizes.items():
                k = min(sum(ref[name]), max(1, round(float(1 - s) * n)))
                alive = [i for i in range(n) if ref[name][i]]
                chosen = set(sorted(alive, key=lambda i: -before[name][i])[:k])
                ref[name] = [i in chosen for i in range(n)]
        if step >= 3:
            masks = masks_of(model)
            for name in sizes:
                assert masks[name].flatten().tolist() == ref[name], (step, name)
            history.append({name: sum(ref[name]) for name in sizes})
    for a, b in zip(history, history[1:]):
        assert all(b[name] <= a[name] for name in sizes)
    assert history[-1] == {"a": round(0.1 * 63), "b": round(0.1 * 45)}


def slow_drop_and_grow(mask, drop, grow, n_drop, n_grow, regrow_dropped):
    """RigL's update written with Python sorts: drop the n_drop active entries of lowest drop score, then grow
    the n_grow entries of highest grow score among those inactive before (or, regrow_dropped, not kept)."""
    m, d, g = mask.flatten().tolist(), drop.flatten().tolist(), grow.flatten().tolist()
    active = [i for i in range(len(m)) if m[i]]
    dropped = set(sorted(active, key=lambda i: d[i])[:n_drop])
    kept = [m[i] and i not in dropped for i in range(len(m))]
    pool = [i for i in range(len(m)) if not (kept[i] if regrow_dropped else m[i])]
    grown = set(sorted(pool, key=lambda i: -g[i])[:n_grow])
    new = [kept[i] or i in grown for i in range(len(m))]
    return new, [new[i] and not m[i] for i in range(len(m))]


@pytest.mark.parametrize("regrow_dropped", [False, True])
def test_drop_and_grow_matches_python_sorts(regrow_dropped):
    """drop_and_grow against the sorted-list reference above for random masks, distinct scores and unequal
    n_drop / n_grow (so the density may change), with and without regrowing the dropped weights."""
    gen = torch.Generator().manual_seed(11)
    for trial in range(25):
        mask = torch.rand(6, 7, generator=gen) < 0.4
        active = int(mask.sum())
        drop, grow = torch.randn(6, 7, generator=gen), torch.randn(6, 7, generator=gen)
        n_drop = trial % (active + 1)
        growable = 42 - active + (n_drop if regrow_dropped else 0)
        n_grow = (trial * 7) % (growable + 1)
        new, grown = drop_and_grow(mask, drop, grow, n_drop, n_grow, regrow_dropped=regrow_dropped)
        ref_new, ref_grown = slow_drop_and_grow(mask, drop, grow, n_drop, n_grow, regrow_dropped)
        assert new.flatten().tolist() == ref_new and grown.flatten().tolist() == ref_grown, trial
