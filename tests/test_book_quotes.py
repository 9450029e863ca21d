"""Numbers that one chapter's prose quotes from another chapter's results or from the benchmark reports.

A chapter that is run again updates book/results/cpu.json and its own prose, but not the sentences of
other chapters (or of the closing chapter) that quote it; these tests tie such sentences to the recorded
values, read independently of the chapters' code.
"""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"


def markdown(chapter):
    cells = json.loads((BOOK / f"{chapter}.ipynb").read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


def recorded(chapter, key):
    return json.loads((BOOK / "results" / "cpu.json").read_text())["results"][chapter][key]["value"]


def report(device, benchmark, case, metric, reference=None):
    rows = json.loads((ROOT / "reports" / device / "benchmarks.json").read_text())["rows"]
    (row,) = [r for r in rows if (r["benchmark"], r["case"], r["metric"]) == (benchmark, case, metric)
              and reference in (None, r["reference"])]
    return row["ratio"]


def test_budget_chapter_quotes_the_pruning_chapters_iterative_result():
    """training_on_a_budget: 'iterative magnitude pruning keeps 93.3% with 2% of the weights, about 5,300'."""
    text = markdown("training_on_a_budget")
    assert "iterative magnitude pruning keeps 93.3% with 2% of the weights" in text
    assert round(100 - recorded("pruning", "magnitude (iterative), 98% sparse, test error"), 1) == 93.3
    assert round(0.02 * 266_200, -2) == 5_300


def test_cpu_benchmark_ratios_quoted_in_the_chapters():
    """low_rank: '0.91× in ... reports/cpu'; optimisation_based: '0.68× ... the AMD EPYC ... against 0.98×';
    looking_forward: 'CSR ... 4.0× at 5% density in the benchmark'."""
    assert "0.91× in the repository's benchmark report `reports/cpu`" in markdown("low_rank")
    assert round(report("cpu", "lowrank", "DLRT, width 512", "time per step"), 2) == 0.91
    text = markdown("optimisation_based")
    assert ("ran at 0.68× the throughput of\n`higher` on one thread of the AMD EPYC processor that made `reports/cpu`, "
            "against 0.98×") in text
    environment = json.loads((ROOT / "reports" / "cpu" / "benchmarks.json").read_text())["environment"]
    assert environment["device_name"] == "AMD EPYC"
    assert round(report("cpu", "maml", "lowlearn MAML, all tasks at once", "throughput"), 2) == 0.68
    assert round(report("cpu", "maml", "lowlearn MAML", "throughput"), 2) == 0.98
    assert "4.0× at 5% density in the benchmark" in markdown("looking_forward")
    assert round(report("cpu", "sparse", "csr, density 0.05", "speed-up"), 1) == 4.0


def test_cuda_benchmark_ratios_quoted_in_the_chapters():
    """fast_sparse, low_rank and optimisation_based quote reports/cuda (an H100 run)."""
    cuda = {case: report("cuda", b, case, m, "dense" if b == "masks" else None) for b, case, m in [
        ("sparse", "2:4 (fp16), density 0.5, 4096 features, batch 64", "speed-up"),
        ("sparse", "2:4 (fp16), density 0.5, 8192 features, batch 16384", "speed-up"),
        ("sparse", "csr, density 0.5", "speed-up"), ("sparse", "csr, density 0.01", "speed-up"),
        ("lowrank", "DLRT, width 1024, batch 4096", "time per step"),
        ("lowrank", "DLRT, width 2048, batch 4096", "time per step"),
        ("lowrank", "DLRT, width 4096, batch 4096", "time per step"),
        ("maml", "lowlearn MAML", "throughput"), ("maml", "lowlearn MAML, all tasks at once", "throughput"),
        ("masks", "lowlearn masks", "time per step"), ("powerprop", "Powerprop, SGD", "time per step"),
        ("powerprop", "Powerprop, optimiser-aware Adam", "time per step")]}
    fast = markdown("fast_sparse")
    for phrase, case, digits in [
        ("ran at 0.07× the\n  dense one", "2:4 (fp16), density 0.5, 4096 features, batch 64", 2),
        ("it ran at 1.31× dense", "2:4 (fp16), density 0.5, 8192 features, batch 16384", 2),
        ("(0.05× at 50%", "csr, density 0.5", 2), ("0.84× at 1%)", "csr, density 0.01", 2),
        ("3.85× at width 1024", "DLRT, width 1024, batch 4096", 2),
        ("1.15× at 2048", "DLRT, width 2048, batch 4096", 2), ("0.37× at 4096", "DLRT, width 4096, batch 4096", 2),
        ("(1.03×)", "lowlearn MAML", 2),
        ("**Masks** (1.16×)", "lowlearn masks", 2), ("(1.26× with SGD", "Powerprop, SGD", 2),
        ("1.55× with Adam)", "Powerprop, optimiser-aware Adam", 2),
    ]:
        assert phrase in fast, phrase
        number = float(phrase.split("×")[0].split("(")[-1].split()[-1].strip("*"))
        assert round(cuda[case], digits) == number, (phrase, cuda[case])
    steps = [report("cuda", "lowrank", f"DLRT, width {w}", "time per step") for w in (512, 1024, 2048, 4096)]
    assert "4.6× to 4.8×" in markdown("low_rank") and round(min(steps), 1) == 4.6 and round(max(steps), 1) == 4.8
    assert "against 1.03× one\ntask at a time" in markdown("optimisation_based")
    throughput = report("cuda", "maml", "lowlearn MAML, all tasks at once", "throughput")
    for chapter in ("fast_sparse", "optimisation_based"):
        assert f"{throughput:.1f}× the throughput of `higher`" in markdown(chapter), chapter


def test_cuda_graph_ratios_quoted_in_fast_sparse_are_those_of_the_committed_benchmark_output():
    """fast_sparse quotes reports/cuda/masks.txt and powerprop.txt, the H100's output of the two benchmarks."""
    def goal_ratio(name, case):
        lines = (ROOT / "reports" / "cuda" / f"{name}.txt").read_text().splitlines()
        return next(line for line in lines if line.startswith(f"goal: {case} <= ")).split(": ")[2].split()[0]

    text = markdown("fast_sparse")
    graph = ", CUDA graph"
    for phrase, name, case in [
        ("masks cost 1.069× dense", "masks", f"lowlearn masks{graph} / dense{graph}"),
        ("`torch.nn.utils.prune` (0.999×)", "masks", f"lowlearn masks{graph} / torch.nn.utils.prune{graph}"),
        ("Powerprop costs 1.153× with SGD", "powerprop", f"Powerprop, SGD{graph} / SGD{graph}"),
        ("and 1.154× with the\n  optimiser-aware Adam", "powerprop",
         f"Powerprop, optimiser-aware Adam{graph} / Adam{graph}"),
    ]:
        assert phrase in text, phrase
        assert phrase.split("×")[0].split()[-1].strip("(") == goal_ratio(name, case), phrase


@pytest.mark.parametrize("chapter, phrase, key, value", [
    ("looking_forward", "97.5 ± 0.6%", "pruned, test accuracy", 97.53),
    ("looking_forward", "96.8 ± 1.2%", "RigL, test accuracy", 96.83),
    ("dynamic_sparse_training", "reaches 88.8%, 90.9% and 90.7% with", "RigL, 95% sparse, ΔT = 100, test accuracy",
     90.73),
    ("powerprop", "averages 89.7% instead of 85.0%", "Powerprop (α = 3), PackNet average over all tasks, test accuracy",
     89.69),
    ("black_box", "ProtoNet's error is 24.8 ± 1.7%", "ProtoNet, run-like error", 24.83),
    ("low_rank", "from scratch\nreaches 93.7%", "fixed rank from scratch, ranks of ϑ = 0.2, LeNet5, test accuracy",
     93.7),
])
def test_prose_numbers_match_the_recorded_results(chapter, phrase, key, value):
    """A sample of the cpu-profile prose numbers against book/results/cpu.json (to the printed digit)."""
    assert phrase in markdown(chapter)
    assert abs(recorded(chapter, key) - value) < 0.006
