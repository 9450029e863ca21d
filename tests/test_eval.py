"""``python -m lowlearn.eval omniglot-runs``: scoring the runs, held-out episodes, checkpoints."""

import dataclasses
import math
import re
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lowlearn.data.cache import DatasetNotFoundError, data_root
from lowlearn.data.episodes import Episode
from lowlearn.data.omniglot import Omniglot, OneShotRun
from lowlearn.eval import omniglot_runs
from lowlearn.meta import ProtoNet
from lowlearn.profiles import get_profile

DATA = data_root()          # $LOWLEARN_DATA, as .ci/run sets it
needs_real_data = pytest.mark.skipif(not (DATA / "omniglot" / "images_background_small2.zip").is_file(),
                                     reason=f"the Omniglot small sets are not in {DATA / 'omniglot'}")


def synthetic_runs(count=2, size=28, seed=0):
    """Runs whose query item i is an exact copy of the drawing of its class ``labels[i]``."""
    generator = torch.Generator().manual_seed(seed)
    runs = []
    for _ in range(count):
        support = torch.rand(20, 1, size, size, generator=generator)
        labels = torch.randperm(20, generator=generator)
        runs.append(OneShotRun(support, torch.arange(20), support[labels].clone(), labels))
    return runs


def test_run_errors_pair_each_query_with_its_class():
    sizes = get_profile("smoke").black_box
    exact = ProtoNet(nn.Flatten())                 # a query identical to its class's drawing is nearest to it
    assert omniglot_runs.run_errors(exact, synthetic_runs(), sizes, torch.device("cpu")).tolist() == [0.0, 0.0]
    swapped = [run._replace(query_labels=run.query_labels.roll(1)) for run in synthetic_runs()]
    assert omniglot_runs.run_errors(exact, swapped, sizes, torch.device("cpu")).tolist() == [100.0, 100.0]


def test_maml_predicts_only_the_classes_of_an_episode_with_fewer_than_20_ways():
    sizes = get_profile("smoke").black_box
    torch.manual_seed(0)
    maml = omniglot_runs.make_learner("maml", sizes)
    with torch.no_grad():                      # a head that prefers the classes 5 .. 19 to every episode class
        maml.model.head.bias.copy_(torch.cat([torch.full((5,), -100.0), torch.zeros(15)]))
    images = torch.rand(10, 1, sizes.image_size, sizes.image_size)
    labels = torch.arange(5).repeat(2)
    predicted = omniglot_runs.predict(maml.eval(), images[:5], labels[:5], images[5:], sizes)
    assert predicted.shape == (5,) and int(predicted.max()) < 5
    # task_accuracies scores a batch of episodes one by one with predict
    support, query = images[:5].expand(2, -1, -1, -1, -1), images[5:].expand(2, -1, -1, -1, -1)
    right_and_wrong = torch.stack([predicted, (predicted + 1) % 5])
    tasks = Episode(support, labels[:5].expand(2, 5), query, right_and_wrong, torch.arange(5).expand(2, 5))
    assert omniglot_runs.task_accuracies(maml, tasks, sizes).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("method", ["protonet", "matching"])
def test_a_channels_last_embedding_computes_the_same_function(method):
    import dataclasses

    sizes = get_profile("smoke").black_box
    torch.manual_seed(0)
    fast = omniglot_runs.make_learner(method, dataclasses.replace(sizes, channels_last=True)).eval()
    plain = omniglot_runs.make_learner(method, dataclasses.replace(sizes, channels_last=False)).eval()
    plain.load_state_dict(fast.state_dict())
    weight = [m.weight for m in fast.embedding.modules() if isinstance(m, nn.Conv2d)][-1]   # the first has 1 channel
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    generator = torch.Generator().manual_seed(1)
    support = torch.rand(10, 1, sizes.image_size, sizes.image_size, generator=generator)
    query = torch.rand(6, 1, sizes.image_size, sizes.image_size, generator=generator)
    labels = torch.arange(5).repeat(2)
    with torch.no_grad():
        assert torch.allclose(fast(support, labels, query), plain(support, labels, query), rtol=1e-4, atol=1e-5)


