"""``python -m lowlearn.bench NAME [options]``: run one benchmark (see :mod:`lowlearn.bench`)."""

import sys

from lowlearn.allocator import retain_freed_memory
from lowlearn.cli import subcommand

from . import allocator, dst, lowrank, maml, masks, powerprop, report, sparse

BENCHMARKS = {"masks": masks.main, "dst": dst.main, "powerprop": powerprop.main, "allocator": allocator.main,
              "lowrank": lowrank.main, "maml": maml.main, "sparse": sparse.main, "all": report.main}


USAGE = (f"usage: python -m lowlearn.bench NAME [options], with NAME one of: {', '.join(BENCHMARKS)}\n"
         "(python -m lowlearn.bench NAME --help lists a benchmark's options)")


def main(argv: list[str]) -> None:
    benchmark = subcommand(BENCHMARKS, argv, USAGE, "benchmark")
    if benchmark is not None:
        retain_freed_memory()     # the cases share this process: see lowlearn.bench (allocator's workers are their own)
        benchmark()


if __name__ == "__main__":
    main(sys.argv[1:])
