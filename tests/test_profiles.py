import pytest
import torch

from lowlearn import profiles
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
    assert s.epochs <= c.epochs <= g.epochs
    assert s.seeds <= c.seeds <= g.seeds
    assert s.train_limit is not None and c.train_limit is None
    assert profiles.PROFILES["gpu"].budget.dataset == "mnist"
