"""Where a real `pulumi up` spends its seconds, phase by phase, beside the release tool run directly.

    venv/bin/python -m bench.engine_phases [--repeat 3] [--out reports/engine-phases.json] [--budget 1500]

Root, loopback only. One TargetHost (private sshd and nginx, temp ROOT, unique app user) deployed by
the real engine (tests/support/real_engine.py: the CLI, the Python language host and
pulumi-resource-command, `scripts/pulumi-local`), the fixture app, `bakeSeconds: 0`, and 8 clients
on /release through nginx for every row. Rows, each --repeat times (medians quoted):

  noop            `pulumi up --skip-preview` with no change
  noop+preview    `pulumi up` with its preview (what `make deploy` runs, answered yes)
  deploy          a new release: upload, install, activate (its slot starts cold)
  rollback        back to the release before it, by config: install answers "already", activate starts it cold
  tool-deploy     the same as deploy, by the release tool over plain OpenSSH (the tarball copied to
                  incoming/ first, not timed): `install` then `activate`, one session each
  tool-rollback   the same as rollback, by the tool: `activate`

The engine rows are broken down by the engine's own OpenTelemetry spans (`pulumi up --otel-traces
file://...`, CLI 3.274.1):
  wall       the CLI's `pulumi` span (process start to exit)
  toolchain  LanguageRuntime About + GetRequiredPackages: the language host's Python checks (python
             and pip run in the venv) before the program starts
  program    run-program: the Python program, from its start to its last registration and exit
  preview    the first of two `pulumi-plan` spans (only in noop+preview)
  plugins    newPlugin: starting the language host and pulumi-resource-command
  steps      the ResourceProvider Create/Update spans: what ran over SSH, one dial and one session each
  first      from the run's start to the first answer from the target release, as the clients saw it
  failed     failed requests of the 8 clients during the row
`ssh dial` is the median of 5 `ssh HOST true` (OpenSSH, the key exchange pulumi-command's Go client
negotiates): what one step pays before its command runs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import harness
from bench.harness import median
from components.settings import SECRET_KEYS
from tests.support.load import Load
from tests.support.real_engine import RunReport
from tests.support.stack import TargetStack
from tests.support.target_host import TargetHost

ENGINE_ROWS = ("noop", "noop+preview", "deploy", "rollback")
TOOL_ROWS = ("tool-deploy", "tool-rollback")
PHASES = ("wall", "toolchain", "program", "preview", "plugins", "steps", "first")


def spans(path: Path) -> list[tuple[str, str, float, float]]:
    """(service, name, start, end) of every span in an OTLP JSON-lines trace file, seconds from the first."""
    found: list[tuple[str, str, int, int]] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        for resource in json.loads(line)["resourceSpans"]:
            service = next(a["value"]["stringValue"] for a in resource["resource"]["attributes"] if a["key"] == "service.name")
            for scope in resource["scopeSpans"]:
                for span in scope["spans"]:
                    found.append((service, span["name"], int(span["startTimeUnixNano"]), int(span["endTimeUnixNano"])))
    origin = min(start for _, _, start, _ in found)
    return [(svc, name, (start - origin) / 1e9, (end - origin) / 1e9) for svc, name, start, end in found]


def phases(path: Path) -> dict[str, float]:
    """The breakdown of one engine run (see the module docstring), from the CLI's side of each span."""
    total: dict[str, float] = defaultdict(float)
    plans: list[float] = []
    for service, name, start, end in spans(path):
        if service != "pulumi-cli":
            continue
        seconds = end - start
        if name == "pulumi":
            total["wall"] = seconds
        elif name in ("pulumirpc.LanguageRuntime/About", "pulumirpc.LanguageRuntime/GetRequiredPackages"):
            total["toolchain"] += seconds
        elif name == "run-program":
            total["program"] += seconds
        elif name == "newPlugin":
            total["plugins"] += seconds
        elif name in ("pulumirpc.ResourceProvider/Create", "pulumirpc.ResourceProvider/Update"):
            total["steps"] += seconds
        elif name == "pulumi-plan":
            plans.append(seconds)
    if len(plans) == 2:
        total["preview"] = plans[0]
    return dict(total)


@dataclass
class Row:
    runs: list[dict[str, Any]] = field(default_factory=list)

    def median(self, key: str) -> float | None:
        return median(r.get(key) for r in self.runs)


