"""lowlearn.results: float round trips, corrupted files, what a record stores, and records in several processes."""

import json
import multiprocessing
import os
import struct
import threading

import numpy as np
import pytest

from lowlearn import results


@pytest.mark.parametrize("value", [0.1, 1 / 3, -0.0, 5e-324, 1e-300, 1.7976931348623157e308, 2.0**53 + 2,
                                   float(np.float32(0.1))],
                         ids=["0.1", "1/3", "-0.0", "subnormal", "tiny", "max", "2**53+2", "float32(0.1)"])
def test_a_value_and_its_interval_round_trip_bit_for_bit(tmp_path, value):
    """The JSON file keeps every finite double exactly (compared as IEEE-754 bit patterns, so -0.0 != 0.0)."""
    results.record("c", "k", value, ci=abs(value), profile="cpu", directory=tmp_path)
    loaded = results.load("cpu", directory=tmp_path)["c"]["k"]
    bits = lambda x: struct.pack("<d", x)                                # noqa: E731
    assert bits(loaded.value) == bits(value) and bits(loaded.ci) == bits(abs(value))


def test_the_stored_file_is_strict_json_and_names_its_profile(tmp_path):
    results.record("pruning", "a", 0.25, ci=0.5, unit="% error", label="x", profile="smoke", directory=tmp_path)

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    stored = json.loads((tmp_path / "smoke.json").read_text(encoding="utf-8"), parse_constant=refuse)
    assert stored["profile"] == "smoke"
    entry = stored["results"]["pruning"]["a"]
    assert set(entry) == {"value", "ci", "unit", "label", "recorded", "device"}
    assert entry["value"] == 0.25 and entry["ci"] == 0.5 and entry["unit"] == "% error"


DAMAGED = [b"", b"\xff\xfe\x00garbage", b"null", b"[1, 2]", b'{"results": null}', b'{"results": {"c": {"k": [1, 2]}}}',
           b'{"results": {"c": {"k": 0.5}}}', b'{"results": {"c": {"k": {"value": Infinity}}}}',
           b'{"results": {"c": {"k": {"value": 1.0, "colour": "red"}}}}', b'{"results": {" c": {"k": {"value": 1.0}}}}',
           b'{"results": {}, "notes": NaN}',
           b'{"results": {"c": {"a": {"value": 1.0}}, "c": {"b": {"value": 2.0}}}}']
DAMAGE = ["empty", "not-utf8", "null", "list", "results-null", "entry-list", "entry-number", "infinite",
          "unknown-field", "spaced-chapter", "nan-outside-the-results", "repeated-chapter"]


@pytest.mark.parametrize("content", DAMAGED, ids=DAMAGE)
def test_a_corrupted_file_is_a_clear_error_and_stays_as_it_was(tmp_path, content):
    """Every kind of damage gives the ValueError that names the file and says to move it away; no bytes change."""
    path = tmp_path / "cpu.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"cpu\.json.*(?i:move it away)"):
        results.load("cpu", directory=tmp_path)
    assert path.read_bytes() == content


@pytest.mark.parametrize("content", DAMAGED, ids=DAMAGE)
def test_recording_into_a_corrupted_file_changes_nothing(tmp_path, content):
    """Damage that load() refuses, down to one entry, also stops record() before it writes: the file keeps its
    bytes (a rewrite would store the new result where load() cannot read it back)."""
    path = tmp_path / "cpu.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="left untouched"):
        results.record("c", "k", 1.0, profile="cpu", directory=tmp_path)
    assert path.read_bytes() == content and sorted(p.name for p in tmp_path.iterdir()) == ["cpu.json"]


def test_a_record_through_a_link_replaces_the_linked_file_and_keeps_the_link(tmp_path):
    """LOWLEARN_RESULTS folders are often links to a shared drive: the link must survive a record."""
    (tmp_path / "drive").mkdir()
    real = tmp_path / "drive" / "cpu.json"
    results.record("c", "a", 1.0, profile="cpu", directory=tmp_path / "drive")
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "cpu.json").symlink_to(real)
    results.record("c", "b", 2.0, profile="cpu", directory=tmp_path / "local")
    assert (tmp_path / "local" / "cpu.json").is_symlink()
    assert {k: r.value for k, r in results.load("cpu", directory=tmp_path / "drive")["c"].items()} == {"a": 1.0,
                                                                                                       "b": 2.0}


fork = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")


# The children name their device: a forked child cannot ask a GPU its name once the parent has used CUDA.
def _record_many(directory, prefix, count):
    for i in range(count):
        results.record("c", f"{prefix}{i}", float(i), ci=0.0, profile="cpu", directory=directory, device="cpu")


