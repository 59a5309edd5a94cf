"""The benches' shared harness (bench/harness.py) and how release_bench turns a request log into its figures.

The benches themselves run for minutes as root (`make bench`); what they report is only as good as
these pieces: the common options, the budget, medians over missing values, and the definition of
"first response" and "who answers at the end" (bench/release_bench.py's docstring).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import harness
from bench.release_bench import Load, analyse


def test_common_options_with_an_older_spelling_and_defaults() -> None:
    args, budget = harness.start("doc", "some-bench", repeat=16, alias="--reloads", budget=900, argv=["--reloads", "4"])
    assert (args.repeat, args.out, args.budget, budget.seconds) == (4, Path("reports/some-bench.json"), 900, 900)
    args, _ = harness.start("doc", "some-bench", argv=["--repeat", "2", "--out", "x.json", "--max-seconds", "30"])
    assert (args.repeat, args.out, args.budget) == (2, Path("x.json"), 30)


@pytest.mark.parametrize("argv", [["--repeat", "0"], ["--budget", "0"], ["--reloads", "3"]])
def test_bad_options_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        harness.start("doc", "some-bench", argv=argv)


def test_budget_raises_only_once_spent() -> None:
    harness.Budget(3600, "b").check()
    spent = harness.Budget(0, "b")
    assert spent.exceeded()
    with pytest.raises(harness.BudgetExceededError, match="--budget 0"):
        spent.check()


def test_median_skips_missing_values() -> None:
    assert harness.median([3, None, 1, 2]) == 2
    assert harness.median([None]) is None
    assert harness.fmt(None) == "-"
    assert harness.fmt(1.234, " s", 2) == "1.23 s"


def test_table_columns_line_up(capsys: pytest.CaptureFixture[str]) -> None:
    harness.print_table(["row", "n"], [["a long name", "1"], ["b", "1234"]], align="<>")
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["row         |    n", "------------+-----", "a long name |    1", "b           | 1234"]


def _load(*events: tuple[float, bool, str | None]) -> Load:
    """A Load that saw these (sent, good, release) requests, each answered 0.1 s after it was sent."""
    load = Load("http://unused")
    for sent, good, release in events:
        load.events.append((sent, sent + 0.1, good, release))
        if not good:
            load.last_failure = sent
    return load


def test_a_good_release_counts_from_its_first_answer() -> None:
    load = _load((9.0, True, "base"), (10.5, True, "base"), (11.0, True, "new"), (12.0, True, "new"))
    figures = analyse(load, start=10.0, new="new", target="new", broken=False)
    assert figures == {"first_response_seconds": 1.1, "last_failure_seconds": None, "answers_at_end": "new"}


def test_a_broken_release_counts_until_the_previous_answers_after_the_last_failure_or_broken_answer() -> None:
    load = _load((10.2, True, "base"), (11.0, False, None), (12.0, True, "bad"), (12.5, True, "base"), (13.0, True, "base"))
    figures = analyse(load, start=10.0, new="bad", target="base", broken=True)
    assert figures == {"first_response_seconds": 2.6, "last_failure_seconds": 1.0, "answers_at_end": "base"}


def test_a_broken_release_nobody_saw_costs_nothing_and_one_still_answering_never_recovers() -> None:
    unseen = _load((10.5, True, "base"), (11.0, True, "base"))
    assert analyse(unseen, start=10.0, new="bad", target="base", broken=True)["first_response_seconds"] == 0.0
    kept = _load((10.5, True, "base"), (11.0, False, None), (12.0, True, "bad"))
    figures = analyse(kept, start=10.0, new="bad", target="base", broken=True)
    assert (figures["first_response_seconds"], figures["answers_at_end"]) == (None, "bad")
