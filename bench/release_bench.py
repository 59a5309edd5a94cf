"""Failed requests, time to first response, CPU and peak memory of an activation: this checkout's tool vs today's.

    venv/bin/python -m bench.release_bench [--repeat 3] [--bake 15] [--rows a,cold,...] [--out reports/release-bench.json] [--budget 1800]

Runs as root on loopback only. Two designs (bench/release_designs.py) run in the same bench, row by
row, so the noise of a shared machine falls on both alike:
  today     cognivern-release as of commit eb6022a (bash, its Node PM2 helper, run.sh: blue/green
            slots behind nginx, the bake, the revert), with that commit's ecosystem, conf, run.sh
            and nginx site, taken from git at bench time;
  checkout  this checkout's tool (issue 23: the same activation as a stdlib Python program),
            with --bake as bakeSeconds for both.
Each design has its own temp ROOT laid out like provisioning, app user, PM2 daemon and private
nginx (tests/support), and the same fixture app (tests/fixtures/app). 8 HTTP clients do GET
/release through that nginx while a row runs; every error or non-2xx is a failed request. Rows:
  a           a good release
  a0          a good release with bakeSeconds 0: against `a`, the CPU of the bake loop
  cold        rollback to the release before, its slot stopped (keepPreviousWarm false)
  warm        rollback to the release before while its slot still runs (keepPreviousWarm true)
  crash       a release that crashes at boot
  unhealthy   a release whose /health answers 500
  c2          a release that crashes at boot only under PM2
  c3          a release that crashes at boot except in today's pre-flight (fixture mode
              crash-after-preflight): today it passes the pre-flight and fails after the switch; a
              blue/green slot start is the production start, so there it is a crash at boot
  crash-4s    a release that crashes 4 s after it listens, on every boot (crash-after)
  loop-10s    a release that lives 10 s, then crash-loops (crash-loop-after): inside the bake
  flip-4s     a release whose /health answers 500 from 4 s after it listens (health-flip); its
              other routes keep answering, so clients see no failure: only the end state differs
Per run: failed/total requests (and how many were retried once, see Load); time from the
command's start to the first response from the new release (a) or the rolled-back-to one (cold,
warm), and for the broken rows to the first response from the previous release after the last
failure or the last answer of the broken one (0: clients never saw either; "never": still not back
at the end); the command's wall time; the CPU (user + system seconds) of the command and every
process it waited for (the detached worker, its PM2 and health questions, pnpm: getrusage of the
bench's children); the peak RSS (sum over the app user's processes, and over the tool's own
processes: those whose command line names the tool, sampled every 100 ms from /proc) while it runs;
what it left: exit status and the release that answers at the end. A row whose failure comes after
the command may return (crash-4s, loop-10s, flip-4s) keeps the load on until --bake + 5 s after the
start, for both designs. The CPU of the bake loop is a's minus a0's (medians).
Also: `install` with a warm store (lockfile unchanged) vs an empty store (this checkout's tool).
Everything it starts (nginx, PM2 daemons, the app users it created, the baseline tree) is removed.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import harness
from bench.release_designs import BASELINE, BaselineTree, Design, Today
from tests.support.load import CLOSED_BEFORE_ANSWER
from tests.support.release_host import build_release_tarball

CLIENTS = 8
SETTLE = 1.0  # seconds of load before and after each measured command
BASE = "base"


@dataclass
class Load:
    """CLIENTS threads doing GET /release through nginx; every non-2xx or error is a failed request.

    A kept-alive connection that nginx closes (or resets) before any byte of the answer (it closes
    idle ones when it reloads) is retried once on a new connection, as HTTP/1.1 clients do for
    idempotent requests (RFC 9112 9.3.1; tests/support/load.py does the same); `retried` counts
    those, for both designs.
    first_seen: release -> time.monotonic() of its first good response; last_failure: when the last
    failed request was sent (None if none); events: (sent, done, good, release) of every request.
    bench/engine_bench.py derives its time-to-healthy from first_seen and last_failure.
    """

    url: str
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    served: dict[str, int] = field(default_factory=dict)
    first_seen: dict[str, float] = field(default_factory=dict)
    last_failure: float | None = None
    retried: int = 0
    events: list[tuple[float, float, bool, str | None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _client(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                good, what, release = self._get(client)
                now = time.monotonic()
                with self._lock:
                    self.events.append((sent, now, good, release))
                    if good:
                        self.ok += 1
                        self.served[str(release)] = self.served.get(str(release), 0) + 1
                        self.first_seen.setdefault(str(release), now)
                    else:
                        self.failed += 1
                        self.last_failure = sent
                        self.errors[what] = self.errors.get(what, 0) + 1
                time.sleep(0.01)

    def _get(self, client: httpx.Client) -> tuple[bool, str, str | None]:
        for attempt in (1, 2):
            try:
                r = client.get(self.url)
                good = 200 <= r.status_code < 300
                return good, f"http {r.status_code}", str(r.json().get("release", "?")) if good else None
            except CLOSED_BEFORE_ANSWER as exc:  # closed or reset before any answer: a reused connection
                if attempt == 2:
                    return False, type(exc).__name__, None
                with self._lock:
                    self.retried += 1
            except (httpx.HTTPError, ValueError) as exc:
                return False, type(exc).__name__, None
        raise AssertionError("unreachable")

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)


class RssSampler:
    """Every `interval` s, the summed VmRSS (kB) of `uid`'s processes, and of those that run the app.

    An app process is one whose command line names a release's dist/index.js (PM2's cluster
    workers, the pre-flight's included); the rest are PM2's daemon and CLI calls and the tool's helpers.
    """

    def __init__(self, uid: int, tool: Path, interval: float = 0.1) -> None:
        self.uid = uid
        self.tool = str(tool).encode()
        self.interval = interval
        self.samples: list[tuple[int, int]] = []
        self.tool_samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int, int, int]:
        total = app = tool = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                mine = entry.stat().st_uid == self.uid
                cmdline = Path(entry.path, "cmdline").read_bytes()
                if not mine and self.tool not in cmdline:
                    continue
                status = Path(entry.path, "status").read_text()
            except OSError:
                continue  # gone meanwhile
            rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
            if not mine:
                tool += rss
                continue
            total += rss
            if b"/dist/index.js" in cmdline:
                app += rss
        return total, app, tool

    def _run(self) -> None:
        while not self._stop.is_set():
            total, app, tool = self.sample()
            self.samples.append((total, app))
            self.tool_samples.append(tool)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def peak_mb(self) -> dict[str, float]:
        if not self.samples:
            return {}
        first = self.samples[0]
        top = max(self.samples)
        return {
            "before_total": round(first[0] / 1024, 1),
            "before_app": round(first[1] / 1024, 1),
            "peak_total": round(top[0] / 1024, 1),
            "peak_app": round(max(s[1] for s in self.samples) / 1024, 1),
            "peak_tool": round(max(self.tool_samples, default=0) / 1024, 1),
        }


@dataclass(frozen=True)
class Row:
    key: str
    title: str
    mode: str | None  # fixture mode of the new release; None: a rollback to BASE
    late: bool = False  # its failure may come after the command returned: keep the load on for --bake + 5 s
    no_bake: bool = False  # bakeSeconds 0 for this row


ROWS = (
    Row("a", "a good release", "ok"),
    Row("a0", "a good release, no bake", "ok", no_bake=True),
    Row("cold", "rollback, cold (slot stopped)", None),
    Row("warm", "rollback, warm (keepPreviousWarm)", None),
    Row("crash", "crashes at boot", "crash"),
    Row("unhealthy", "/health answers 500", "unhealthy"),
    Row("c2", "c2 crashes at boot only under PM2", "crash-under-pm2"),
    Row("c3", "c3 fails only after today's switch", "crash-after-preflight"),
    Row("crash-4s", "crashes 4 s after boot", "crash-after", late=True),
    Row("loop-10s", "crash loop after 10 s (in the bake)", "crash-loop-after", late=True),
    Row("flip-4s", "/health 500 from 4 s after boot", "health-flip", late=True),
)


def analyse(load: Load, start: float, new: str, target: str, broken: bool) -> dict[str, Any]:
    """Seconds from `start` to the first response of `target` (see the module doc) and who answers at the end."""
    after = [e for e in load.events if e[0] >= start]
    if broken:
        marks = [sent for sent, _, good, rel in after if not good or rel == new]
        last = max(marks, default=None)
        back = [done for sent, done, good, rel in after if good and rel == target and (last is None or sent > last)]
        first: float | None = 0.0 if last is None else (min(back) - start if back else None)
    else:
        seen = [done for _, done, good, rel in after if good and rel == target]
        first = min(seen) - start if seen else None
    answered = [e for e in after if e[2]]
    return {
        "first_response_seconds": None if first is None else round(first, 2),
        "last_failure_seconds": None if load.last_failure is None else round(load.last_failure - start, 2),
        "answers_at_end": max(answered, key=lambda e: e[1])[3] if answered else None,
    }


def measure(design: Design, row: Row, new: str, target: str, observe: float) -> dict[str, Any]:
    """Activate `new` (or roll back to BASE) under load; the figures of one run."""
    broken = row.mode not in (None, "ok")
    with Load(design.nginx.url("/release")) as load:
        time.sleep(SETTLE)
        with RssSampler(design.uid, design.host.installed_tool) as rss:
            start = time.monotonic()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            proc = design.activate(BASE if row.mode is None else new)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall = time.monotonic() - start
            time.sleep(max(SETTLE, (start + observe - time.monotonic()) if row.late else 0))
    figures = analyse(load, start, new, target, broken)
    current = design.host.current()
    expected = (proc.returncode != 0 if broken else proc.returncode == 0) and figures["answers_at_end"] == target == current
    return {
        "failed": load.failed,
        "requests": load.ok + load.failed,
        "retried": load.retried,
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3),
        **figures,
        "rss_mb": rss.peak_mb(),
        "exit": proc.returncode,
        "current": current,
        "as_designed": expected,
        "errors": load.errors,
        "served": load.served,
        "tool_tail": [line for line in proc.stderr.splitlines() if line.startswith("cognivern-release:")][-3:],
    }


def release_of(row: Row, i: int) -> str:
    """The release a row activates (a) or rolls back from (cold, warm): new<i>; a broken one and a0: <row><i>."""
    return f"new{i}" if row.mode is None or row.key == "a" else f"{row.key}{i}"


def run_row(design: Design, row: Row, i: int, observe: float) -> dict[str, Any]:
    """One row on one design. BASE serves before every row but `cold` right after `a`, and after every
    row but `a`: a rollback row first activates new<i> unmeasured unless it serves (for `warm` with
    keepPreviousWarm, so BASE's slot stays warm), and a broken release a design kept is replaced by
    BASE again (unmeasured) before the next row."""
    new = release_of(row, i)
    design.keep_previous_warm(row.key == "warm")
    design.host.set_conf(BAKE_SECONDS="0" if row.no_bake else str(design.bake))
    if row.mode is None and design.host.current() != new and design.activate(new).returncode != 0:
        raise RuntimeError(f"{design.label}: activating {new} failed before the {row.key} rollback")
    result = measure(design, row, new, new if row.mode == "ok" else BASE, observe)
    result["reset_to_base"] = row.key != "a" and (design.host.current() != BASE or result["answers_at_end"] != BASE)
    design.host.set_conf(BAKE_SECONDS=str(design.bake))
    if result["reset_to_base"] and design.activate(BASE).returncode != 0:
        raise RuntimeError(f"{design.label}: could not bring {BASE} back after {row.key} #{i}")
    return result


def outcome(runs: list[dict[str, Any]], new_label: str) -> str:
    """The most common end state of a row's runs: exit status and who answers at the end."""

    def one(r: dict[str, Any]) -> str:
        end = r["answers_at_end"]
        who = "base" if end == BASE else ("nothing" if end is None else new_label)
        return f"exit {r['exit']}, {who} answers" + ("" if r["as_designed"] else " (!)")

    common, n = Counter(one(r) for r in runs).most_common(1)[0]
    return common if n == len(runs) else f"{common} ({n}/{len(runs)})"


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    firsts = [r["first_response_seconds"] for r in runs]
    return {
        "runs": len(runs),
        "median_failed": harness.median(r["failed"] for r in runs),
        "median_requests": harness.median(r["requests"] for r in runs),
        "median_retried": harness.median(r["retried"] for r in runs),
        "median_first_response_seconds": harness.median(firsts) if None not in firsts else None,
        "median_wall_seconds": harness.median(r["wall_seconds"] for r in runs),
        "median_cpu_seconds": harness.median(r["cpu_seconds"] for r in runs),
        "median_peak_tool_rss_mb": harness.median(r["rss_mb"].get("peak_tool") for r in runs),
        "median_peak_rss_mb": harness.median(r["rss_mb"].get("peak_total") for r in runs),
        "median_peak_app_rss_mb": harness.median(r["rss_mb"].get("peak_app") for r in runs),
        "all_as_designed": all(r["as_designed"] for r in runs),
    }


def table_rows(designs: list[Design], results: dict[str, dict[str, list[dict[str, Any]]]]) -> list[list[str]]:
    rows = []
    for row in ROWS:
        for n, d in enumerate(designs):
            runs = results[d.key][row.key]
            if not runs:
                continue
            s = summarise(runs)
            first = "never" if s["median_first_response_seconds"] is None else harness.fmt(s["median_first_response_seconds"], " s", 2)
            rows.append(
                [
                    row.title if n == 0 else "",
                    d.label,
                    f"{harness.fmt(s['median_failed'], digits=0)} / {harness.fmt(s['median_requests'], digits=0)}"
                    + (f" ({s['median_retried']:.0f} retried)" if s["median_retried"] else ""),
                    first,
                    harness.fmt(s["median_wall_seconds"], " s"),
                    harness.fmt(s["median_cpu_seconds"], " s", 2),
                    harness.fmt(s["median_peak_tool_rss_mb"], digits=0),
                    f"{harness.fmt(s['median_peak_rss_mb'], digits=0)} ({harness.fmt(s['median_peak_app_rss_mb'], digits=0)})",
                    outcome(runs, "new" if row.mode in (None, "ok") else "broken"),
                ]
            )
    return rows


def timed_installs(design: Design, work: Path, repeat: int, budget: harness.Budget) -> dict[str, list[float]]:
    """`install` seconds with the store warm (same lockfile), then with it emptied (no load)."""
    host = design.host
    out: dict[str, list[float]] = {"warm": [], "fresh": []}

    def timed(rid: str) -> float:
        tarball, sha = build_release_tarball(work, rid)
        incoming = host.upload(tarball)
        start = time.monotonic()
        host.ok("install", rid, str(incoming), sha)
        return round(time.monotonic() - start, 2)

    for i in range(repeat):
        budget.check()
        out["warm"].append(timed(f"warm{i}"))
        shutil.rmtree(host.root / "cache" / "build" / "work" / "store", ignore_errors=True)  # the build account's
        shutil.rmtree(Path(os.path.expanduser(f"~{design.user}")) / ".cache" / "pnpm", ignore_errors=True)
        out["fresh"].append(timed(f"fresh{i}"))
        budget.say(f"install #{i}: warm {out['warm'][-1]} s, empty store {out['fresh'][-1]} s")
    return out


def bake_loop_cpu(designs: list[Design], results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, float]:
    """Per design: median CPU of an activation with the bake minus one without (rows a and a0)."""
    out = {}
    for d in designs:
        with_bake = harness.median(r["cpu_seconds"] for r in results.get(d.key, {}).get("a", []))
        without = harness.median(r["cpu_seconds"] for r in results.get(d.key, {}).get("a0", []))
        if with_bake is not None and without is not None:
            out[d.key] = round(with_bake - without, 3)
    return out


def designs_for(bake: int, tree: BaselineTree) -> list[Design]:
    config = {"healthTimeout": "15", "bakeSeconds": str(bake)}
    designs = [Today(config, tree), Design(config)]
    for d in designs:
        d.bake = bake
    return designs


def main(argv: list[str] | None = None) -> int:
    def extra(p: Any) -> None:
        p.add_argument("--bake", type=int, default=15, help="bakeSeconds of the blue/green design (long enough for loop-10s)")
        p.add_argument("--rows", default=",".join(r.key for r in ROWS), help="the rows to run, comma-separated (default: all)")

    args, budget = harness.start(__doc__, "release-bench", budget=1800, extra=extra, argv=argv)
    rows = [r for r in ROWS if r.key in args.rows.split(",")]
    if {r.key for r in rows} != set(args.rows.split(",")):
        raise SystemExit(f"--rows: choose from {', '.join(r.key for r in ROWS)}")
    observe = args.bake + 5.0
    work = Path(tempfile.mkdtemp(prefix="cgv-release-bench-"))
    tree = BaselineTree()
    designs: list[Design] = []
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    installs: dict[str, list[float]] = {}
    complete, error = True, ""
    try:
        designs = designs_for(args.bake, tree)
        results = {d.key: {r.key: [] for r in ROWS} for d in designs}
        tarballs: dict[str, tuple[Path, str]] = {}

        def install(d: Design, rid: str, mode: str) -> None:  # once per design and release
            if rid not in tarballs:
                tarballs[rid] = build_release_tarball(work, rid, mode)
            if not (d.host.root / "releases" / rid).exists():
                d.host.install(rid, *tarballs[rid])

        for d in designs:
            d.start()
            install(d, BASE, "ok")
            if d.activate(BASE).returncode != 0:
                raise RuntimeError(f"{d.label}: the base release did not start")
            budget.say(f"{d.label}: nginx :{d.nginx.port} -> app :{d.host.port}, user {d.user}; base release live")
        for i in range(args.repeat):
            for row in rows:
                if budget.exceeded():
                    complete = False
                    break
                for d in designs:
                    install(d, release_of(row, i), row.mode or "ok")
                    r = run_row(d, row, i, observe)
                    results[d.key][row.key].append(r)
                    budget.say(f"{d.key} {row.key} #{i}: { ({k: v for k, v in r.items() if k not in ('served', 'tool_tail')}) }")
        if complete:
            installs = timed_installs(designs[-1], work, args.repeat, budget)
    except Exception as exc:  # a run that dies (budget, a host fault) still reports what it measured
        complete, error = False, f"{type(exc).__name__}: {exc}"
        budget.say(f"stopped: {error}")
    finally:
        for d in designs:
            d.stop()
        tree.cleanup()
        shutil.rmtree(work, ignore_errors=True)

    report = {
        "clients": CLIENTS,
        "repeat": args.repeat,
        "bake_seconds": args.bake,
        "observe_seconds_late_rows": observe,
        "baseline_commit": BASELINE,
        "complete": complete,
        "error": error,
        "designs": {d.key: d.describe() for d in designs},
        "summary": {k: {row: summarise(runs) for row, runs in rows.items() if runs} for k, rows in results.items()},
        "install_median_seconds": {k: harness.median(v) for k, v in installs.items()},
        "runs": results,
        "installs": installs,
        "wall_seconds": round(budget.elapsed(), 1),
    }
    harness.print_table(
        ["row", "design", "failed / total", "first response", "wall", "CPU", "tool RSS MB", "app user RSS MB (app)", "end state"],
        table_rows(designs, results),
        title=f"Release benchmark: {CLIENTS} clients through nginx, medians of {args.repeat} runs, bake {args.bake} s"
        + ("" if complete else " (INCOMPLETE: stopped early, see the end)"),
    )
    if installs:
        harness.print_table(
            ["install (this checkout's tool)", "seconds"],
            [
                ["warm store (same lockfile)", harness.fmt(report["install_median_seconds"]["warm"], " s")],
                ["empty store", harness.fmt(report["install_median_seconds"]["fresh"], " s")],
            ],
        )
    bake_cpu = bake_loop_cpu(designs, results)
    if bake_cpu:
        harness.print_table(
            ["design", f"CPU of the {args.bake} s bake loop (a - a0)"],
            [[d.label, harness.fmt(bake_cpu.get(d.key), " s", 2)] for d in designs],
        )
    report["bake_loop_cpu_seconds"] = bake_cpu
    harness.write_json(args.out, report)
    print(f"(wall time {report['wall_seconds']} s)" + (f"\nstopped early: {error}" if error else ""))
    return 1 if error and not error.startswith("BudgetExceededError") else 0


if __name__ == "__main__":
    raise SystemExit(main())