@fork
def test_two_processes_recording_at_once_keep_every_entry(tmp_path):
    """Two processes, each with its own lock descriptor (flock), interleave 2 x 15 read-modify-write cycles: the
    file must end with all 30 entries and the right values (the reference: the union of what each wrote)."""
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_record_many, args=(tmp_path, prefix, 15)) for prefix in "pq"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    loaded = results.load("cpu", directory=tmp_path)["c"]
    assert {key: r.value for key, r in loaded.items()} == {f"{p}{i}": float(i) for p in "pq" for i in range(15)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu.json"]        # no temporary files left behind


def _killed_while_publishing(directory):
    def die(fd):                     # the new file is written and flushed, not yet synced nor renamed
        os._exit(3)

    os.fsync = die
    results.record("c", "lost", 9.0, profile="cpu", directory=directory, device="cpu")


@fork
def test_a_process_killed_in_the_middle_of_a_record_loses_only_that_record(tmp_path):
    """A process that dies while it writes (here: at the fsync, with the lock held) leaves the earlier records
    readable and byte for byte as they were, releases the lock (the next record does not wait forever), and the
    next record keeps every earlier entry. Only the killed process's own hidden .part file is left behind."""
    results.record("c", "kept", 1.0, ci=0.5, unit="% error", label="before the crash", profile="cpu",
                   directory=tmp_path)
    before = (tmp_path / "cpu.json").read_bytes()
    child = multiprocessing.get_context("fork").Process(target=_killed_while_publishing, args=(tmp_path,))
    child.start()
    child.join(30)
    assert child.exitcode == 3
    assert (tmp_path / "cpu.json").read_bytes() == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "cpu.json"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".cpu.json.") and leftovers[0].endswith(".part")
    results.record("c", "after", 2.0, profile="cpu", directory=tmp_path)     # blocks forever if the lock leaked
    loaded = results.load("cpu", directory=tmp_path)["c"]
    assert {key: r.value for key, r in loaded.items()} == {"kept": 1.0, "after": 2.0}
    assert (loaded["kept"].ci, loaded["kept"].unit, loaded["kept"].label) == (0.5, "% error", "before the crash")


@pytest.mark.parametrize("value, ci", [(0, 0), (-3, 0.0), (-1e300, 1e300), (1e-310, 5e-324), (7, None)])
def test_every_field_round_trips_with_edge_values(tmp_path, value, ci):
    """value, ci, unit and label come back exactly as given (as floats), for zero, negative, huge and subnormal
    values, a zero interval, and text with non-ASCII characters, quotes, backslashes and a newline."""
    unit, label = "µs ± \"x\"", "a\\b\nc — d"
    stored = results.record("c", "k", value, ci=ci, unit=unit, label=label, profile="cpu", directory=tmp_path)
    loaded = results.load("cpu", directory=tmp_path)["c"]["k"]
    assert loaded == stored
    assert type(loaded.value) is float and loaded.value == float(value)
    assert loaded.ci == (None if ci is None else float(ci)) and (loaded.unit, loaded.label) == (unit, label)


def test_a_record_through_a_linked_file_waits_for_a_record_in_the_linked_files_folder(tmp_path, monkeypatch):
    """Two records of the same file, one through a link to it, take turns: the lock is on the folder of the file
    replaced (the link's target), not of the link, or the slower record would write back a stale copy."""
    (tmp_path / "drive").mkdir()
    (tmp_path / "local").mkdir()
    results.record("c", "a", 1.0, profile="cpu", directory=tmp_path / "drive")
    (tmp_path / "local" / "cpu.json").symlink_to(tmp_path / "drive" / "cpu.json")

    read = results._read
    slow_thread_has_read, go_on = threading.Event(), threading.Event()

    def paused_read(path):
        stored = read(path)
        if threading.current_thread().name == "slow":
            slow_thread_has_read.set()
            go_on.wait(1.0)           # long enough for the other record, unless it (rightly) waits for the lock
        return stored

    monkeypatch.setattr(results, "_read", paused_read)
    slow = threading.Thread(target=results.record, args=("c", "slow", 2.0), name="slow",
                            kwargs={"profile": "cpu", "directory": tmp_path / "drive"})
    slow.start()
    assert slow_thread_has_read.wait(5.0)
    fast = threading.Thread(target=results.record, args=("c", "fast", 3.0),
                            kwargs={"profile": "cpu", "directory": tmp_path / "local"})
    fast.start()
    fast.join(0.5)
    go_on.set()
    slow.join()
    fast.join()
    assert set(results.load("cpu", directory=tmp_path / "drive")["c"]) == {"a", "slow", "fast"}


def test_load_gives_floats_and_refuses_names_that_record_refuses(tmp_path):
    """A hand-edited file: a JSON integer comes back as the float Result.value documents; a chapter or key that
    record() would refuse is an entry that is not a result."""
    path = tmp_path / "cpu.json"
    path.write_text('{"results": {"c": {"k": {"value": 1, "ci": 0}}}}')
    loaded = results.load("cpu", directory=tmp_path)["c"]["k"]
    assert type(loaded.value) is float and type(loaded.ci) is float and (loaded.value, loaded.ci) == (1.0, 0.0)
    for chapter, key in (("", "k"), (" c", "k"), ("c", "k ")):
        path.write_text(json.dumps({"results": {chapter: {key: {"value": 1.0}}}}))
        with pytest.raises(ValueError, match="holds an entry that is not a result .*must not start or end|non-empty"):
            results.load("cpu", directory=tmp_path)
