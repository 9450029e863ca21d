import json
import math
import os
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import torch

from lowlearn import results


def test_record_then_load_round_trips(tmp_path):
    stored = results.record("pruning", "snip_error_98", torch.tensor(2.4), ci=0.3, unit="% error",
                            label="LeNet-300-100, 98% sparse", profile="cpu", directory=tmp_path)
    loaded = results.load("cpu", directory=tmp_path)
    assert loaded == {"pruning": {"snip_error_98": stored}}
    assert stored.value == pytest.approx(2.4) and stored.ci == 0.3 and stored.unit == "% error"
    assert stored.recorded and "torch" in stored.device
    assert str(stored) == "2.4 ± 0.3 % error"


def test_profiles_are_kept_apart(tmp_path):
    results.record("pruning", "dense_error", 1.7, profile="cpu", directory=tmp_path)
    results.record("pruning", "dense_error", 9.9, profile="smoke", directory=tmp_path)
    assert results.load("cpu", directory=tmp_path)["pruning"]["dense_error"].value == 1.7
    assert results.load("smoke", directory=tmp_path)["pruning"]["dense_error"].value == 9.9
    assert results.load("gpu", directory=tmp_path) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu.json", "smoke.json"]   # no temporary files left


def test_recording_again_replaces_only_that_entry(tmp_path):
    results.record("pruning", "a", 1.0, profile="cpu", directory=tmp_path)
    results.record("pruning", "b", 2.0, profile="cpu", directory=tmp_path)
    results.record("growing", "c", 3.0, profile="cpu", directory=tmp_path)
    results.record("pruning", "a", 4.0, profile="cpu", directory=tmp_path)
    loaded = results.load("cpu", directory=tmp_path)
    assert {chapter: {key: r.value for key, r in entries.items()} for chapter, entries in loaded.items()} == {
        "pruning": {"a": 4.0, "b": 2.0}, "growing": {"c": 3.0}}


def test_directory_from_the_environment_and_the_current_profile(tmp_path, monkeypatch):
    monkeypatch.setenv(results.ENV_VAR, str(tmp_path / "store"))
    monkeypatch.setenv("LOWLEARN_PROFILE", "smoke")
    results.record("growing", "gradmax_ratio", 1.5)
    assert results.results_path() == tmp_path / "store" / "smoke.json"
    assert json.loads(results.results_path().read_text())["profile"] == "smoke"
    assert results.load()["growing"]["gradmax_ratio"].value == 1.5


@pytest.mark.parametrize("chapter, key, value, ci, message", [
    ("", "k", 1.0, None, "chapter"),
    (None, "k", 1.0, None, "chapter of a result must be a non-empty string, got None"),
    ("c", " ", 1.0, None, "key"),
    ("pruning ", "k", 1.0, None, "must not start or end with spaces"),
    (" pruning", "k", 1.0, None, "must not start or end with spaces"),
    ("c", "k", math.nan, None, "finite"),
    ("c", "k", 1.0, math.inf, "finite"),
    ("c", "k", None, None, "must be a number, got None"),
    ("c", "k", True, None, r"must be a real number \(a float, an int or a tensor\), got True"),
    ("c", "k", "0.9", None, "must be a real number .*, got '0.9'"),
    ("c", "k", [0.9], None, "must be a real number"),
    ("c", "k", Decimal("0.1"), None, r"must be a real number .*, got Decimal\('0.1'\)"),
    ("c", "k", 1.0, math.nan, "interval must be a finite number, got nan"),
    ("c", "k", torch.tensor([0.9, 0.8]), None, "one number, got a Tensor of 2 values"),
    ("c", "k", torch.tensor([]), None, "one number, got a Tensor of 0 values"),
    ("c", "k", np.array([0.9, 0.8]), None, "one number, got a ndarray of 2 values"),
    ("c", "k", 1.0, -0.5, "cannot be negative"),
])
def test_bad_input_is_a_clear_error(tmp_path, chapter, key, value, ci, message):
    with pytest.raises(ValueError, match=message):
        results.record(chapter, key, value, ci=ci, profile="cpu", directory=tmp_path)
    assert not (tmp_path / "cpu.json").exists()


