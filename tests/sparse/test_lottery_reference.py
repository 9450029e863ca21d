"""lowlearn.sparse.lottery against independent references: a global ranking of the trained magnitudes across
convolutional and linear layers, the controls under rewinding (θ_k in place of θ_0), an independent
implementation of You et al.'s early-bird test, and the uniformity of the random-mask control."""

import torch
from torch import nn

from lowlearn.models import MLP
from lowlearn.sparse.lottery import EarlyBird, iterative_magnitude_pruning, random_mask, train_control
from lowlearn.sparse.mask import attach_masks, masked_layers, masks_of, raw_weight, set_masks
from lowlearn.sparse.prune import kept_count
from lowlearn.train import TrainState, fit, seed_everything

_g = torch.Generator().manual_seed(0)
X, Y = torch.randn(64, 2, 6, 6, generator=_g), torch.randint(0, 3, (64,), generator=_g)
RAW = "{}.parametrizations.weight.original"


def conv_net():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 36, 3))


def make_train(log, steps=6):
    """train(model, callbacks) with a fresh SGD each run; ``log`` gets the state before and after each run."""

    def train(model, callbacks):
        start = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        history = fit(model, (X, Y), optimizer, steps=steps, batch_size=16, callbacks=callbacks, device="cpu",
                      progress=False)
        log.append({"start": start, "end": {k: v.clone() for k, v in model.state_dict().items()}})
        return history

    return train


def test_global_imp_keeps_the_largest_trained_magnitudes_across_conv_and_linear_layers():
    """Frankle & Carbin's global pruning (VGG-19, ResNet-18): after each round the kept weights of all layers
    together are the top round(0.5^(r+1)·N) trained magnitudes |θ_j|, ranked across layers, pruned ones excluded."""
    seed_everything(0)
    log = []
    lottery = iterative_magnitude_pruning(conv_net(), make_train(log), rounds=2, prune_fraction=0.5,
                                          rewind_step=3, scope="global")
    names = list(lottery.rounds[0].masks)
    total = sum(m.numel() for m in lottery.rounds[0].masks.values())
    for r in range(2):
        magnitudes = torch.cat([log[r]["end"][RAW.format(n)].abs().flatten() for n in names])
        before = torch.cat([lottery.rounds[r].masks[n].flatten() for n in names])
        after = torch.cat([lottery.rounds[r + 1].masks[n].flatten() for n in names])
        assert int(after.sum()) == kept_count(0.5 ** (r + 1), total)
        assert not (after & ~before).any()
        assert magnitudes[after].min() >= magnitudes[before & ~after].max()      # a global threshold


def test_controls_under_rewinding_start_from_the_step_k_weights():
    """With rewinding, θ_k takes the place of θ_0 in every control (module docstring): the reshuffled values are
    those of θ_k, the constant is sign(θ_k) times the population std of θ_k, the random mask carries θ_k, and
    batch-norm statistics are those of step k."""
    seed_everything(0)
    log = []
    lottery = iterative_magnitude_pruning(conv_net(), make_train(log), rounds=2, prune_fraction=0.5, rewind_step=3)
    theta_k, theta_0 = lottery.rewind_state, log[0]["start"]
    ticket = lottery.rounds[2]
    assert not torch.equal(theta_k[RAW.format("0")], theta_0[RAW.format("0")])
    for control in ("reshuffle", "constant", "random_mask"):
        log.clear()
        result = train_control(conv_net(), lottery, ticket, make_train(log), control, seed=1)
        start = log[0]["start"]
        assert int(start["1.num_batches_tracked"]) == 3
        assert torch.equal(start["1.running_var"], theta_k["1.running_var"])
        for name, mask in result.masks.items():
            w, k = start[RAW.format(name)], theta_k[RAW.format(name)]
            assert (w[~mask] == 0).all()
            kept = w[mask]
            if control == "reshuffle":
                assert torch.equal(kept.sort().values, k[ticket.masks[name]].sort().values)
            elif control == "constant":
                torch.testing.assert_close(kept.abs(), k.std(correction=0).expand_as(kept))
                assert torch.equal(kept.sign(), k[mask].sign())
            else:
                assert torch.equal(kept, k[mask])


def reference_early_bird(snapshots, density, threshold=0.1, window=5):
    """You et al. (2020), §3: masks of each check by sorting |w| per layer; the Hamming distance of consecutive
    masks over all weights; a FIFO of the last `window` distances; found when full and its maximum < ε."""
    masks, distances, queue = [], [], []
    for weights in snapshots:
        mask = {}
        for name, w in weights.items():
            order = w.abs().flatten().argsort(descending=True)
            keep = torch.zeros(w.numel(), dtype=torch.bool)
            keep[order[:round(density * w.numel())]] = True
            mask[name] = keep.view_as(w)
        if masks:
            differ = sum(int((mask[n] != masks[-1][n]).sum()) for n in mask)
            distances.append(differ / sum(m.numel() for m in mask.values()))
            queue = (queue + [distances[-1]])[-window:]
            if len(queue) == window and max(queue) < threshold:
                return len(masks), distances
        masks.append(mask)
    return None, distances


def test_early_bird_with_the_papers_defaults_matches_an_independent_implementation():
    """EarlyBird(d, every) with the defaults ε = 0.1, l = 5 fires at the same check as a from-scratch
    implementation of the paper's test, with the same distances, on a two-layer net whose weights settle."""
    torch.manual_seed(0)
    model = MLP(in_features=6, hidden=(10,), out_features=4)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    final = {name: torch.randn_like(m.weight) for name, m in layers.items()}
    noise = [{name: torch.randn_like(m.weight) for name, m in layers.items()} for _ in range(20)]
    snapshots = [{n: final[n] + noise[t][n] * 0.8 ** t for n in final} for t in range(20)]
    bird = EarlyBird(0.3, every=7)
    for t, weights in enumerate(snapshots):
        with torch.no_grad():
            for name, w in weights.items():
                layers[name].weight.copy_(w)
        bird(TrainState(step=7 * (t + 1), epoch=t, loss=torch.zeros(()), model=model, optimizer=None))
    index, distances = reference_early_bird(snapshots, 0.3)
    assert index is not None and 5 < index < 19
    assert bird.distances[:len(distances)] == distances
    assert bird.found_at == 7 * (index + 1)


def test_random_mask_draws_each_allowed_position_equally_often():
    """random_mask is 'uniformly random' within the starting mask: over 400 seeds each of the 24 allowed positions
    of a layer is kept in about k/24 of the draws (binomial: within 5 standard deviations), never outside."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    attach_masks(model)
    allowed = torch.zeros(6, 8, dtype=torch.bool)
    allowed[:3] = True                                                       # 24 positions
    set_masks(model, {"0": allowed})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ticket = allowed.clone()
    ticket[0] = False                                                        # the ticket keeps k = 16
    counts = torch.zeros(6, 8)
    for seed in range(400):
        set_masks(model, {"0": ticket})
        random_mask(model, state, seed=seed)
        mask = masks_of(model)["0"]
        assert int(mask.sum()) == 16 and not (mask & ~allowed).any()
        assert torch.equal(raw_weight(masked_layers(model)["0"])[mask], state[RAW.format("0")][mask])
        counts += mask
    p = 16 / 24
    spread = (400 * p * (1 - p)) ** 0.5
    assert ((counts[allowed] - 400 * p).abs() < 5 * spread).all()