@needs_real_data
@pytest.mark.parametrize("method", omniglot_runs.METHODS)
def test_heldout_evaluation_and_checkpoints_that_are_never_overwritten(method, tmp_path, capsys):
    checkpoint = tmp_path / "learner.pt"
    common = ["--profile", "smoke", "--method", method, "--data", str(DATA), "--background", "small1",
              "--test", "heldout", "--episodes", "4", "--device", "cpu"]
    omniglot_runs.main(common + ["--save", str(checkpoint)])
    trained = capsys.readouterr().out
    assert "meta-trained" in trained and "20-way one-shot within one alphabet, 4 episodes" in trained
    assert "episodes from Japanese_(katakana), Sanskrit; Tagalog has fewer than 20 characters" in trained
    saved = checkpoint.read_bytes()
    with pytest.raises(SystemExit):
        omniglot_runs.main(common + ["--save", str(checkpoint)])
    assert checkpoint.read_bytes() == saved
    capsys.readouterr()
    omniglot_runs.main(common + ["--checkpoint", str(checkpoint)])
    loaded = capsys.readouterr().out
    sizes = get_profile("smoke").black_box
    steps = sizes.maml_steps if method == "maml" else sizes.meta_steps
    assert f"loaded {method} from {checkpoint} ({steps} training steps)" in loaded and "meta-trained" not in loaded
    assert trained.splitlines()[-2:] == loaded.splitlines()[-2:]   # the same learner scores the same episodes


@needs_real_data
def test_the_same_seed_gives_the_same_learner_and_error(capsys):
    common = ["--profile", "smoke", "--data", str(DATA), "--background", "small1", "--test", "heldout",
              "--episodes", "4", "--device", "cpu"]
    outputs = []
    for seed in ("3", "3", "4"):
        torch.manual_seed(int(seed) + len(outputs))      # whatever the caller's random state
        omniglot_runs.main(common + ["--seed", seed])
        out = capsys.readouterr().out
        outputs.append((re.search(r"final loss (\S+),", out).group(1), out.splitlines()[-1]))   # not the timing
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


@needs_real_data
def test_test_time_views_override_the_profile_for_the_learners_that_have_them(monkeypatch, capsys):
    seen = []
    scored = omniglot_runs.episode_errors

    def episode_errors(learner, *args):
        seen.append((learner.test_rotations, learner.test_shift, getattr(learner, "refine_steps", None)))
        return scored(learner, *args)

    monkeypatch.setattr(omniglot_runs, "episode_errors", episode_errors)
    common = ["--profile", "smoke", "--data", str(DATA), "--background", "small1", "--test", "heldout",
              "--episodes", "2", "--steps", "1", "--device", "cpu"]
    omniglot_runs.main(common + ["--test-rotations", "--test-shift", "2", "--refine-steps", "3"])
    omniglot_runs.main(common + ["--no-test-rotations", "--test-shift", "0", "--refine-steps", "0"])
    omniglot_runs.main(common)                                    # the profile's views
    smoke = get_profile("smoke").black_box
    assert seen == [(True, 2, 3), (False, 0, 0), (smoke.test_rotations, smoke.test_shift, smoke.refine_steps)]
    assert "error" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        omniglot_runs.main(common + ["--method", "maml", "--test-rotations"])
    assert "not maml" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        omniglot_runs.main(common + ["--method", "matching", "--refine-steps", "1"])
    assert "for protonet" in capsys.readouterr().err


@pytest.mark.parametrize("background", ["small2", "small1,small2", "full"])
def test_heldout_needs_alphabets_the_background_lacks_and_says_so_before_loading_anything(background, tmp_path,
                                                                                          capsys):
    with pytest.raises(SystemExit):              # an empty data root: no archive is looked for
        omniglot_runs.main(["--profile", "smoke", "--data", str(tmp_path / "empty"), "--background", background,
                            "--test", "heldout", "--steps", "1", "--save", str(tmp_path / "learner.pt")])
    captured = capsys.readouterr()
    assert "none is held out: use --background small1" in captured.err and captured.out == ""
    assert not (tmp_path / "learner.pt").exists() and not (tmp_path / "empty").exists()


@needs_real_data
def test_held_out_refuses_a_background_set_that_holds_every_small2_alphabet():
    with pytest.raises(ValueError, match="none is held out"):
        omniglot_runs.held_out(omniglot_runs.background("small1,small2", 28, str(DATA)), 28, str(DATA))


@needs_real_data
def test_the_held_out_alphabets_are_the_small2_ones_never_meta_trained_on(monkeypatch):
    small1 = omniglot_runs.background("small1", 28, str(DATA))
    test = omniglot_runs.held_out(small1, 28, str(DATA))
    assert test.alphabets == ["Japanese_(katakana)", "Sanskrit", "Tagalog"] and test.num_characters == 106
    assert not set(test.alphabets) & set(small1.alphabets) and not set(test.characters) & set(small1.characters)
    assert omniglot_runs.run_alphabets(test) == ["Japanese_(katakana)", "Sanskrit"]      # Tagalog: 17 characters
    # Every episode is drawn within one alphabet, as Lake et al.'s runs are.
    samplers, sampler = [], omniglot_runs.EpisodeSampler

    def recording_sampler(*args, **kwargs):
        samplers.append(sampler(*args, **kwargs))
        return samplers[-1]

    monkeypatch.setattr(omniglot_runs, "EpisodeSampler", recording_sampler)
    sizes = get_profile("smoke").black_box
    omniglot_runs.episode_errors(omniglot_runs.make_learner("protonet", sizes), test, sizes, torch.device("cpu"), 2)
    alphabets = test.alphabet_index[samplers[0].sample(16).classes]         # (16 episodes, 20 ways)
    assert (alphabets == alphabets[:, :1]).all()