@pytest.mark.parametrize("content", ["{not json", '{"results": [1, 2]}', '{"other": {}}', '{"results": {"pruning": 5}}',
                                     '{"results": {"pruning": {"k": {"value": 1, "colour": "red"}}}}'])
def test_an_unreadable_file_is_reported_and_never_overwritten(tmp_path, content):
    path = tmp_path / "cpu.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="(?i)move it away"):
        results.load("cpu", directory=tmp_path)
    if "colour" not in content:        # a file whose structure is wrong cannot take a new entry either
        with pytest.raises(ValueError, match="left untouched"):
            results.record("pruning", "k", 1.0, profile="cpu", directory=tmp_path)
    assert path.read_text() == content


def test_numpy_numbers_and_one_element_arrays_are_numbers(tmp_path):
    for value in (np.float32(0.5), np.array(0.5), np.array([0.5]), torch.tensor([0.5]), 1):
        assert results.record("c", "k", value, ci=np.float64(0.1), profile="cpu", directory=tmp_path).value == \
            pytest.approx(float(np.asarray(value).item()))


def test_processes_recording_at_once_keep_every_entry(tmp_path):
    def record_many(prefix):
        for i in range(25):
            results.record("c", f"{prefix}{i}", float(i), profile="cpu", directory=tmp_path)

    threads = [threading.Thread(target=record_many, args=(prefix,)) for prefix in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results.load("cpu", directory=tmp_path)["c"]) == 50


def test_what_else_the_file_holds_is_kept(tmp_path):
    results.record("pruning", "a", 1.0, profile="smoke", directory=tmp_path)
    path = results.results_path("smoke", tmp_path)
    stored = json.loads(path.read_text())
    path.write_text(json.dumps({**stored, "notes": "my run on the lab machine"}))
    results.record("pruning", "b", 2.0, profile="smoke", directory=tmp_path)
    assert json.loads(path.read_text())["notes"] == "my run on the lab machine"


def test_the_file_is_read_as_the_utf_8_it_is_written_in_whatever_the_locale(tmp_path):
    # Python reads text in the locale's encoding unless told: under LANG=C (ASCII) a note in UTF-8 was refused.
    code = ("import json, sys; from lowlearn import results; directory = sys.argv[1]; "
            "results.record('pruning', 'a', 1.0, profile='smoke', directory=directory); "
            "path = results.results_path('smoke', directory); stored = json.loads(path.read_bytes()); "
            "path.write_bytes(json.dumps({**stored, 'notes': 'Lauf von J\\u00fcrgen'}, ensure_ascii=False).encode()); "
            "results.record('pruning', 'b', 2.0, profile='smoke', directory=directory); "
            "print(json.loads(path.read_bytes())['notes'])")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, env=env, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == "Lauf von J\u00fcrgen"


def test_a_result_names_the_device_that_measured_it(tmp_path):
    result = results.record("looking_forward", "t", 1.0, profile="smoke", directory=tmp_path, device="cpu")
    assert result.device.startswith("cpu (")
    missing = "cuda:99" if torch.cuda.is_available() else "cuda"
    for device, message in ((missing, "was asked for, but"), ("gpu", "unknown device 'gpu'")):
        with pytest.raises(ValueError, match=message):
            results.record("looking_forward", "u", 1.0, profile="smoke", directory=tmp_path, device=device)
    assert "u" not in results.load(profile="smoke", directory=tmp_path)["looking_forward"]


