"""Independent slow references for one mask update of SET, RigL, SNFS and one step of Top-KAST.

Each reference is written from the papers' equations with plain Python lists and
``sorted`` (no ``topk``, no library helper): RigL Algorithm 1 and eq. 1 (Evci et al.
2020), SNFS Algorithm 1 (Dettmers & Zettlemoyer 2019: mean momentum magnitude of the
active weights, redistribution of the removed weights, growth by momentum), SET
(Mocanu et al. 2018, drop as in Evci et al.'s version), Top-KAST (Jayakumar et al.
2020: A = top-D, B = top-(D+M) by magnitude, ∂L/∂θ = ∂L/∂w ⊙ 1_B, penalty
|θ| on A and |θ|/D on B \\ A). The dense gradient ∂L/∂w is taken with autograd on a
plain functional copy of the network whose weights w = θ ⊙ m are leaves.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowlearn.models import MLP
from lowlearn.sparse.dst import SET, SNFS, RigL
from lowlearn.sparse.mask import masks_of, prunable_layers, raw_weight
from lowlearn.sparse.topkast import TopKAST


def small_mlp(seed=0, activation=nn.ReLU):
    torch.manual_seed(seed)
    return MLP(in_features=20, hidden=(16, 12), out_features=4, activation=activation)


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 20, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def dense_grads(model, x, y):
    """∂L/∂w of every masked layer, w = θ ⊙ m a leaf of a plain functional forward pass."""
    layers = prunable_layers(model)
    masks = masks_of(model)
    leaves = {name: (raw_weight(layer).detach() * masks[name]).requires_grad_() for name, layer in layers.items()}
    h = x
    for name, module in model.named_children():
        h = F.linear(h, leaves[name], module.bias) if name in leaves else module(h)
    grads = torch.autograd.grad(F.cross_entropy(h, y), list(leaves.values()))
    return dict(zip(leaves, grads))


def cosine(t, alpha, end):
    """RigL eq. 1, clamped at T_end like tf.train.cosine_decay in the authors' code."""
    return alpha / 2 * (1 + math.cos(math.pi * min(t, end) / end))


def ref_drop_grow(mask, drop_score, grow_score, n_drop, n_grow):
    """Pure-Python drop-and-grow on flat lists; the grow set is drawn from the weights inactive before."""
    active = [i for i, m in enumerate(mask) if m]
    inactive = [i for i, m in enumerate(mask) if not m]
    by_drop = sorted(active, key=lambda i: drop_score[i])
    by_grow = sorted(inactive, key=lambda i: -grow_score[i])
    # the reference is well defined only without ties at the cut
    if 0 < n_drop < len(by_drop):
        assert drop_score[by_drop[n_drop - 1]] != drop_score[by_drop[n_drop]]
    if 0 < n_grow < len(by_grow):
        assert grow_score[by_grow[n_grow - 1]] != grow_score[by_grow[n_grow]]
    dropped, grown = set(by_drop[:n_drop]), set(by_grow[:n_grow])
    new = [(m and i not in dropped) or i in grown for i, m in enumerate(mask)]
    return new, dropped, grown


def step(model, optimizer, x, y):
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def snapshot(model, optimizer):
    """θ, masks and every per-element optimizer state tensor, after the optimizer step, before the sparsifier's."""
    out = {}
    for name, layer in prunable_layers(model).items():
        theta = raw_weight(layer)
        state = {k: v.clone() for k, v in optimizer.state[theta].items()
                 if isinstance(v, torch.Tensor) and v.shape == theta.shape}
        out[name] = (theta.detach().clone(), masks_of(model)[name].clone(), state)
    return out


