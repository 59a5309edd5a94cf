"""The parallel schedule of `make test` (tests/support/parallel.py), on a small suite in pytester.

A module runs whole on one worker in the seeded order; test_release_tool is split into two units
by position in that order; the slowest units start first. Run alone: venv/bin/pytest tests/test_parallel.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["pytester"]

RECORDER = """
import json, os, time

def record(request, worker_id):
    with open(os.environ["PARALLEL_LOG"], "a") as f:
        f.write(json.dumps({"id": request.node.nodeid, "worker": worker_id, "at": time.monotonic()}) + "\\n")
"""
SEED = "1234"


@pytest.fixture
def suite(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Six tests in a module named like the split one, three in each of two others."""
    pytester.makeconftest(
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\nfrom tests.support import parallel\n\n"
        "def pytest_configure(config):\n    parallel.register(config)\n"
    )
    pytester.makepyfile(recorder=RECORDER)
    test = "from recorder import record\n\ndef test_{n}(request, worker_id):\n    record(request, worker_id)\n"
    pytester.makepyfile(
        test_release_tool="\n\n".join(test.format(n=n) for n in range(6)),
        test_a="\n\n".join(test.format(n=n) for n in range(3)),
        test_b="\n\n".join(test.format(n=n) for n in range(3)),
    )
    log = tmp_path / "parallel.jsonl"
    monkeypatch.setenv("PARALLEL_LOG", str(log))
    return log


def test_modules_stay_whole_and_the_split_module_alternates_in_seeded_order(pytester: pytest.Pytester, suite: Path) -> None:
    common = ("-p", "randomly", f"--randomly-seed={SEED}", "-p", "no:cacheprovider")
    seeded = pytester.runpytest_subprocess(*common, "--collect-only", "-q")
    order = [line for line in seeded.outlines if "::test_" in line]
    assert len(order) == 12, seeded.outlines
    result = pytester.runpytest_subprocess(*common, "-n", "2", "--dist", "loadfile")
    result.assert_outcomes(passed=12)
    runs = [json.loads(line) for line in suite.read_text().splitlines()]
    assert sorted(r["id"] for r in runs) == sorted(order), "every test ran once"
    by_worker: dict[str, list[str]] = {}
    for run in sorted(runs, key=lambda r: r["at"]):
        by_worker.setdefault(run["worker"], []).append(run["id"])

    def in_module(module: str) -> list[str]:
        return [t for t in order if t.startswith(f"{module}.py::")]

    split = in_module("test_release_tool")
    # a unit runs on one worker in the seeded order; the k-th split test is in unit k mod 2
    for unit in (split[0::2], split[1::2], in_module("test_a"), in_module("test_b")):
        workers = [w for w, ids in by_worker.items() if set(unit) & set(ids)]
        assert len(workers) == 1, (unit, by_worker)
        assert [t for t in by_worker[workers[0]] if t in unit] == unit, (unit, by_worker)
    # the slowest units (the split module's two) are queued first: each worker starts with one
    assert all(ids[0] in split for ids in by_worker.values()) and len(by_worker) == 2, by_worker
