"""Stalled requests during `pm2 reload` with Node's round-robin cluster primary vs NODE_CLUSTER_SCHED_POLICY=none.

    venv/bin/python -m bench.cluster_policy [--reloads 16] [--out reports/cluster-policy.json]

Why the program starts PM2's daemon with NODE_CLUSTER_SCHED_POLICY=none (components/host/run.sh):
PM2's daemon is the cluster primary; with Node's default round-robin it accepts each connection
and hands it to a worker over IPC, and during a reload it can hand one to a worker that is already
exiting; that request then hangs until the client gives up. Same app (tests/fixtures/app, graceful
SIGINT, `ready`), same ecosystem, same nginx and load (8 clients, 8 s timeout); only the daemon's
policy differs. Runs as root on loopback; everything it starts is stopped, its user removed.
"""

from __future__ import annotations

import argparse
import json
import pwd
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from components.render import render_nginx_site
from tests.support.nginx import PrivateNginx
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
    """pm2 as the app user with shared/.env exported (as run.sh does) and the daemon policy under test."""
    home = pwd.getpwnam(host.user).pw_dir
    env = ["env", f"HOME={home}", f"PM2_HOME={host.pm2_home}", f"NODE_CLUSTER_SCHED_POLICY={policy}"]
    script = 'set -a; . "$0"; set +a; exec pm2 "$@"'
    argv = ["runuser", "-u", host.user, "--", *env, "bash", "-c", script, str(host.root / "shared" / ".env"), *args]
    subprocess.run(argv, capture_output=True, check=True, timeout=60, cwd="/")


def measure(host: ReleaseHost, url: str, policy: str, reloads: int) -> dict[str, Any]:
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
            started = time.monotonic()
            pm2(host, policy, "reload", host.settings.app_name)
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
        "median_reload_seconds": round(statistics.median(durations), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reloads", type=int, default=16, help="reloads per policy")
    parser.add_argument("--out", type=Path, default=Path("reports/cluster-policy.json"))
    args = parser.parse_args(argv)
    ensure_app_user(USER)
    nginx = PrivateNginx(autostart=False)
    host = ReleaseHost(user=USER, extra_config={"nginxListen": json.dumps([f"127.0.0.1:{nginx.port}"])})
    rows = []
    try:
        (nginx.sites_enabled / "cognivern.conf").write_text(render_nginx_site(host.settings))
        nginx.start()
        host.install("r1", *build_release_tarball(host.root / "art", "r1"))
        (host.root / "current").symlink_to("releases/r1")
        for policy in ("rr", "none"):
            rows.append(measure(host, nginx.url("/release"), policy, args.reloads))
            print(f"[bench] {rows[-1]}", file=sys.stderr, flush=True)
    finally:
        host.stop()
        nginx.stop()
        remove_app_user(USER)
    print(f"\npm2 reload under load ({CLIENTS} clients through nginx, {TIMEOUT:.0f} s client timeout)")
    print(f"{'NODE_CLUSTER_SCHED_POLICY':<26}| {'reloads':>7} | {'requests':>8} | {'failed':>6} | {'stalled':>7} | {'median reload':>13}")
    print("-" * 26 + "+" + "-" * 9 + "+" + "-" * 10 + "+" + "-" * 8 + "+" + "-" * 9 + "+" + "-" * 14)
    for r in rows:
        label = "rr (Node's default)" if r["policy"] == "rr" else "none (the program's)"
        counts = f"{r['reloads']:>7} | {r['requests']:>8} | {r['failed']:>6} | {r['stalled']:>7}"
        print(f"{label:<26}| {counts} | {r['median_reload_seconds']:>12}s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"clients": CLIENTS, "timeout_seconds": TIMEOUT, "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
