"""``python -m lowlearn.eval TASK [options]``: run one evaluation (see :mod:`lowlearn.eval`)."""

import sys

from . import omniglot_runs

TASKS = {"omniglot-runs": omniglot_runs.main}


USAGE = (f"usage: python -m lowlearn.eval TASK [options], with TASK one of: {', '.join(TASKS)} "
         "(TASK --help for its options)")


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    if not argv:
        sys.exit(USAGE)
    if argv[0] not in TASKS:
        sys.exit(f"unknown task {argv[0]!r}\n{USAGE}")
    TASKS[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