class Bench:
    def __init__(self, host: TargetHost, stack: TargetStack, work: Path) -> None:
        self.host, self.stack, self.work = host, stack, work
        self.rows: dict[str, Row] = {name: Row() for name in (*ENGINE_ROWS, *TOOL_ROWS)}
        self._traces = 0

    @contextmanager
    def clients(self) -> Iterator[Load]:
        with Load([self.host.nginx.url("/release")], clients=8) as load:
            yield load

    def engine(self, row: str, release: str | None, artifact: str | None, preview: bool = False) -> None:
        """One engine run of `row` under load: its phases, when the target release first answered, failures."""
        self._traces += 1
        trace = self.work / f"trace-{self._traces:02d}.json"
        changes = {} if release is None else {"release": release, "artifact": artifact}
        self.stack.engine.configure(self.stack.config(**changes), SECRET_KEYS)
        args = ["up", "--yes", *([] if preview else ["--skip-preview"]), "--otel-traces", f"file://{trace}"]
        with self.clients() as load:
            started = time.monotonic()
            report: RunReport = self.stack.engine.run(*args)
            target = release or self.stack.current()
            wait_for(lambda: load.first(target, started) is not None)
        figures: dict[str, Any] = dict(phases(trace))
        figures.update(
            first=load.first(target, started), failed=len(load.failures), requests=len(load.results), ops=report.ops(include_same=False)
        )
        self.rows[row].runs.append(figures)

    def tool(self, row: str, *commands: str, target: str) -> None:
        """The release tool over plain OpenSSH, one session per command, under the same load."""
        with self.clients() as load:
            started = time.monotonic()
            for command in commands:
                self.host.run(f"cognivern-release --root {self.host.root} {command}", check=True)
            wall = time.monotonic() - started
            wait_for(lambda: load.first(target, started) is not None)
        self.rows[row].runs.append(
            {"wall": wall, "first": load.first(target, started), "failed": len(load.failures), "requests": len(load.results)}
        )

    def ssh_dial(self) -> float | None:
        walls = []
        for _ in range(5):
            started = time.monotonic()
            self.host.run("true", check=True)
            walls.append(time.monotonic() - started)
        return median(walls)


def wait_for(predicate: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)


def main() -> None:
    args, budget = harness.start(__doc__, "engine-phases", budget=1500)
    work = Path(tempfile.mkdtemp(prefix="engine-phases-"))
    report: dict[str, Any] = {"repeat": args.repeat, "rows": {}, "complete": False}
    try:
        with TargetHost() as host:
            stack = TargetStack(host, work / "stack", bakeSeconds=0, secretEnv={"FIXTURE_ECHO": "bench"})
            bench = Bench(host, stack, work)
            stack.up(release="base", artifact=stack.artifact("base"))
            report["ssh_dial_s"] = bench.ssh_dial()
            for i in range(args.repeat):
                budget.check()
                bench.engine("noop", None, None)
                bench.engine("noop+preview", None, None, preview=True)
                new = f"deploy-{i}"
                bench.engine("deploy", new, stack.artifact(new))
                bench.engine("rollback", "base", None)
                tool_new = f"tool-{i}"
                tarball = Path(stack.artifact(tool_new))
                incoming = host.root / "incoming" / tarball.name
                shutil.copy(tarball, incoming)
                sha = tarball.with_name(tarball.name + ".sha256").read_text().split()[0]
                bench.tool("tool-deploy", f"install {tool_new} {incoming} {sha}", f"activate {tool_new}", target=tool_new)
                bench.tool("tool-rollback", "activate base", target="base")
                budget.say(f"round {i + 1}/{args.repeat} done")
            report["complete"] = True
    except harness.BudgetExceededError as err:
        report["error"] = str(err)
    finally:
        rows = bench.rows if "bench" in locals() else {}
        for name, row in rows.items():
            report["rows"][name] = {"runs": row.runs, **{f"median_{k}": row.median(k) for k in (*PHASES, "failed")}}
        shutil.rmtree(work, ignore_errors=True)
    table = [
        [
            name,
            *(harness.fmt(report["rows"][name][f"median_{k}"], " s", 2) for k in PHASES),
            harness.fmt(report["rows"][name]["median_failed"], "", 0),
        ]
        for name in report["rows"]
    ]
    harness.print_table(
        ["row", *PHASES, "failed"],
        table,
        title=f"medians of {args.repeat}; ssh dial {harness.fmt(report.get('ssh_dial_s'), ' s', 3)}",
        align="<" + ">" * 8,
    )
    harness.write_json(args.out, report)


if __name__ == "__main__":
    main()
