import dataclasses

import pytest
import torch

from lowlearn.profiles import PROFILES, banner, get_profile


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


def test_banner_names_the_profile_the_device_it_is_given_and_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)          # the default device would be a GPU
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    line = banner(get_profile("smoke"), "cpu")
    assert line == f"profile: smoke | device: cpu (1 thread) | torch {torch.__version__}"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert "device: cpu (2 threads)" in banner(get_profile("cpu"), torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "device: cpu (2 threads)" in banner(get_profile("cpu"))


def test_banner_refuses_a_device_the_machine_lacks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda' was asked for, but CUDA is not available here"):
        banner(get_profile("smoke"), "cuda")


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


def test_an_unknown_name_error_says_where_the_name_came_from(monkeypatch):
    monkeypatch.delenv("LOWLEARN_PROFILE", raising=False)
    with pytest.raises(ValueError) as given:                     # an argument, e.g. lowlearn.eval's --profile
        get_profile("laptop")
    assert str(given.value) == "unknown experiment profile 'laptop'; choose one of cpu, gpu, smoke"
    monkeypatch.setenv("LOWLEARN_PROFILE", "laptop")
    with pytest.raises(ValueError, match=r"'laptop' in LOWLEARN_PROFILE; set it to one of cpu, gpu, smoke, or unset"):
        get_profile()
    assert get_profile("smoke").name == "smoke"                   # a name given wins over the variable


def test_a_profile_is_chosen_by_its_name():
    with pytest.raises(TypeError, match=r"by its name \(cpu, gpu, smoke\), not a Profile"):
        get_profile(PROFILES["cpu"])


def test_meta_test_episodes_need_a_real_setting():
    meta = PROFILES["cpu"].meta
    for ways, shots in ((0, 1), (5, 0), (-5, 1), (5.0, 1), (True, 1)):
        with pytest.raises(ValueError, match="must be an int >= 1"):
            meta.test_episodes(ways, shots)


def test_the_sizes_hold_what_their_chapters_index():
    for name, profile in PROFILES.items():
        meta, lowrank = profile.meta, profile.lowrank
        assert len(meta.omniglot_meta_steps) == len(meta.omniglot_settings), name    # zipped in the chapter
        assert 0.2 in lowrank.tols and set(lowrank.baseline_tols) <= set(lowrank.tols), name
        assert "reinit" in profile.lottery.controls, name                            # the chapter's claim needs it


def test_profiles_cannot_be_changed_in_place():
    sizes = PROFILES["cpu"].budget
    with pytest.raises(dataclasses.FrozenInstanceError):
        sizes.epochs = 1
    for profile in PROFILES.values():                              # every value is immutable: no list to append to
        for chapter in dataclasses.fields(profile)[1:]:
            hash(getattr(profile, chapter.name))
