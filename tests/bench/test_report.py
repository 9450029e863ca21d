import json

import pytest

from lowlearn.allocator import has_glibc
from lowlearn.bench import report


def test_the_quick_report_has_every_benchmark_and_the_fields_the_book_reads(tmp_path, capsys):
    report.main(["--quick", "--out", str(tmp_path), "--device", "cpu", "--note", "a toy run"])
    data = json.loads((tmp_path / "benchmarks.json").read_text())
    assert data["quick"] is True and data["note"] == "a toy run"
    fields = {"device", "device_name", "lowlearn", "torch", "python", "threads", "allocator"}
    assert fields <= data["environment"].keys()
    assert f"lowlearn {data['environment']['lowlearn']}, torch" in (tmp_path / "benchmarks.md").read_text()
    expected = {"masks", "dst", "powerprop", "lowrank", "maml", "sparse"} | ({"allocator"} if has_glibc() else set())
    assert {row["benchmark"] for row in data["rows"]} == expected
    for row in data["rows"]:
        assert set(report.FIELDS) <= row.keys() and row["ratio"] > 0
        assert row["met"] is None                                    # toy sizes: no goal is judged
        # Every ratio of times taken in the same rounds has its spread; memory is measured once, and the
        # allocator benchmark times its settings in separate processes.
        if row["benchmark"] != "allocator" and "memory" not in row["metric"]:
            low, high = row["spread"]
            assert low <= row["ratio"] <= high
        else:
            assert row["spread"] is None
    csr = next(row for row in data["rows"] if row["case"] == "csr, density 0.05")
    assert csr["goal"] == ">= 3" and csr["ideal"] == pytest.approx(4096 / 205)   # 64² weights, 205 of them kept
    table = (tmp_path / "benchmarks.md").read_text()
    assert "Note: a toy run" in table and f"Allocator: {data['environment']['allocator']}." in table
    assert table.count("not judged (quick sizes)") == sum(row["goal"] is not None for row in data["rows"]) > 0
    assert table.count("\n| ") == len(data["rows"]) + 1 and table in capsys.readouterr().out


def test_an_existing_report_is_never_overwritten(tmp_path):
    (tmp_path / "benchmarks.md").write_text("mine")
    with pytest.raises(SystemExit, match="never overwritten"):
        report.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "benchmarks.md").read_text() == "mine"
