import pytest
import torch

from lowlearn.profiles import PROFILES, get_profile


def test_names_and_env(monkeypatch):
    assert set(PROFILES) == {"smoke", "cpu", "gpu"}
    monkeypatch.setenv("LOWLEARN_PROFILE", "smoke")
    assert get_profile().name == "smoke"
    monkeypatch.setenv("LOWLEARN_PROFILE", " GPU ")
    assert get_profile().name == "gpu"
    assert get_profile("cpu").name == "cpu"


def test_default_follows_cuda(monkeypatch):
    monkeypatch.delenv("LOWLEARN_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_profile().name == "gpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_profile().name == "cpu"


def test_unknown_profile_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LOWLEARN_PROFILE", "laptop")
    with pytest.raises(ValueError, match=r"unknown experiment profile 'laptop'.*cpu, gpu, smoke"):
        get_profile()


def test_profiles_grow_from_smoke_to_gpu():
    s, c, g = (PROFILES[n].budget for n in ("smoke", "cpu", "gpu"))
    train_size = {"mnist5k": 4000, "mnist": 60000}
    seen = [b.epochs * (b.train_limit or train_size[b.dataset]) for b in (s, c, g)]
    assert seen == sorted(seen)  # examples seen per run
    assert s.seeds <= c.seeds <= g.seeds
    assert s.dataset == c.dataset == "mnist5k" and g.dataset == "mnist"  # smoke and cpu stay offline
    for b in (s, c, g):
        assert 1.0 in b.widths and max(b.data_sizes) <= (b.train_limit or train_size[b.dataset])


def test_looking_forward_sizes():
    from lowlearn.models import BLOCKS, SmallCNN

    s, c, g = (PROFILES[n].looking_forward for n in ("smoke", "cpu", "gpu"))
    train_size = {"mnist5k": 4000, "mnist": 60000}
    seen = [p.epochs * (p.train_limit or train_size[p.dataset]) for p in (s, c, g)]
    assert seen == sorted(seen)
    assert s.dataset == c.dataset == "mnist5k" and g.dataset == "mnist"      # smoke and cpu stay offline
    assert c.seeds >= 3 and g.seeds >= 3 and s.seeds >= 2                     # 95% intervals over seeds
    for p in (s, c, g):
        assert "separable" in p.blocks and set(p.blocks) <= set(BLOCKS) - {"standard"}
        assert 0 < p.prune_begin_fraction < p.end_fraction <= 1 and 0 < p.drop_fraction < 1
        for block in ("standard", *p.blocks):          # every network of the chapter can be built
            SmallCNN(block, channels=p.channels, expansion=p.expansion, reduction=p.reduction)


def test_meta_test_episodes_shrink_with_the_support_set():
    cpu = PROFILES["cpu"].meta                                            # 100 episodes of 5-way 1-shot
    assert [cpu.test_episodes(n, k) for n, k in ((5, 1), (5, 5), (20, 1), (20, 5))] == [100, 20, 25, 10]
    smoke = PROFILES["smoke"].meta                                        # fewer than 10: all of them
    assert smoke.test_episodes(20, 5) == smoke.omniglot_test_episodes


def test_gradmax_grows_no_more_units_at_a_time_than_it_has_directions_for():
    # The grown layer feeds the 10 classes of a cross-entropy, whose errors sum to zero: rank M <= 9.
    for name, profile in PROFILES.items():
        assert 1 <= profile.growing.mnist_k <= 9, name
