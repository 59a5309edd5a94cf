"""What every bench shares: its command line, a time budget, medians, the printed table and the JSON report.

    args, budget = harness.start(__doc__, "engine-bench")  # --out defaults to reports/engine-bench.json
    for i in range(args.repeat):
        budget.check()                      # raises BudgetExceededError once --budget seconds have gone
        ...
        budget.say(f"run #{i}: ...")        # progress on stderr, with the elapsed time
    harness.print_table(["scenario", "seconds"], rows)
    harness.write_json(args.out, report)

Every bench takes --repeat (runs per measured case; medians are quoted), --out (the JSON report,
reports/<name>.json by default) and --budget (seconds; a bench past it stops, cleans up what it
started and says so). A bench may add its own options through `extra`, and keep an older spelling
of --repeat as `alias`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any


class BudgetExceededError(TimeoutError):
    """The bench ran past --budget: it stops measuring (and cleans up) instead of running on."""


class Budget:
    """Wall-time budget of one bench run, started when the bench starts."""

    def __init__(self, seconds: float, name: str) -> None:
        self.seconds = seconds
        self.name = name
        self.began = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def exceeded(self) -> bool:
        return self.left() <= 0

    def check(self) -> None:
        if self.exceeded():
            raise BudgetExceededError(f"{self.name} exceeded --budget {self.seconds:g} s")

    def say(self, msg: str) -> None:
        print(f"[{self.name} {self.elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)


def start(
    doc: str | None,
    name: str,
    *,
    repeat: int = 3,
    alias: str | None = None,
    budget: float = 1200,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
) -> tuple[argparse.Namespace, Budget]:
    """Parse the common options (plus `extra`'s) and start the budget clock."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    names = ["--repeat", *([alias] if alias else [])]
    parser.add_argument(*names, dest="repeat", type=int, default=repeat, help=f"runs per measured case, medians quoted (default {repeat})")
    out = f"reports/{name}.json"
    parser.add_argument("--out", type=Path, default=Path(out), help=f"JSON report (default {out})")
    parser.add_argument(
        "--budget",
        "--max-seconds",
        dest="budget",
        type=float,
        default=budget,
        help=f"stop (and clean up) after this many seconds (default {budget:g})",
    )
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.budget <= 0:
        parser.error("--budget must be > 0")
    return args, Budget(args.budget, name)


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that exist; None when there is none."""
    present = [float(v) for v in values if v is not None]
    return float(statistics.median(present)) if present else None


def fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    """A figure for a table cell: `-` when missing."""
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, title: str = "", align: str = "") -> None:
    """A plain-text table on stdout; `align` has one `<` or `>` per column (default: all left)."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    aligns = align or "<" * len(headers)

    def line(cells: Sequence[str]) -> str:
        return " | ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, aligns, widths, strict=True)).rstrip()

    if title:
        print(f"\n{title}")
    print(line(headers))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write the report (creating reports/ if needed) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nJSON: {path}")
