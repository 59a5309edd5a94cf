"""Stalled requests during `pm2 reload` with Node's round-robin cluster primary vs NODE_CLUSTER_SCHED_POLICY=none.

    venv/bin/python -m bench.cluster_policy [--repeat 16] [--out reports/cluster-policy.json] [--budget 900]

Why the release tool starts PM2's daemon with NODE_CLUSTER_SCHED_POLICY=none (cognivern_release/apps.py):
PM2's daemon is the cluster primary; with Node's default round-robin it accepts each connection
and hands it to a worker over IPC, and during a reload it can hand one to a worker that is already
exiting; that request then hangs until the client gives up. Same app (tests/fixtures/app, graceful
SIGINT, `ready`), same ecosystem, same nginx and load (8 clients, 8 s timeout); only the daemon's
policy differs. Runs as root on loopback; everything it starts is stopped, its user removed.
"""

from __future__ import annotations

import pwd
import subprocess
import sys
import threading
import time
from typing import Any

import httpx

from bench import harness
from components.render import slot_apps
from tests.support.release_host import ReleaseHost, build_release_tarball, ensure_app_user, remove_app_user

USER = "cgv-policy"
CLIENTS = 8
TIMEOUT = 8.0


def run_load(url: str, stop: threading.Event, results: list[tuple[float, str]]) -> None:
    with httpx.Client(timeout=TIMEOUT) as client:
        while not stop.is_set():
            started = time.monotonic()
            try:
                outcome = "ok" if client.get(url).status_code == 200 else "http-error"
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            results.append((time.monotonic() - started, outcome))
            time.sleep(0.01)


def pm2(host: ReleaseHost, policy: str, *args: str) -> None:
    """pm2 as the app user with shared/.env in its environment (as the release tool gives it) and the daemon policy under test."""
    home = pwd.getpwnam(host.user).pw_dir
    env = ["env", f"HOME={home}", f"PM2_HOME={host.pm2_home}", f"NODE_CLUSTER_SCHED_POLICY={policy}"]
    script = 'set -a; . "$0"; set +a; exec pm2 "$@"'
    argv = ["runuser", "-u", host.user, "--", *env, "bash", "-c", script, str(host.root / "shared" / ".env"), *args]
    subprocess.run(argv, capture_output=True, check=True, timeout=60, cwd="/")


def measure(host: ReleaseHost, url: str, policy: str, reloads: int, budget: harness.Budget) -> dict[str, Any]:
    """Start a fresh daemon with `policy`, then `pm2 reload` the app `reloads` times under load."""
    pm2(host, policy, "kill")
    ecosystem = str(host.root / "config" / "ecosystem.config.cjs")
    pm2(host, policy, "start", ecosystem)
    time.sleep(2)
    stop = threading.Event()
    results: list[tuple[float, str]] = []
    threads = [threading.Thread(target=run_load, args=(url, stop, results), daemon=True) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    durations = []
    try:
        for _ in range(reloads):
            budget.check()
            started = time.monotonic()
            pm2(host, policy, "reload", slot_apps(host.settings)[0])  # the blue slot: the ecosystem's only app here
            durations.append(time.monotonic() - started)
            time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=TIMEOUT + 2)
        pm2(host, policy, "kill")
    failed = [outcome for _, outcome in results if outcome != "ok"]
    return {
        "policy": policy,
        "reloads": reloads,
        "requests": len(results),
        "failed": len(failed),
        "stalled": sum(1 for seconds, outcome in results if outcome != "ok" and seconds >= TIMEOUT - 0.1),
        "failures": {kind: failed.count(kind) for kind in sorted(set(failed))},
        "slowest_ok_seconds": round(max((s for s, o in results if o == "ok"), default=0.0), 3),
        "median_reload_seconds": round(harness.median(durations) or 0.0, 2),
    }


def main(argv: list[str] | None = None) -> int:
    args, budget = harness.start(__doc__, "cluster-policy", repeat=16, alias="--reloads", budget=900, argv=argv)
    ensure_app_user(USER)
    host = ReleaseHost(user=USER)  # its private nginx serves the rendered site, upstream on the blue slot
    rows = []
    try:
        host.start()
        host.install("r1", *build_release_tarball(host.root / "art", "r1"))
        (host.root / "current").symlink_to("releases/r1")  # no slots file: the ecosystem runs blue on current
        for policy in ("rr", "none"):
            rows.append(measure(host, host.url("/release"), policy, args.repeat, budget))
            budget.say(str(rows[-1]))
    finally:
        host.stop()
        remove_app_user(USER)
    labels = {"rr": "rr (Node's default)", "none": "none (the program's)"}
    harness.print_table(
        ["NODE_CLUSTER_SCHED_POLICY", "reloads", "requests", "failed", "stalled", "median reload"],
        [
            [
                labels[r["policy"]],
                str(r["reloads"]),
                str(r["requests"]),
                str(r["failed"]),
                str(r["stalled"]),
                f"{r['median_reload_seconds']}s",
            ]
            for r in rows
        ],
        title=f"pm2 reload under load ({CLIENTS} clients through nginx, {TIMEOUT:.0f} s client timeout)",
        align="<>>>>>",
    )
    harness.write_json(args.out, {"clients": CLIENTS, "timeout_seconds": TIMEOUT, "runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
