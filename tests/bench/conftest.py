import re

import pytest

from lowlearn.bench import timing


@pytest.fixture
def judged_as_printed():
    """Check a goal line ``goal: ...: R (middle half L-H), WORDS``: its words are the verdict of R, L and H."""

    def check(line: str, goal: float, higher_is_better: bool = False) -> None:
        match = re.fullmatch(r"goal: .*: (\S+) \(middle half (\S+)-(\S+)\), (.+)", line)
        assert match, line
        ratio, low, high = map(float, match.groups()[:3])
        expected = timing.verdict(ratio, (low, high), goal, higher_is_better)
        assert match.group(4) == timing.VERDICT_WORDS[expected], line

    return check
