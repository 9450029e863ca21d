"""``python -m lowlearn.eval TASK [options]``: run one evaluation (see :mod:`lowlearn.eval`)."""

import sys

from lowlearn.cli import subcommand

from . import omniglot_runs

TASKS = {"omniglot-runs": omniglot_runs.main}


USAGE = (f"usage: python -m lowlearn.eval TASK [options], with TASK one of: {', '.join(TASKS)} "
         "(TASK --help for its options)")


def main(argv: list[str]) -> None:
    task = subcommand(TASKS, argv, USAGE, "task")
    if task is not None:
        task()


if __name__ == "__main__":
    main(sys.argv[1:])
