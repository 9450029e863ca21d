"""lowlearn.results: float round trips, corrupted files, and what a record stores."""

import json
import struct

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


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00garbage", b"null", b"[1, 2]", b'{"results": null}',
                                     b'{"results": {"c": {"k": [1, 2]}}}', b'{"results": {"c": {"k": 0.5}}}',
                                     b'{"results": {"c": {"k": {"value": Infinity}}}}'],
                         ids=["empty", "not-utf8", "null", "list", "results-null", "entry-list", "entry-number",
                              "infinite"])
def test_a_corrupted_file_is_a_clear_error_and_stays_as_it_was(tmp_path, content):
    """Every kind of damage gives the ValueError that names the file and says to move it away; no bytes change."""
    path = tmp_path / "cpu.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"cpu\.json.*(?i:move it away)"):
        results.load("cpu", directory=tmp_path)
    assert path.read_bytes() == content


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00garbage", b"null", b"[1, 2]", b'{"results": null}'],
                         ids=["empty", "not-utf8", "null", "list", "results-null"])
def test_recording_into_a_corrupted_file_changes_nothing(tmp_path, content):
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
