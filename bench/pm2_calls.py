"""CPU of the release tool's PM2 calls: PM2's CLI, the Node helper the bash tool used, and the Python tool in-process.

Every `pm2` command loads PM2's whole CLI (0.2-1 s of CPU, more on a busy machine). The bash tool
asked PM2 through cognivern-pm2.cjs (a node process per question on PM2's RPC socket, and one
watcher process per start or bake); the Python tool (issue 23) speaks the same RPC itself, in its
own process (cognivern_release.pm2), and watches a slot in its own loop. This bench starts a private
PM2 daemon (temp PM2_HOME, a `sleep` app and tests/fixtures/health-app.js on a free loopback port)
and times each call the three ways: the CPU of the calling processes (user + system; for the CLI and
the helper from RUSAGE_CHILDREN, for the in-process calls this process's own CPU), and the wall
time, medians of --repeat runs. The helper is taken from git (HELPER_COMMIT). The last row is a
whole bake of BAKE_S seconds: the helper's watcher against the Python tool's watch loop.
Run: venv/bin/python -m bench.pm2_calls [--repeat 15]
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import harness
from components.release.cognivern_release import pm2
from components.release.cognivern_release.activation import Machine
from components.release.cognivern_release.proc import Account, HostEdges
from components.release.cognivern_release.server import health_check
from tests.support.helpers import free_port

REPO = Path(__file__).resolve().parents[1]
HELPER_COMMIT = "eb6022a"  # the last commit with the bash tool and its Node helper
WEB_APP = REPO / "tests" / "fixtures" / "health-app.js"
APP = "bench-sleeper"
BAKE_S = 5


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_shell(env: dict[str, str], script: str) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one bash snippet and everything it waited for."""
    cpu, began = _children_cpu(), time.monotonic()
    subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True, cwd="/")
    return _children_cpu() - cpu, time.monotonic() - began


def timed_here(call: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one in-process call."""
    cpu, began = time.process_time(), time.monotonic()
    call()
    return time.process_time() - cpu, time.monotonic() - began


class Edges(HostEdges):
    """What the Python tool's watch loop asks, for the bench's daemon."""

    def __init__(self, daemon: pm2.Daemon) -> None:
        self.daemon = daemon

    def health(self, url: str) -> bool:
        return health_check(url)[0]

    def pm2_list(self) -> list[dict[str, Any]] | None:
        return self.daemon.list()


def main() -> None:
    from tests.test_activation_machine import config  # a Config for the watch (its names and port)

    args, budget = harness.start(__doc__, "pm2-calls", repeat=15, budget=600)
    home = Path(tempfile.mkdtemp(prefix="pm2-calls-"))
    home.chmod(0o755)
    helper = home / "cognivern-pm2.cjs"
    helper.write_bytes(
        subprocess.run(
            ["git", "-C", str(REPO), "show", f"{HELPER_COMMIT}:components/release/cognivern-pm2.cjs"], capture_output=True, check=True
        ).stdout
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}/health"
    env = {**os.environ, "PM2_HOME": str(home), "H": str(helper), "APP": APP, "URL": url}
    doomed = "pm2 start /bin/sleep --name doomed -- 1000 >/dev/null"  # started again before each delete
    daemon = pm2.Daemon(str(home), Account("root", 0, 0, "/root"))
    watch = Machine(config(app_name="web", port=port), None, Edges(daemon))  # type: ignore[arg-type]
    calls: dict[str, tuple[str, str, Callable[[], object], str]] = {  # row -> (CLI, helper, in-process, set-up)
        "query the process list": ("pm2 jlist >/dev/null", 'node "$H" pids "$APP" >/dev/null', daemon.list, ""),
        "delete an app": ("pm2 delete doomed >/dev/null", 'node "$H" delete doomed >/dev/null', lambda: daemon.delete("doomed"), doomed),
        f"bake of {BAKE_S} s": (
            "",
            f'node "$H" bake web-blue "$URL" {BAKE_S} "{home}" $$',
            lambda: watch.watch_bake("blue", str(home), BAKE_S),
            "",
        ),
    }
    rows: list[list[str]] = []
    report: dict[str, Any] = {"repeat": args.repeat, "helper_commit": HELPER_COMMIT, "calls": {}}
    try:
        start = f"pm2 ping >/dev/null && pm2 start /bin/sleep --name {APP} -- 1000 >/dev/null"
        subprocess.run(
            ["bash", "-c", f"{start} && pm2 start {WEB_APP} --name web-blue --cwd {home} >/dev/null"],
            env={**env, "PORT": str(port)},
            check=True,
            cwd="/",
        )
        time.sleep(2)
        assert watch.watch_healthy("blue", str(home), 10, None).kind == "ok"
        for row, (cli, node, here, setup) in calls.items():
            figures: dict[str, dict[str, float | None]] = {}
            for way in ("cli", "helper", "python"):
                if way == "cli" and not cli:
                    continue
                cpus, walls = [], []
                for _ in range(args.repeat if "bake" not in row else max(1, args.repeat // 5)):
                    budget.check()
                    if setup:
                        subprocess.run(["bash", "-c", setup], env=env, check=True, cwd="/")
                    cpu, wall = timed_here(here) if way == "python" else timed_shell(env, cli if way == "cli" else node)
                    cpus.append(cpu)
                    walls.append(wall)
                figures[way] = {"cpu_s": harness.median(cpus), "wall_s": harness.median(walls)}
            report["calls"][row] = figures
            budget.say(f"{row}: {figures}")
            rows.append(
                [
                    row,
                    *(harness.fmt(figures.get(w, {}).get("cpu_s"), " s", 3) for w in ("cli", "helper", "python")),
                    *(harness.fmt(figures.get(w, {}).get("wall_s"), " s", 3) for w in ("cli", "helper", "python")),
                ]
            )
    finally:
        daemon.close()
        subprocess.run(["bash", "-c", "pm2 kill >/dev/null 2>&1"], env=env, check=False, cwd="/")
        shutil.rmtree(home, ignore_errors=True)
    harness.print_table(
        [
            "call",
            "CPU, pm2 CLI",
            f"CPU, node helper ({HELPER_COMMIT})",
            "CPU, Python in-process",
            "wall, CLI",
            "wall, helper",
            "wall, Python",
        ],
        rows,
        title=f"PM2 calls, medians of {args.repeat} (the bake: of {max(1, args.repeat // 5)})",
        align="<>>>>>>",
    )
    harness.write_json(args.out, report)


if __name__ == "__main__":
    main()