def test_a_folder_that_is_a_file_and_entries_that_are_not_numbers_are_clear_errors(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        results.record("pruning", "a", 1.0, profile="smoke", directory=blocker)
    with pytest.raises(ValueError, match="must be a finite number"):
        results.record("pruning", "a", 10**400, profile="smoke", directory=tmp_path)
    path = results.results_path("smoke", tmp_path)
    for entry in ('"value": "0.9"', '"value": NaN', '"value": 0.9, "ci": NaN', '"value": 0.9, "ci": "0.1"'):
        path.write_text('{"profile": "smoke", "results": {"pruning": {"a": {%s}}}}' % entry)
        with pytest.raises(ValueError, match="holds an entry that is not a result"):
            results.load("smoke", tmp_path)


def test_a_result_prints_as_value_plus_minus_interval_and_unit():
    assert str(results.Result(93.456, ci=0.12345, unit="% accuracy")) == "93.46 ± 0.123 % accuracy"
    assert str(results.Result(1.5)) == "1.5"                              # no interval, no unit
    assert str(results.Result(1.5, ci=0.0, unit="x dense")) == "1.5 ± 0 x dense"   # a zero interval is shown


def test_an_interval_of_zero_is_recorded(tmp_path):
    results.record("c", "k", 0.5, ci=0.0, profile="cpu", directory=tmp_path)   # every seed measured the same
    assert results.load("cpu", directory=tmp_path)["c"]["k"].ci == 0.0


def test_the_folder_given_beats_the_environment_and_an_empty_variable_means_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv(results.ENV_VAR, str(tmp_path / "from_env"))
    assert results.results_path("cpu", tmp_path / "given") == tmp_path / "given" / "cpu.json"
    monkeypatch.setenv(results.ENV_VAR, "")
    monkeypatch.chdir(tmp_path)
    assert results.results_path("cpu") == Path("results") / "cpu.json"


def test_a_result_is_stamped_in_utc_and_filed_under_the_profiles_own_name(tmp_path):
    import datetime

    result = results.record("c", "k", 1.0, profile=" CPU ", directory=tmp_path)
    assert datetime.datetime.fromisoformat(result.recorded).utcoffset() == datetime.timedelta(0)
    assert json.loads((tmp_path / "cpu.json").read_text())["profile"] == "cpu"


def test_a_reader_of_the_old_file_sees_it_whole_while_a_record_replaces_it(tmp_path):
    results.record("c", "a", 1.0, profile="cpu", directory=tmp_path)
    path = tmp_path / "cpu.json"
    old = path.read_text()
    with open(path, encoding="utf-8") as reader:                     # opened before the record
        results.record("c", "b", 2.0, profile="cpu", directory=tmp_path)
        assert reader.read() == old
    assert set(results.load("cpu", directory=tmp_path)["c"]) == {"a", "b"}


def test_a_results_folder_that_does_not_exist_yet_is_made_with_its_parents(tmp_path):
    results.record("c", "k", 1.0, profile="cpu", directory=tmp_path / "a" / "b")
    assert results.load("cpu", directory=tmp_path / "a" / "b")["c"]["k"].value == 1.0


def test_a_folder_where_the_results_file_should_be_is_an_error_not_an_empty_record(tmp_path):
    (tmp_path / "cpu.json").mkdir()
    with pytest.raises(IsADirectoryError):
        results.load("cpu", directory=tmp_path)
    with pytest.raises(IsADirectoryError):
        results.record("c", "k", 1.0, profile="cpu", directory=tmp_path)
    assert (tmp_path / "cpu.json").is_dir()


@pytest.mark.parametrize("entry", ['"value": 1.0, "ci": -2.0', '"value": 1.0, "unit": 5',
                                   '"value": 1.0, "label": null'])
def test_load_refuses_an_entry_that_record_refuses(tmp_path, entry):
    (tmp_path / "cpu.json").write_text('{"profile": "cpu", "results": {"c": {"k": {%s}}}}' % entry)
    with pytest.raises(ValueError, match="holds an entry that is not a result"):
        results.load("cpu", directory=tmp_path)


def test_a_unit_or_label_that_is_not_text_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="unit must be text, got 5"):
        results.record("c", "k", 1.0, unit=5, profile="cpu", directory=tmp_path)
    with pytest.raises(ValueError, match="label must be text, got None"):
        results.record("c", "k", 1.0, label=None, profile="cpu", directory=tmp_path)
    assert not (tmp_path / "cpu.json").exists()


