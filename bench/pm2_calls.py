"""CPU of the release tool's PM2 calls: PM2's CLI against cognivern-pm2.cjs on PM2's RPC socket.

Every `pm2` command loads PM2's whole CLI (0.2-1 s of CPU, more on a busy machine); the release tool asks PM2 for restarts
and pids all through a slot's start and its bake, and deletes a slot or the agent on every
activation. This bench starts a private PM2 daemon (temp PM2_HOME, two `sleep` apps), then times
each call both ways: the CPU of the calling processes (user + system, from RUSAGE_CHILDREN; the
daemon's own work is the same either way) and the wall time, medians of --repeat runs. It derives
the share of one core that a bake's PM2 checks take: before, a CLI query in every turn of its
250 ms loop; now an RPC query in every 4th turn. Run: venv/bin/python -m bench.pm2_calls [--repeat 15]
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

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "components" / "release" / "cognivern-pm2.cjs"
APP = "bench-sleeper"


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
    env = {**os.environ, "PM2_HOME": str(home), "H": str(HELPER), "APP": APP}
    start = 'pm2 start /bin/sleep --name "$APP" -- 1000 >/dev/null'
    doomed = "pm2 start /bin/sleep --name doomed -- 1000 >/dev/null"  # started again before each delete
    calls = {  # row -> (PM2's CLI, the helper on the RPC socket, set-up before each run)
        "query restarts": ('pm2 jlist | node "$H" restarts "$APP" --stdin', 'node "$H" restarts "$APP"', ""),
        "query pids": ('pm2 jlist | node "$H" pids "$APP" --stdin', 'node "$H" pids "$APP"', ""),
        "delete an app": ("pm2 delete doomed >/dev/null", 'node "$H" delete doomed >/dev/null', doomed),
    }
    rows: list[list[str]] = []
    report: dict[str, Any] = {"repeat": args.repeat, "calls": {}}
    try:
        subprocess.run(
            ["bash", "-c", f"pm2 ping >/dev/null && {start} && pm2 start /bin/sleep --name other -- 1000 >/dev/null"],
            env=env,
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
        # The bake loop sleeps 250 ms between checks: before, a CLI query in every turn; now an RPC
        # query in every 4th (health is asked in every turn either way, and costs the same).
        q = report["calls"]["query restarts"]
        before = q["cli"]["cpu_s"] / (q["cli"]["wall_s"] + 0.25)
        after = q["rpc"]["cpu_s"] / (q["rpc"]["wall_s"] + 4 * 0.25)
        report["bake_core_share"] = {"before_cli_every_turn": before, "now_rpc_every_4th_turn": after}
        rows.append(["bake: PM2 checks, share of a core", f"{before:.0%}", f"{after:.0%}", "", "", ""])
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