def check_applied(model, optimizer, before, expected_masks, changed):
    """New masks as expected; kept weights and their state untouched; dropped and grown ones zero."""
    for name, layer in prunable_layers(model).items():
        theta = raw_weight(layer).detach()
        theta0, mask0, state0 = before[name]
        new = masks_of(model)[name]
        assert new.flatten().tolist() == expected_masks[name], name
        kept = mask0 & new
        assert torch.equal(theta[kept], theta0[kept]), name            # survivors keep their values
        assert (theta[~kept] == 0).all(), name                          # dropped, grown and inactive: zero
        state = optimizer.state[raw_weight(layer)]
        for key, value in state0.items():
            assert torch.equal(state[key][kept], value[kept]), (name, key)  # and their optimizer state
            assert (state[key][~kept] == 0).all(), (name, key)
        assert changed[name] > 0, name


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
])
def test_rigl_update_matches_a_slow_reference_of_algorithm_1(make_optimizer):
    """RigL Algorithm 1 at t = 2ΔT: drop ⌊f(t)·|active|⌋ smallest |θ|, grow as many largest dense |∂L/∂w|;
    f(t) from eq. 1 computed here; kept weights and their SGD/Adam(AMSGrad) state are left as they were.
    Tanh, so that no dead unit ties the gradients at zero and the reference's order is unique."""
    model = small_mlp(activation=nn.Tanh)
    optimizer = make_optimizer(model.parameters())
    sparsifier = RigL(model, optimizer, 0.3, end=20, every=4, drop_fraction=0.4)
    batches = data(8)
    for x, y in batches[:7]:
        step(model, optimizer, x, y)
        sparsifier.step()
    x, y = batches[7]
    grads = dense_grads(model, x, y)                       # the gradient of the update step, before its step
    step(model, optimizer, x, y)
    before = snapshot(model, optimizer)
    sparsifier.step()                                      # step 8 = 2ΔT < T_end: an update
    f = cosine(8, 0.4, 20)
    expected, changed = {}, {}
    for name, (theta, mask, _) in before.items():
        flat = mask.flatten().tolist()
        active = sum(flat)
        n = min(math.floor(f * active), len(flat) - active)
        expected[name], dropped, grown = ref_drop_grow(flat, theta.abs().flatten().tolist(),
                                                        grads[name].abs().flatten().tolist(), n, n)
        assert not dropped & grown and sum(expected[name]) == active    # disjoint, exact count
        changed[name] = len(grown)
    check_applied(model, optimizer, before, expected, changed)


def test_set_update_drops_the_reference_smallest_and_grows_only_former_inactive_weights():
    """SET with its paper's constant ζ: each layer drops exactly the ⌊ζ·|active|⌋ smallest |θ| (slow sort),
    grows as many weights that were inactive before, all at zero with zero momentum; counts stay exact."""
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = SET(model, optimizer, 0.3, end=12, every=3, drop_fraction=0.3, cosine=False)
    batches = data(3)
    for x, y in batches[:2]:
        step(model, optimizer, x, y)
        sparsifier.step()
    step(model, optimizer, *batches[2])
    before = snapshot(model, optimizer)
    sparsifier.step()
    for name, (theta, mask, state) in before.items():
        flat = mask.flatten().tolist()
        active = sum(flat)
        n = min(math.floor(0.3 * active), len(flat) - active)
        _, dropped, _ = ref_drop_grow(flat, theta.abs().flatten().tolist(), [0.0] * len(flat), n, 0)
        new = masks_of(model)[name].flatten().tolist()
        assert {i for i, (a, b) in enumerate(zip(flat, new)) if a and not b} == dropped
        grown = {i for i, (a, b) in enumerate(zip(flat, new)) if b and not a}
        assert len(grown) == n and sum(new) == active
        layer = prunable_layers(model)[name]
        w, buf = raw_weight(layer).detach().flatten(), optimizer.state[raw_weight(layer)]["momentum_buffer"].flatten()
        assert all(w[i] == 0 and buf[i] == 0 for i in grown | dropped)


def hamilton(total, weights):
    """Largest-remainder apportionment of ``total`` in proportion to ``weights``."""
    norm = sum(weights.values())
    quota = {k: total * w / norm for k, w in weights.items()}
    out = {k: math.floor(q) for k, q in quota.items()}
    for k in sorted(quota, key=lambda k: out[k] - quota[k])[:total - sum(out.values())]:
        out[k] += 1
    return out