def test_results_path_names_the_file_after_the_current_or_given_profile(tmp_path, monkeypatch):
    """``results_path`` files results under the profile's own name: the current one (``LOWLEARN_PROFILE``) by
    default, a given name as get_profile reads it (case and spaces ignored), and an unknown name is refused."""
    monkeypatch.setenv("LOWLEARN_PROFILE", "cpu")
    assert results.results_path(directory=tmp_path) == tmp_path / "cpu.json"
    assert results.results_path(" GPU ", tmp_path) == tmp_path / "gpu.json"
    with pytest.raises(ValueError, match="unknown experiment profile"):
        results.results_path("no-such-profile", tmp_path)


def test_load_reads_the_current_profiles_file(tmp_path, monkeypatch):
    """``load()`` without a profile reads the file of the profile ``LOWLEARN_PROFILE`` names, and no other."""
    results.record("c", "k", 1.0, profile="cpu", directory=tmp_path)
    results.record("c", "k", 2.0, profile="smoke", directory=tmp_path)
    monkeypatch.setenv("LOWLEARN_PROFILE", "cpu")
    assert results.load(directory=tmp_path)["c"]["k"].value == 1.0


@pytest.mark.parametrize("entry", ['"value": 1.0, "recorded": 5', '"value": 1.0, "device": null',
                                   '"value": 1.0, "device": ["cpu"]'])
def test_load_refuses_a_recorded_time_or_device_that_is_not_text(tmp_path, entry):
    """Every field of a stored result but its numbers must be text, ``recorded`` and ``device`` as much as
    ``unit`` and ``label``: a hand-edited entry with another type is an entry that is not a result."""
    (tmp_path / "cpu.json").write_text('{"profile": "cpu", "results": {"c": {"k": {%s}}}}' % entry)
    with pytest.raises(ValueError, match="holds an entry that is not a result"):
        results.load("cpu", directory=tmp_path)


def test_the_file_is_written_in_a_canonical_layout_whatever_the_order_of_records(tmp_path):
    """The results file (book/results/cpu.json is committed) is canonical JSON: keys sorted at every level,
    one-space indent and a final newline, so that the same results recorded in another order give the same bytes
    and a re-run's diff shows only the numbers that changed."""
    for order, directory in ((("b", "a"), tmp_path / "one"), (("a", "b"), tmp_path / "two")):
        for chapter in order:
            for key in order:
                results.record(chapter, key, 1.0, ci=0.5, unit="u", label="l", profile="cpu", directory=directory)
    texts = [(tmp_path / folder / "cpu.json").read_text(encoding="utf-8") for folder in ("one", "two")]
    canonical = json.dumps(json.loads(texts[0]), indent=1, sort_keys=True, allow_nan=False) + "\n"
    strip_times = lambda text: "\n".join(line for line in text.splitlines() if '"recorded"' not in line)  # noqa: E731
    assert texts[0] == canonical and texts[0].endswith("}\n")
    assert strip_times(texts[0]) == strip_times(texts[1])


def test_record_mean_stores_the_mean_and_students_t_interval_of_the_runs(tmp_path):
    """Reference: by hand, mean 0.93 and t(0.975, 2)·s/√3 of three seeds' accuracies, scaled to %; one run has no
    interval; a run that diverged is refused before anything is written."""
    accuracies = [0.92, 0.93, 0.94]
    s = math.sqrt(((0.92 - 0.93) ** 2 + (0.94 - 0.93) ** 2) / 2)
    stored = results.record_mean("ch", "acc", accuracies, scale=100, unit="% accuracy", label="3 seeds",
                                 profile="cpu", directory=tmp_path)
    assert stored == results.load("cpu", tmp_path)["ch"]["acc"]
    assert stored.value == pytest.approx(93.0) and stored.ci == pytest.approx(100 * 4.302653 * s / math.sqrt(3))
    assert (stored.unit, stored.label) == ("% accuracy", "3 seeds")
    one = results.record_mean("ch", "one", torch.tensor([0.5]), profile="cpu", directory=tmp_path)
    assert (one.value, one.ci) == (0.5, None)
    with pytest.raises(ValueError, match="not finite"):
        results.record_mean("ch", "bad", [0.9, float("nan")], profile="cpu", directory=tmp_path)
    assert set(results.load("cpu", tmp_path)["ch"]) == {"acc", "one"}
