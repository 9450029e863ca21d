import argparse
import subprocess
import sys

import pytest
import torch

from lowlearn import allocator as system_allocator
from lowlearn import cli
from lowlearn.bench import allocator, dst, lowrank, maml, masks, powerprop, report, sparse
from lowlearn.train import seed_everything


def test_argument_types_take_good_values_and_explain_bad_ones():
    assert cli.positive_int("3") == 3 and cli.natural_int("0") == 0
    assert cli.fraction("1") == 1.0 and cli.fractions("0.5,0.1") == (0.5, 0.1) and cli.positive_number("0.4") == 0.4
    assert cli.device("cpu") == torch.device("cpu")
    assert cli.seed("0") == 0 and cli.seed(str(2**63 - 1)) == 2**63 - 1
    seed_everything(cli.seed(str(2**63 - 1)))              # the largest seed that every generator takes
    for parse, text, message in ((cli.positive_int, "0", ">= 1"), (cli.positive_int, "2.5", "an integer"),
                                 (cli.natural_int, "-1", ">= 0"), (cli.fraction, "0", r"\(0, 1\]"),
                                 (cli.fraction, "x", r"\(0, 1\]"), (cli.fractions, "0.5,1.5", r"\(0, 1\]"),
                                 (cli.device, "foo", "unknown device"), (cli.int_at_least(2), "1", ">= 2"),
                                 (cli.device, "meta", "not a device lowlearn runs on"),
                                 (cli.device, "cpu:3", "not a device lowlearn runs on"),
                                 (cli.positive_number, "0", "> 0"), (cli.positive_number, "nan", "finite"),
                                 (cli.positive_number, "inf", "finite"), (cli.positive_number, "x", "> 0"),
                                 (cli.seed, "-1", ">= 0"), (cli.seed, str(2**63), "below 2\\*\\*63"),
                                 (cli.positive_number, "-1", "> 0"), (cli.fraction, "nan", r"\(0, 1\]"),
                                 (cli.fractions, "0.5,nan", r"\(0, 1\]"),
                                 (cli.positive_number, "1e-400", "got 1e-400, which a float rounds to 0.0"),
                                 (cli.positive_number, "9" * 400, "got 9{20}[.][.][.], which a float rounds to inf"),
                                 (cli.fraction, " 1e-999", "got 1e-999, which a float rounds to 0.0")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)
    if not torch.cuda.is_available():
        with pytest.raises(argparse.ArgumentTypeError, match="CUDA is not available"):
            cli.device("cuda")


@pytest.mark.parametrize("main, options, message", [
    (masks.main, ["--iterations", "0"], "argument --iterations: expected an integer >= 1"),
    (masks.main, ["--repeats", "-2"], "argument --repeats: expected an integer >= 1"),
    (masks.main, ["--density", "0"], r"argument --density: expected a number in (0, 1]"),
    (masks.main, ["--device", "foo"], "argument --device: unknown device"),
    (sparse.main, ["--densities", "0.5,x"], "argument --densities"),
    (powerprop.main, ["--alpha", "0.5"], "--alpha: alpha must be a finite number >= 1"),
    (maml.main, ["--inner-lr", "nan"], "argument --inner-lr: expected a finite number > 0"),
    (lowrank.main, ["--widths", "16", "--rank", "32"], "--rank 32 is above the width 16"),
    (lowrank.main, ["--tol", "1"], "--tol: the relative tolerance ϑ must be in [0, 1)"),
    (dst.main, ["--density", "0.9", "--repeats", "1", "--every", "2"], "--density 0.9: SNFS at density 0.9"),
])
def test_benchmarks_refuse_bad_options_before_timing_anything(main, options, message, capsys):
    with pytest.raises(SystemExit):
        main(options)
    assert message in capsys.readouterr().err


def test_the_report_folder_is_checked_before_the_benchmarks_run(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "collect", lambda sizes, device: pytest.fail("the benchmarks ran"))
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    with pytest.raises(SystemExit, match="cannot use .*notes.txt as the report folder"):
        report.main(["--out", str(taken), "--device", "cpu"])
    assert taken.read_text() == "mine"


def test_a_report_file_that_appears_while_the_benchmarks_run_is_kept(tmp_path, monkeypatch, capsys):
    out = tmp_path / "reports"

    def collect(sizes, device):
        out.mkdir(exist_ok=True)
        (out / "benchmarks.md").write_text("the user's own report")
        return []

    monkeypatch.setattr(report, "collect", collect)
    with pytest.raises(SystemExit, match="benchmarks.md"):
        report.main(["--out", str(out), "--device", "cpu", "--quick"])
    assert (out / "benchmarks.md").read_text() == "the user's own report"


def test_the_allocator_benchmark_without_glibc_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setattr(system_allocator, "has_glibc", lambda: False)
    with pytest.raises(SystemExit):
        allocator.main([])
    assert "it needs Linux with glibc" in capsys.readouterr().err


def test_a_missing_peer_ends_the_report_before_any_benchmark_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "higher", None)                  # import higher fails, as where it is missing
    monkeypatch.setattr(report, "collect", lambda sizes, device: pytest.fail("the benchmarks ran"))
    with pytest.raises(SystemExit, match="pip install higher"):
        report.main(["--out", str(tmp_path / "reports"), "--device", "cpu", "--quick"])


@pytest.mark.skipif(not system_allocator.has_glibc(), reason="the allocator's settings are glibc's")
def test_the_benchmarks_run_with_freed_memory_retained():
    # The cases of a benchmark share a process; glibc's adaptive thresholds would let one decide another's faults.
    done = subprocess.run([sys.executable, "-m", "lowlearn.bench", "masks", "--iterations", "1", "--repeats", "1",
                           "--device", "cpu"], capture_output=True, text=True, check=True)
    assert "allocator glibc, freed memory retained" in done.stdout.splitlines()[0]


def test_subcommand_binds_the_named_command_to_the_rest_of_the_command_line(capsys):
    calls = []
    commands = {"one": lambda argv: calls.append(("one", argv)), "two": lambda argv: calls.append(("two", argv))}
    cli.subcommand(commands, ["two", "--x", "1"], "usage: NAME", "thing")()
    assert calls == [("two", ["--x", "1"])]
    for help_ in ("-h", "--help"):
        assert cli.subcommand(commands, [help_, "one"], "usage: NAME", "thing") is None
        assert capsys.readouterr().out == "usage: NAME\n"
    with pytest.raises(SystemExit, match="^usage: NAME$"):
        cli.subcommand(commands, [], "usage: NAME", "thing")
    with pytest.raises(SystemExit, match="^'three' is not a thing\nusage: NAME$"):
        cli.subcommand(commands, ["three"], "usage: NAME", "thing")
    assert calls == [("two", ["--x", "1"])]                  # nothing else ran


@pytest.mark.parametrize("kind", [cli.positive_int, cli.natural_int, cli.seed, cli.int_at_least(2)])
def test_integers_are_read_in_decimal_only(kind):
    """Command-line integers are decimal (Python's int(text), base 10): "010" is ten, and "0x10" or "0b11" are
    refused rather than read as 16 or 3."""
    assert kind("010") == 10 and kind("12") == 12
    for text in ("0x10", "0b11", "0o7"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected an integer"):
            kind(text)