def test_snfs_update_matches_a_slow_reference_of_sparse_momentum():
    """SNFS Algorithm 1: M_t = β M_{t−1} + ∂L/∂w (by hand, dense); m_l = mean |M| over active weights;
    K = Σ_l ⌊p·|active_l|⌋ removed by smallest |θ|, regrown K·m_l/Σm (largest remainders) per layer at
    the inactive weights of largest |M|; the global count is exact. (Tanh: no dead unit, so no zero momentum
    ties where a layer grows.)"""
    model = small_mlp(activation=nn.Tanh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = SNFS(model, optimizer, 0.3, end=100, every=3, drop_fraction=0.3, cosine=False,
                      distribution="uniform", beta=0.8)
    momentum = {}
    batches = data(3)
    for i, (x, y) in enumerate(batches):
        for name, g in dense_grads(model, x, y).items():
            momentum[name] = g if name not in momentum else 0.8 * momentum[name] + g
        step(model, optimizer, x, y)
        if i < 2:
            sparsifier.step()
    before = snapshot(model, optimizer)
    sparsifier.step()                                                  # step 3: the update
    for name in momentum:                                             # the library's M agrees with ours
        assert torch.allclose(sparsifier.momentum[name], momentum[name], rtol=1e-5, atol=1e-7)
    mean, drops, inactive = {}, {}, {}
    for name, (_, mask, _) in before.items():
        flat = mask.flatten().tolist()
        m = momentum[name].abs().flatten().tolist()
        active = [i for i, a in enumerate(flat) if a]
        mean[name] = sum(m[i] for i in active) / len(active)
        drops[name] = math.floor(0.3 * len(active))
        inactive[name] = len(flat) - len(active)
    grow = hamilton(sum(drops.values()), mean)
    assert all(grow[name] <= inactive[name] for name in grow)        # no layer is full: no spill-over
    assert grow != drops                                              # weights really moved between layers
    expected, changed = {}, {}
    for name, (theta, mask, _) in before.items():
        expected[name], dropped, grown = ref_drop_grow(mask.flatten().tolist(), theta.abs().flatten().tolist(),
                                                        momentum[name].abs().flatten().tolist(),
                                                        drops[name], grow[name])
        changed[name] = len(dropped) + len(grown)
    check_applied(model, optimizer, before, expected, changed)
    assert sum(sparsifier.active.values()) == sum(sum(m.flatten().tolist()) for _, m, _ in before.values())


def top_set(values, k):
    order = sorted(range(len(values)), key=lambda i: -values[i])
    assert k == len(values) or values[order[k - 1]] != values[order[k]]
    return set(order[:k])


def test_topkast_one_sgd_step_with_penalty_matches_the_paper_by_hand():
    """Top-KAST, one plain-SGD step of loss + λ·Ω: θ ← θ − lr(∂L/∂w ⊙ 1_B + λ sign(θ)(1_A + 1_{B∖A}/D));
    weights outside B do not move; the refresh then takes A, B as the top-D, top-(D+M) of the new |θ|."""
    model = small_mlp()
    lr, lam, d_a, d_b = 0.5, 0.01, 0.25, 0.5
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    sparsifier = TopKAST(model, optimizer, d_a, d_b, every=1, distribution="uniform")
    layers = prunable_layers(model)
    theta0 = {name: raw_weight(layer).detach().clone() for name, layer in layers.items()}
    sets = {}
    for name, t in theta0.items():
        values = t.abs().flatten().tolist()
        a = top_set(values, round(d_a * len(values)))
        b = top_set(values, round(d_b * len(values)))
        assert a <= b
        assert masks_of(model)[name].flatten().nonzero().flatten().tolist() == sorted(a)
        assert sparsifier.backward_masks()[name].flatten().nonzero().flatten().tolist() == sorted(b)
        sets[name] = (a, b)
    x, y = data(1)[0]
    h = x                                                              # plain forward with θ ⊙ 1_A
    leaves = {}
    for name, module in model.named_children():
        if name in layers:
            a_mask = torch.zeros(theta0[name].numel())
            a_mask[sorted(sets[name][0])] = 1
            leaves[name] = (theta0[name] * a_mask.view_as(theta0[name])).requires_grad_()
            h = F.linear(h, leaves[name], module.bias)
        else:
            h = module(h)
    grads = dict(zip(leaves, torch.autograd.grad(F.cross_entropy(h, y), list(leaves.values()))))
    optimizer.zero_grad()
    (F.cross_entropy(model(x), y) + lam * sparsifier.penalty()).backward()
    optimizer.step()
    for name, layer in layers.items():
        a, b = sets[name]
        t0, g = theta0[name].flatten().tolist(), grads[name].flatten().tolist()
        expected = []
        for i, v in enumerate(t0):
            if i in b:
                sign = (v > 0) - (v < 0)
                v = v - lr * (g[i] + lam * sign * (1.0 if i in a else 1.0 / d_a))
            expected.append(v)
        assert raw_weight(layer).detach().flatten().tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    sparsifier.step()                                                  # every = 1: refresh on the new |θ|
    for name, layer in layers.items():
        values = raw_weight(layer).detach().abs().flatten().tolist()
        a, b = top_set(values, round(d_a * len(values))), top_set(values, round(d_b * len(values)))
        assert masks_of(model)[name].flatten().nonzero().flatten().tolist() == sorted(a)
        assert sparsifier.backward_masks()[name].flatten().nonzero().flatten().tolist() == sorted(b)


@pytest.mark.parametrize("cosine_decay", [True, False])
def test_update_steps_and_fractions_follow_algorithm_1_for_many_schedules(cosine_decay):
    """For every (T_end, ΔT) with ΔT < T_end ≤ 40: the masks change exactly at the multiples of ΔT with
    t < T_end under the cosine (f(T_end) = 0), t ≤ T_end at a constant rate, and at those steps the fraction is
    eq. 1 (or α)."""
    from lowlearn.sparse.schedule import UpdateSchedule

    for end in range(2, 41):
        for every in range(1, end):
            schedule = UpdateSchedule(end, every, 0.3, cosine_decay)
            last = end - 1 if cosine_decay else end
            assert [t for t in range(0, 3 * end) if schedule.updates_at(t)] == list(range(every, last + 1, every))
            for t in range(every, last + 1, every):
                want = cosine(t, 0.3, end) if cosine_decay else 0.3
                assert schedule.fraction(t) == pytest.approx(want, rel=1e-12, abs=1e-15)
