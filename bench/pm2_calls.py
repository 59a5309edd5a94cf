"""CPU of the release tool's PM2 calls: PM2's CLI against cognivern-pm2.cjs on PM2's RPC socket.

Every `pm2` command loads PM2's whole CLI (0.2-1 s of CPU, more on a busy machine); the release tool
asks PM2 about a slot while it starts and all through its bake, and deletes a slot or the agent on
every activation. This bench starts a private PM2 daemon (temp PM2_HOME, a `sleep` app and
tests/fixtures/health-app.js on a free loopback port), then times each call both ways: the CPU of
the calling processes (user + system, from RUSAGE_CHILDREN; the daemon's own work is the same either
way) and the wall time, medians of --repeat runs. The last row is a whole bake of BAKE_S seconds:
the bash loop the tool ran until the watcher (a curl every 250 ms, a query through the RPC helper
every 4th turn) against the watcher (`cognivern-pm2.cjs bake`, one process).
Run: venv/bin/python -m bench.pm2_calls [--repeat 15]
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import harness
from tests.support.helpers import free_port

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "components" / "release" / "cognivern-pm2.cjs"
WEB_APP = REPO / "tests" / "fixtures" / "health-app.js"
APP = "bench-sleeper"
BAKE_S = 5
# The bake as the tool ran it before the watcher (cognivern-release.sh at 0b1e4ff, without its
# messages): PM2's counters every 4th turn of a 250 ms loop, the health in every turn.
BASH_BAKE = """
node "$H" pids web >/dev/null; node "$H" pids web >/dev/null
end=$(($(date +%s%3N) + BAKE_S * 1000)); n=0
while [ "$(date +%s%3N)" -lt "$end" ]; do
    if [ $((n++ % 4)) -eq 0 ]; then node "$H" pids web >/dev/null; fi
    body=$(curl -fsS --max-time 2 "$URL" 2>/dev/null) || true
    [[ $body =~ \"status\"[[:space:]]*:[[:space:]]*\"ok\" ]]
    sleep 0.25
done
"""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(env: dict[str, str], script: str) -> tuple[float, float, str]:
    """(CPU seconds, wall seconds, stdout) of one bash snippet and everything it waited for."""
    cpu, began = _children_cpu(), time.monotonic()
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True, cwd="/")
    return _children_cpu() - cpu, time.monotonic() - began, proc.stdout


def main() -> None:
    args, budget = harness.start(__doc__, "pm2-calls", repeat=15, budget=600)
    home = Path(tempfile.mkdtemp(prefix="pm2-calls-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/health"
    env = {**os.environ, "PM2_HOME": str(home), "H": str(HELPER), "APP": APP, "URL": url, "BAKE_S": str(BAKE_S)}
    start = 'pm2 start /bin/sleep --name "$APP" -- 1000 >/dev/null'
    doomed = "pm2 start /bin/sleep --name doomed -- 1000 >/dev/null"  # started again before each delete
    calls = {  # row -> (PM2's CLI, the helper on the RPC socket, set-up before each run)
        "query pids": ('pm2 jlist | node "$H" pids "$APP" --stdin', 'node "$H" pids "$APP"', ""),
        "query status": ('pm2 jlist | node "$H" status --stdin', 'node "$H" status', ""),
        "delete an app": ("pm2 delete doomed >/dev/null", 'node "$H" delete doomed >/dev/null', doomed),
        f"bake of {BAKE_S} s (bash loop | watcher)": (BASH_BAKE, f'node "$H" bake web "$URL" {BAKE_S} "{home}" $$', ""),
    }
    rows: list[list[str]] = []
    report: dict[str, Any] = {"repeat": args.repeat, "calls": {}}
    try:
        subprocess.run(
            ["bash", "-c", f"pm2 ping >/dev/null && {start} && pm2 start {WEB_APP} --name web --cwd {home} >/dev/null"],
            env={**env, "PORT": str(port)},
            check=True,
            cwd="/",
        )
        for row, (cli, rpc, setup) in calls.items():
            figures: dict[str, dict[str, float | None]] = {}
            for way, script in (("cli", cli), ("rpc", rpc)):
                cpus, walls, answers = [], [], set()
                for _ in range(args.repeat):
                    budget.check()
                    if setup:
                        subprocess.run(["bash", "-c", setup], env=env, check=True, cwd="/")
                    cpu, wall, out = timed(env, script)
                    cpus.append(cpu)
                    walls.append(wall)
                    answers.add(out.strip() if "pids" not in row else str(len(out.split())))
                figures[way] = {"cpu_s": harness.median(cpus), "wall_s": harness.median(walls)}
                report["calls"].setdefault(row, {})[way] = {**figures[way], "answers": sorted(answers)}
            budget.say(f"{row}: done")
            if "bake" in row:
                assert report["calls"][row]["rpc"]["answers"] == ["ok"], report["calls"][row]
            cli_cpu, rpc_cpu = figures["cli"]["cpu_s"], figures["rpc"]["cpu_s"]
            rows.append(
                [
                    row,
                    harness.fmt(cli_cpu, " s", 3),
                    harness.fmt(rpc_cpu, " s", 3),
                    harness.fmt(figures["cli"]["wall_s"], " s", 3),
                    harness.fmt(figures["rpc"]["wall_s"], " s", 3),
                    harness.fmt(cli_cpu / rpc_cpu if cli_cpu and rpc_cpu else None, "x", 1),
                ]
            )
    finally:
        subprocess.run(["bash", "-c", "pm2 kill >/dev/null 2>&1"], env=env, check=False, cwd="/")
        shutil.rmtree(home, ignore_errors=True)
    harness.print_table(
        ["call", "CPU, pm2 CLI", "CPU, RPC helper", "wall, CLI", "wall, RPC", "CPU ratio"],
        rows,
        title=f"PM2 calls, medians of {args.repeat}",
        align="<>>>>>",
    )
    harness.write_json(args.out, report)


if __name__ == "__main__":
    main()