@pytest.mark.parametrize("option, message", [
    (["--steps", "-1"], "argument --steps: expected an integer >= 0, got -1"),
    (["--episodes", "1"], "argument --episodes: expected an integer >= 2, got 1"),
    (["--method", "maml", "--test-shift", "1"], "--test-shift is for the metric learners"),
    (["--device", "meta"], "argument --device: 'meta' is not a device lowlearn runs on here"),
    (["--test-shift", "-3"], "argument --test-shift: expected an integer >= 0, got -3"),
    (["--test-shift", "28"], "--test-shift 28 is not below the 28-pixel images of profile smoke"),
    (["--device", "foo"], "argument --device: unknown device 'foo'"),
    (["--checkpoint", "a.pt", "--save", "b.pt"], "with --checkpoint nothing is trained"),
    (["--save", "/proc/version/learner.pt"], "cannot save to /proc/version/learner.pt"),
    (["--profile", "bogus"], "unknown experiment profile 'bogus'"),
    (["--checkpoint", "/nonexistent/learner.pt"], "--checkpoint /nonexistent/learner.pt is not a file"),
    (["--checkpoint", "a.pt", "--steps", "5"], "with --checkpoint nothing is trained"),
    (["--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    (["--seed", str(2**64)], f"argument --seed: expected a seed below 2**63, got {2**64}"),
])
def test_bad_options_are_usage_errors_before_anything_runs(option, message, tmp_path, capsys):
    save = tmp_path / "new" / "learner.pt"
    with pytest.raises(SystemExit):
        omniglot_runs.main(["--profile", "smoke", "--test", "heldout"] + option
                           + ([] if "--save" in option or "--checkpoint" in option else ["--save", str(save)]))
    assert message in capsys.readouterr().err
    assert not save.parent.exists()                  # a refused command leaves no folder behind


@needs_real_data
def test_a_file_that_appears_at_the_save_path_during_training_is_kept_and_the_learner_saved_beside_it(
        tmp_path, monkeypatch, capsys):
    save = tmp_path / "learner.pt"
    trained = omniglot_runs.train

    def train_while_another_run_saves(*args):
        losses = trained(*args)
        save.write_bytes(b"another run's learner")
        return losses

    monkeypatch.setattr(omniglot_runs, "train", train_while_another_run_saves)
    omniglot_runs.main(["--profile", "smoke", "--data", str(DATA), "--background", "small1", "--test",
                        "heldout", "--steps", "1", "--episodes", "2", "--device", "cpu", "--save", str(save)])
    out = capsys.readouterr().out
    assert f"saved to {tmp_path / 'learner-1.pt'} ({save} appeared during the training and is kept)" in out
    assert save.read_bytes() == b"another run's learner"
    omniglot_runs.load_checkpoint(tmp_path / "learner-1.pt", omniglot_runs.make_learner(
        "protonet", get_profile("smoke").black_box))


def test_save_learner_takes_the_first_free_name_and_replaces_none_of_the_files_before_it(tmp_path):
    save = tmp_path / "learner.pt"
    for path in (save, tmp_path / "learner-1.pt"):
        path.write_bytes(b"another run's learner")
    learner = nn.Linear(3, 2)
    assert omniglot_runs.save_learner(save, learner, method="protonet") == tmp_path / "learner-2.pt"
    assert all((tmp_path / name).read_bytes() == b"another run's learner" for name in ("learner.pt", "learner-1.pt"))
    assert omniglot_runs.load_checkpoint(tmp_path / "learner-2.pt", nn.Linear(3, 2)) == {"method": "protonet"}


@needs_real_data
def test_a_learner_that_could_not_be_saved_fails_the_command_after_the_evaluation(tmp_path, monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(omniglot_runs, "save_checkpoint", full_disk)
    with pytest.raises(SystemExit, match="the learner was not saved: .*No space left on device"):
        omniglot_runs.main(["--profile", "smoke", "--data", str(DATA), "--background", "small1", "--test",
                            "heldout", "--steps", "1", "--episodes", "2", "--device", "cpu", "--save",
                            str(tmp_path / "learner.pt")])
    assert "2 episodes: error" in capsys.readouterr().out


def test_a_checkpoint_scores_the_runs_without_the_background_set(tmp_path, monkeypatch, capsys):
    learner = omniglot_runs.make_learner("protonet", get_profile("smoke").black_box)
    checkpoint = omniglot_runs.save_checkpoint(tmp_path / "learner.pt", learner, method="protonet",
                                               background="small1,small2", profile="smoke")
    monkeypatch.setattr(omniglot_runs, "load_omniglot_runs", lambda root, image_size: synthetic_runs(20))
    omniglot_runs.main(["--profile", "smoke", "--data", str(tmp_path / "empty"), "--device", "cpu",
                        "--checkpoint", str(checkpoint)])
    assert "20 one-shot runs of Lake et al. (2015)" in capsys.readouterr().out


class FixedAnswers(nn.Module):
    """A learner that answers exactly ``right[r]`` of the 20 queries of the r-th run right."""

    def __init__(self, right=(), runs=()):
        super().__init__()
        self.right, self.labels, self.calls = list(right), [run.query_labels for run in runs], 0

    def forward(self, support, support_labels, query):
        r, self.calls = self.calls, self.calls + 1
        answers = self.labels[r].clone()
        answers[self.right[r]:] = (answers[self.right[r]:] + 1) % 20
        return nn.functional.one_hot(answers, 20).float()


def test_the_command_prints_each_runs_error_their_mean_and_the_t_interval(tmp_path, monkeypatch, capsys):
    """Per run 100 − 5·(queries right); the mean over the 20 runs, ± t_{0.975, 19} · s / √20 with s the sample
    standard deviation and t_{0.975, 19} = 2.093024 from a table of Student's t (the normal 1.96 gives 11.7, the
    population deviation 12.2; the right half-width is 12.5)."""
    right = [20, 19, 18, 17, 16, 15, 15, 14, 14, 13, 12, 12, 11, 10, 9, 8, 7, 5, 3, 0]
    runs = synthetic_runs(20)
    learner = FixedAnswers(right, runs)
    monkeypatch.setattr(omniglot_runs, "make_learner", lambda method, sizes: learner)
    monkeypatch.setattr(omniglot_runs, "load_omniglot_runs", lambda root, image_size: runs)
    checkpoint = omniglot_runs.save_checkpoint(tmp_path / "stub.pt", FixedAnswers(), method="protonet",
                                               background="small1,small2", profile="smoke")
    omniglot_runs.main(["--profile", "smoke", "--data", str(tmp_path / "empty"), "--device", "cpu",
                        "--checkpoint", str(checkpoint)])
    out = capsys.readouterr().out
    errors = [100 - 5 * r for r in right]
    mean = sum(errors) / 20
    half = 2.093024 * (sum((e - mean) ** 2 for e in errors) / 19) ** 0.5 / 20 ** 0.5
    assert f"{mean:.1f} ± {half:.1f} (95% interval over the 20 runs)" == "40.5 ± 12.5 (95% interval over the 20 runs)"
    assert f"{mean:.1f} ± {half:.1f} (95% interval over the 20 runs)" in out
    assert "per run: " + " ".join(str(e) for e in errors) in out
    assert learner.calls == 20


@needs_real_data
def test_zero_steps_score_the_untrained_learner(capsys):
    omniglot_runs.main(["--profile", "smoke", "--data", str(DATA), "--background", "small1", "--test",
                        "heldout", "--steps", "0", "--episodes", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "no training steps" in out and "2 episodes: error" in out


@needs_real_data
def test_a_checkpoint_of_another_method_background_or_profile_is_refused(tmp_path, capsys, monkeypatch):
    checkpoint = tmp_path / "protonet.pt"
    common = ["--data", str(DATA), "--background", "small1", "--test", "heldout", "--episodes", "2",
              "--device", "cpu"]
    omniglot_runs.main(common + ["--profile", "smoke", "--steps", "1", "--save", str(checkpoint)])
    saved = "saved with {'method': 'protonet', 'background': 'small1', 'profile': 'smoke'}"
    for other in (["--profile", "smoke", "--method", "matching"], ["--profile", "cpu"]):
        with pytest.raises(SystemExit, match=saved):
            omniglot_runs.main(common + other + ["--checkpoint", str(checkpoint)])
    # Scoring the runs as if the learner had seen only small2: refused, it was trained on small1.
    monkeypatch.setattr(omniglot_runs, "load_omniglot_runs", lambda root, image_size: synthetic_runs(20))
    with pytest.raises(SystemExit, match=saved):
        omniglot_runs.main(["--data", str(DATA), "--background", "small2", "--device", "cpu", "--profile",
                            "smoke", "--checkpoint", str(checkpoint)])
    assert "loaded" not in capsys.readouterr().out


@needs_real_data
def test_the_runs_are_scored_beside_the_published_table(monkeypatch, capsys):
    monkeypatch.setattr(omniglot_runs, "load_omniglot_runs", lambda root, image_size: synthetic_runs(20))
    omniglot_runs.main(["--profile", "smoke", "--data", str(DATA), "--background", "small1", "--steps", "2"])
    out = capsys.readouterr().out
    assert "20 one-shot runs of Lake et al. (2015)" in out
    assert "Siamese convnet (Koch et al. 2015)" in out and "small2 background" in out


def test_missing_runs_offline_say_what_to_do(monkeypatch):
    def offline(root, image_size):
        raise DatasetNotFoundError("all_runs.zip is not at /nowhere")

    monkeypatch.setattr(omniglot_runs, "load_omniglot_runs", offline)
    monkeypatch.setattr(omniglot_runs, "background", lambda name, size, root: None)
    with pytest.raises(SystemExit, match="--test heldout"):
        omniglot_runs.main(["--profile", "smoke"])


def test_episodes_with_the_runs_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        omniglot_runs.main(["--profile", "smoke", "--episodes", "50"])
    assert "use it with --test heldout" in capsys.readouterr().err


def test_missing_background_data_and_a_damaged_checkpoint_are_clear_errors(tmp_path, monkeypatch):
    def offline(*args, **kwargs):                 # as on a machine without a network, wherever the test runs
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit, match="omniglot"):
        omniglot_runs.main(["--profile", "smoke", "--background", "small1", "--test", "heldout", "--data",
                            str(tmp_path / "empty")])
    damaged = tmp_path / "learner.pt"
    monkeypatched = ["--profile", "smoke", "--background", "small1", "--test", "heldout", "--checkpoint",
                     str(damaged)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(omniglot_runs, "background", lambda name, size, root: None)
        patch.setattr(omniglot_runs, "held_out", lambda data, size, root: None)
        for content in (b"", b"not a checkpoint", b"PK\x03\x04 cut off"):      # torch fails on each differently
            damaged.write_bytes(content)
            with pytest.raises(SystemExit, match="learner.pt is damaged or cut off.*leave out --checkpoint"):
                omniglot_runs.main(monkeypatched)


def test_missing_or_damaged_archives_end_the_command_with_what_to_do(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    (tmp_path / "omniglot").mkdir()
    damaged = tmp_path / "omniglot" / "images_background_small1.zip"
    damaged.write_bytes(b"PK\x03\x04 cut off")
    common = ["--profile", "smoke", "--data", str(tmp_path), "--device", "cpu"]
    with pytest.raises(SystemExit, match="images_background_small1.zip is corrupted.*delete or move it"):
        omniglot_runs.main(common + ["--background", "small1", "--test", "heldout"])
    assert damaged.read_bytes() == b"PK\x03\x04 cut off"                  # the user's file is left as it is
    monkeypatch.setattr(omniglot_runs, "background", lambda name, size, root: None)
    # The background set is there, but the small2 alphabets to hold out are not.
    with pytest.raises(SystemExit, match="images_background_small2.zip is not at"):
        omniglot_runs.main(common + ["--background", "small1", "--test", "heldout"])
    (tmp_path / "omniglot" / "all_runs.zip").write_bytes(b"not the runs")
    with pytest.raises(SystemExit, match="(?s)all_runs.zip is corrupted.*--test heldout"):
        omniglot_runs.main(common)


def test_the_eval_entry_point_lists_its_tasks(capsys):
    from lowlearn.eval.__main__ import main

    main(["--help"])
    assert "omniglot-runs" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="'omniglot_runs' is not a task"):
        main(["omniglot_runs"])


def test_the_default_profile_is_the_one_the_help_names_whatever_the_device(monkeypatch, capsys):
    # The machine's profile, as in the chapters: gpu where CUDA is available, also for a run on --device cpu.
    monkeypatch.delenv("LOWLEARN_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def stop(method, sizes):
        raise SystemExit("stopped before building the learner")

    monkeypatch.setattr(omniglot_runs, "make_learner", stop)
    with pytest.raises(SystemExit, match="stopped"):
        omniglot_runs.main(["--device", "cpu", "--test", "heldout", "--background", "small1"])
    assert capsys.readouterr().out.startswith("profile: gpu | device: cpu")
    with pytest.raises(SystemExit):
        omniglot_runs.main(["--help"])
    assert "(default: $LOWLEARN_PROFILE, else gpu where CUDA is available and cpu elsewhere, whatever --device)" in (
        " ".join(capsys.readouterr().out.split()))


def test_unknown_background_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown background"):
        omniglot_runs.background("small3", 28)


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown method 'protonets'; choose one of protonet, matching, maml"):
        omniglot_runs.make_learner("protonets", get_profile("smoke").black_box)


def test_maml_on_a_smaller_episode_can_answer_its_last_class():
    """On a 5-way episode MAML chooses among classes 0..4 (docstring of predict), the last included.
    Reference by hand: a zero head weight and bias 100 on class 4, 200 on classes 5..19 (the episode lacks them)
    and 0 on 0..3; two inner steps of lr 0.1 move a bias by at most 0.2, so every query must be answered 4."""
    sizes = get_profile("smoke").black_box
    torch.manual_seed(0)
    maml = omniglot_runs.make_learner("maml", sizes).eval()
    with torch.no_grad():
        maml.model.head.weight.zero_()
        maml.model.head.bias.copy_(torch.tensor([0.0] * 4 + [100.0] + [200.0] * 15))
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(10, 1, 28, 28, generator=generator)
    labels = torch.arange(5)
    predicted = omniglot_runs.predict(maml, images[:5], labels, images[5:], sizes)
    assert predicted.tolist() == [4] * 5


def test_maml_adapts_for_the_profiles_test_steps_not_its_training_steps():
    """predict adapts with ``sizes.maml_test_steps`` (Finn et al.'s code: 10 at test time against 5 in training).
    Reference: the prediction equals the argmax of the model run on the parameters of
    ``adapt(steps=maml_test_steps)``, and adapt is asked for exactly those steps."""
    sizes = dataclasses.replace(get_profile("smoke").black_box, maml_inner_steps=1, maml_test_steps=3)
    torch.manual_seed(0)
    maml = omniglot_runs.make_learner("maml", sizes).eval()
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(40, 1, 28, 28, generator=generator)
    labels = torch.arange(20)
    asked = []
    adapt = maml.adapt

    def spy(*args, steps, **kwargs):
        asked.append(steps)
        return adapt(*args, steps=steps, **kwargs)

    maml.adapt = spy
    predicted = omniglot_runs.predict(maml, images[:20], labels, images[20:], sizes)
    assert asked == [3]
    with torch.enable_grad():
        params = adapt(images[:20], labels, steps=3, first_order=True)
    with torch.no_grad():
        expected = maml(images[20:], {n: p.detach() for n, p in params.items()}).argmax(-1)
    assert torch.equal(predicted, expected)


def _toy_omniglot(alphabets=2, characters=6, size=28):
    """Characters whose every drawing has one inked pixel in the top-left corner: a rotation moves it."""
    images = torch.zeros(alphabets * characters, 20, 1, size, size)
    images[..., 0, 0] = 1.0
    names = [f"A{a}/character{c:02d}" for a in range(alphabets) for c in range(characters)]
    return Omniglot.from_characters(images, names)


class _Recorder:
    """Stands in for a learner's meta_step: keeps the episodes and the learning rate of every step."""

    def __init__(self):
        self.tasks, self.lrs = [], []

    def __call__(self, tasks, optimizer):
        self.tasks.append(tasks)
        self.lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()                  # no gradients: changes nothing, keeps the scheduler's order warning away
        return {"loss": torch.tensor(1.0)}


def _train(sizes, data):
    learner = omniglot_runs.make_learner("protonet", sizes)
    recorder = _Recorder()
    learner.meta_step = recorder
    omniglot_runs.train(learner, "protonet", data, sizes, torch.device("cpu"))
    return recorder


def test_training_episodes_are_within_one_alphabet_and_include_rotated_characters():
    """BlackBoxSizes: ``rotations`` adds each character rotated by 90/180/270 degrees as new classes, and
    ``within_alphabet`` draws every training episode's classes from one alphabet. Reference: the episodes'
    original classes (Episode.classes) index the rotation-major dataset of 4 x 12 characters, two alphabets of 6."""
    data = _toy_omniglot()
    sizes = dataclasses.replace(get_profile("smoke").black_box, rotations=True, within_alphabet=True, augment=False,
                                train_ways=5, train_shots=1, train_queries=1, meta_steps=6)
    recorder = _train(sizes, data)
    assert len(recorder.tasks) == 6
    classes = torch.cat([t.classes.reshape(-1, 5) for t in recorder.tasks])       # (episodes, ways)
    alphabet = (classes % 12) // 6
    assert (alphabet == alphabet[:, :1]).all()                                    # one alphabet per episode
    assert (classes >= 12).any()                                                  # rotated characters are drawn
    # and the rotated classes really are the rotated drawings: their ink left the top-left corner
    for t in recorder.tasks:
        rotated = t.classes.reshape(-1) >= 12                          # one support image per class
        corner = t.support_x.reshape(-1, 28, 28)[:, 0, 0]
        assert torch.equal(corner == 1.0, ~rotated)


def test_without_rotations_or_alphabets_training_sees_the_plain_characters_from_every_alphabet():
    """The same recipe with ``rotations=False, within_alphabet=False``: only the 12 plain characters, and (over
    20 seeded episodes of 5 of 12 classes) some episode mixes the two alphabets."""
    data = _toy_omniglot()
    sizes = dataclasses.replace(get_profile("smoke").black_box, rotations=False, within_alphabet=False,
                                augment=False, train_ways=5, train_shots=1, train_queries=1, meta_steps=20)
    recorder = _train(sizes, data)
    classes = torch.cat([t.classes.reshape(-1, 5) for t in recorder.tasks])
    assert int(classes.max()) < 12
    alphabet = classes // 6
    assert (alphabet != alphabet[:, :1]).any()


def test_the_training_learning_rate_follows_a_cosine_to_zero_over_the_meta_steps():
    """train's docstring: Adam's learning rate starts at ``sizes.lr`` and follows a cosine to zero over the
    meta-steps. Reference: step t (0-based) runs at lr · (1 + cos(π t / T)) / 2, T = meta_steps, and the
    scheduler ends at 0."""
    data = _toy_omniglot()
    steps = 8
    sizes = dataclasses.replace(get_profile("smoke").black_box, rotations=False, within_alphabet=False,
                                augment=False, train_ways=5, train_shots=1, train_queries=1, meta_steps=steps)
    recorder = _train(sizes, data)
    expected = [sizes.lr * (1 + math.cos(math.pi * t / steps)) / 2 for t in range(steps)]
    assert recorder.lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)
    # the last step runs at lr (1 + cos(7π/8)) / 2, a small fraction of lr, on its way to 0
    assert recorder.lrs[-1] < 0.04 * sizes.lr


def test_run_errors_score_the_learner_in_evaluation_mode():
    """Reference: a ProtoNet on flattened pixels through a dropout layer classifies each query (an exact copy of
    its class's drawing) without error only when the dropout is off, i.e. in evaluation mode."""
    generator = torch.Generator().manual_seed(0)
    runs = []
    for _ in range(2):
        support = torch.rand(20, 1, 28, 28, generator=generator)
        labels = torch.randperm(20, generator=generator)
        runs.append(OneShotRun(support, torch.arange(20), support[labels].clone(), labels))
    learner = ProtoNet(nn.Sequential(nn.Flatten(), nn.Dropout(0.9))).train()
    torch.manual_seed(0)
    errors = omniglot_runs.run_errors(learner, runs, get_profile("smoke").black_box, torch.device("cpu"))
    assert errors.tolist() == [0.0, 0.0]
    assert not learner.training


def test_training_draws_its_episodes_with_the_runs_seed(monkeypatch):
    """Reference: ``main``'s comment "--seed fixes the initialisation as well as the episodes": the episode
    sampler of ``train`` is seeded with the seed it is given (recorded by a stand-in sampler), so two seeds give
    two different episode streams."""
    seeds = []

    class Recorder:
        def __init__(self, *args, seed=None, **kwargs):
            seeds.append(seed)

    monkeypatch.setattr(omniglot_runs, "EpisodeSampler", Recorder)
    monkeypatch.setattr(omniglot_runs, "meta_train", lambda *args, **kwargs: [])
    sizes = dataclasses.replace(get_profile("smoke").black_box, rotations=False, within_alphabet=False,
                                augment=False)
    data = SimpleNamespace(images=torch.zeros(4, 1, 28, 28), alphabet_index=torch.zeros(4, dtype=torch.long))
    for seed in (0, 3, 7):
        omniglot_runs.train(omniglot_runs.make_learner("protonet", sizes), "protonet", data, sizes,
                            torch.device("cpu"), seed=seed)
    assert seeds == [0, 3, 7]


def test_the_augmentation_does_not_repeat_the_episode_samplers_random_numbers(monkeypatch):
    """With ``augment``, ``train`` distorts the images with a generator of its own stream: seeded with the plain
    seed, it would draw the very numbers the episode sampler drew to pick the classes (its generator is seeded
    with the seed), so the first distortions would be fixed by the first episode's classes. Reference: the
    sampler's own generator, made by a real EpisodeSampler with the same seed."""
    samplers, generators = [], []

    class KeepSampler(omniglot_runs.EpisodeSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            samplers.append(self)

    def first_batch(learner, sampler, optimizer, steps, *, transform, **kwargs):
        transform(torch.zeros(2, 1, 28, 28))
        return []

    monkeypatch.setattr(omniglot_runs, "EpisodeSampler", KeepSampler)
    monkeypatch.setattr(omniglot_runs, "meta_train", first_batch)
    monkeypatch.setattr(omniglot_runs, "random_affine", lambda images, generator: generators.append(generator))
    sizes = dataclasses.replace(get_profile("smoke").black_box, rotations=False, within_alphabet=False, augment=True)
    omniglot_runs.train(omniglot_runs.make_learner("protonet", sizes), "protonet", _toy_omniglot(), sizes,
                        torch.device("cpu"), seed=3)
    (sampler,), (generator,) = samplers, generators
    assert generator is not sampler.generator
    assert not torch.equal(torch.rand(16, generator=generator), torch.rand(16, generator=sampler.generator))


class _AlwaysClassZero(nn.Module):
    """A stand-in learner that answers class 0 to every query and keeps the sizes of the episodes it sees."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, support, support_labels, query):
        self.seen.append((support.shape[0], query.shape[0]))
        return nn.functional.one_hot(torch.zeros(query.shape[0], dtype=torch.long), 20).float()


@needs_real_data
def test_held_out_episode_errors_are_percentages_on_twenty_way_one_shot_episodes_with_one_query_per_class():
    # episode_errors' docstring: error rate (%) on run-like episodes, 20-way one-shot, one query per class (as
    # Lake et al.'s runs). Answering class 0 to all 20 queries is right once: 19 / 20 wrong, 95%.
    test = omniglot_runs.load_omniglot("small2", root=str(DATA), image_size=28)
    learner = _AlwaysClassZero()
    errors = omniglot_runs.episode_errors(learner, test, get_profile("smoke").black_box, torch.device("cpu"), 3)
    assert errors.tolist() == pytest.approx([95.0, 95.0, 95.0])
    assert learner.seen == [(20, 20)] * 3


@needs_real_data
def test_held_out_evaluation_scores_400_episodes_unless_told_otherwise(monkeypatch, capsys):
    # --episodes' help: "default 400"
    asked = []

    def episode_errors(learner, test, sizes, device, episodes):
        asked.append(episodes)
        return torch.tensor([10.0, 20.0])

    monkeypatch.setattr(omniglot_runs, "episode_errors", episode_errors)
    omniglot_runs.main(["--profile", "smoke", "--data", str(DATA), "--background", "small1", "--test", "heldout",
                        "--steps", "0", "--device", "cpu"])
    assert asked == [400]
    assert "400 episodes" in capsys.readouterr().out


def test_the_published_table_is_lake_et_als():
    # Lake, Salakhutdinov & Tenenbaum (2015), Science, one-shot classification error rates (%) on the 20 runs: with
    # the full background set people 4.5, BPL 3.3, Koch et al.'s Siamese convnet 8.0, deep convnet 13.5,
    # hierarchical deep 34.8; with one small background set BPL 4.3 and 4.0, deep convnet 24.0 and 22.3 (the
    # black-box chapter quotes them: "22–24%", "13.5%", "8.0%", "3.3–4.3%", "4.5%")
    assert omniglot_runs.PUBLISHED == {
        "full": [("People", 4.5), ("Bayesian Program Learning (BPL)", 3.3),
                 ("Siamese convnet (Koch et al. 2015)", 8.0), ("Deep convnet", 13.5), ("Hierarchical deep", 34.8)],
        "small1": [("Bayesian Program Learning (BPL)", 4.3), ("Deep convnet", 24.0)],
        "small2": [("Bayesian Program Learning (BPL)", 4.0), ("Deep convnet", 22.3)],
    }


def test_maml_trains_on_its_own_meta_batch_of_twenty_way_one_shot_episodes(monkeypatch):
    # train: MAML's episodes are 20-way (its head's classes) one-shot with sizes.maml_queries queries per class,
    # sizes.maml_meta_batch of them per meta-step; here both differ from the metric learners' sizes and from 1
    samplers, batches = [], []

    def recording_sampler(images, ways, shots, queries, **kwargs):
        samplers.append((ways, shots, queries))

    def recording_meta_train(learner, sampler, optimizer, steps, *, batch, **kwargs):
        batches.append(batch)
        return []

    monkeypatch.setattr(omniglot_runs, "EpisodeSampler", recording_sampler)
    monkeypatch.setattr(omniglot_runs, "meta_train", recording_meta_train)
    sizes = dataclasses.replace(get_profile("smoke").black_box, rotations=False, within_alphabet=False,
                                augment=False, maml_meta_batch=3, maml_queries=4)
    omniglot_runs.train(omniglot_runs.make_learner("maml", sizes), "maml", _toy_omniglot(), sizes,
                        torch.device("cpu"))
    assert samplers == [(20, 1, 4)] and batches == [3]


def test_the_matching_network_takes_the_profiles_scale():
    sizes = dataclasses.replace(get_profile("smoke").black_box, matching_scale=3.0)
    assert omniglot_runs.make_learner("matching", sizes).scale == 3.0
