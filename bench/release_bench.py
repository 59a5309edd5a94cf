"""Failed requests and time-to-healthy of cognivern-release vs the ops document's procedure.

    venv/bin/python -m bench.release_bench [--repeat 3] [--out reports/release-bench.json]

Runs as root on loopback only: a private nginx (tests/support/nginx.py) in front of the fixture app
(tests/fixtures/app) on a temp ROOT laid out like provisioning, 8 concurrent HTTP clients through
nginx while a scenario runs:
  a  a new release              b  rollback to the previous release
  c  a release crashing at boot
  c2 a release that fails only under PM2 (the pre-flight runs under PM2 too and refuses it)
  c3 a release that fails only after the switch (passes pre-flight; reverted automatically)
The baseline is the document's procedure on the same app, nginx and load: `ln -sfn` the current
link, `pm2 startOrRestart` of a document-style ecosystem (cluster, 1 instance, no wait_ready, PM2's
default listen/kill timeouts), then its curl health loop (5 tries; the sleep is shortened from 5 s
to 1 s). The document has no automatic handling of a broken release, so for c/c2/c3 the baseline is
followed at once by its manual rollback (the same procedure with the previous release).
Also: `cognivern-release install` with a warm store (lockfile unchanged) vs an empty store.
Everything it starts (nginx, PM2 daemons, the app user it created) is stopped/removed at the end.
"""

from __future__ import annotations

import argparse
import json
import pwd
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from components.render import render_nginx_site
from components.settings import Settings
from tests.support.nginx import PrivateNginx
from tests.support.release_host import ReleaseHost, build_release_tarball, ensure_app_user, remove_app_user

BENCH_USER = "cgv-bench"
CLIENTS = 8
SCENARIOS = ("a", "b", "c", "c2", "c3")
TITLES = {
    "a": "a  new release",
    "b": "b  rollback",
    "c": "c  broken: crashes at boot",
    "c2": "c2 broken: fails only under PM2",
    "c3": "c3 broken: fails after the switch",
}
DOC_RETRIES, DOC_SLEEP = 5, 1  # the document's loop: 5 tries, sleep 5 s (shortened to 1 s here)


@dataclass
class Load:
    """CLIENTS threads doing GET /release through nginx; every non-2xx or error is a failure.

    first_seen: release -> time.monotonic() of its first good response; last_failure: when the last
    failed request was sent (None if none). bench/engine_bench.py derives time-to-healthy from them.
    """

    url: str
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    served: dict[str, int] = field(default_factory=dict)
    first_seen: dict[str, float] = field(default_factory=dict)
    last_failure: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _client(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    r = client.get(self.url)
                    good, what = 200 <= r.status_code < 300, f"http {r.status_code}"
                    release = r.json().get("release", "?") if good else None
                except (httpx.HTTPError, ValueError) as exc:
                    good, what, release = False, type(exc).__name__, None
                now = time.monotonic()
                with self._lock:
                    if good:
                        self.ok += 1
                        self.served[str(release)] = self.served.get(str(release), 0) + 1
                        self.first_seen.setdefault(str(release), now)
                    else:
                        self.failed += 1
                        self.last_failure = sent
                        self.errors[what] = self.errors.get(what, 0) + 1
                time.sleep(0.01)

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)


def measure(load_url: str, action: Callable[[str], bool], release_id: str, settle: float = 1.0) -> dict[str, Any]:
    """Run `action(release_id)` under load; seconds = from its start to its return (it returns once healthy)."""
    with Load(load_url) as load:
        time.sleep(settle)
        start = time.monotonic()
        success = action(release_id)
        seconds = time.monotonic() - start
        time.sleep(settle)
    return {
        "seconds": round(seconds, 2),
        "failed": load.failed,
        "requests": load.ok + load.failed,
        "command_ok": success,
        "errors": load.errors,
        "served": load.served,
    }


class DocHost(Protocol):
    """What DocProcedure needs of a host: ReleaseHost here, a TargetHost view in bench/engine_bench.py."""

    @property
    def root(self) -> Path: ...
    @property
    def user(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def settings(self) -> Settings: ...


class DocProcedure:
    """The document's deploy on the same ROOT: ln -sfn, pm2 startOrRestart, curl loop with sleeps."""

    def __init__(self, host: DocHost) -> None:
        self.host = host
        self.home = pwd.getpwnam(host.user).pw_dir
        self.pm2_home = host.root / "pm2-doc"
        self.pm2_home.mkdir(exist_ok=True)
        shutil.chown(self.pm2_home, host.user, host.user)
        self.ecosystem = host.root / "config" / "doc-ecosystem.config.cjs"
        logs = host.root / "shared" / "logs"
        app = {
            "name": host.settings.app_name,
            "script": "./dist/index.js",
            "cwd": f"{host.root}/current",  # the document cds into current; explicit here so PM2 follows the link
            "instances": 1,
            "exec_mode": "cluster",
            # the document's run.sh `source`s .env, which exports nothing: PORT is given here instead
            "env": {"NODE_ENV": "production", "PORT": str(host.port)},
            "error_file": f"{logs}/doc-error.log",
            "out_file": f"{logs}/doc-out.log",
            "log_date_format": "YYYY-MM-DD HH:mm:ss",
            "max_memory_restart": "1G",
        }
        self.ecosystem.write_text(f"module.exports = {{ apps: [{json.dumps(app)}] }};\n")
        self.script = host.root / "doc-deploy.sh"
        self.script.write_text(
            f"""#!/bin/bash
# The document's steps 4-6 (symlink, PM2 restart, health check loop), as root with PM2 as the app user.
ln -sfn "{host.root}/releases/$1" "{host.root}/current"
cd "{host.root}/current" && runuser -u {host.user} -- env HOME="{self.home}" PM2_HOME="{self.pm2_home}" \\
    pm2 startOrRestart "{self.ecosystem}" >/dev/null 2>&1
for i in $(seq 1 {DOC_RETRIES}); do
  if curl -f -s "http://localhost:{host.port}{host.settings.health_path}" > /dev/null; then
    echo "Health check passed"; exit 0
  fi
  sleep {DOC_SLEEP}
done
echo "Health check failed after {DOC_RETRIES} attempts"; exit 1
"""
        )

    def deploy(self, release_id: str) -> bool:
        return subprocess.run(["bash", str(self.script), release_id], capture_output=True, timeout=120).returncode == 0

    def kill(self) -> None:
        subprocess.run(
            ["runuser", "-u", self.host.user, "--", "env", f"HOME={self.home}", f"PM2_HOME={self.pm2_home}", "pm2", "kill"],
            capture_output=True,
            timeout=60,
        )


def median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario (medians are quoted)")
    parser.add_argument("--out", type=Path, default=Path("reports/release-bench.json"))
    parser.add_argument("--max-seconds", type=int, default=1200, help="give up (and clean up) after this long")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")

    began = time.monotonic()

    def check_budget() -> None:
        if time.monotonic() - began > args.max_seconds:
            raise TimeoutError(f"benchmark exceeded --max-seconds {args.max_seconds}")

    created_user = False
    try:
        pwd.getpwnam(BENCH_USER)
    except KeyError:
        created_user = True
    ensure_app_user(BENCH_USER)
    nginx = PrivateNginx(autostart=False)
    host = ReleaseHost(user=BENCH_USER, extra_config={"nginxListen": json.dumps([f"127.0.0.1:{nginx.port}"]), "healthTimeout": "15"})
    doc = DocProcedure(host)
    work = host.root / "bench-artifacts"
    results: dict[str, Any] = {"tool": {s: [] for s in SCENARIOS}, "doc": {s: [] for s in SCENARIOS}, "install": {"warm": [], "fresh": []}}
    load_url = nginx.url("/release")

    def say(msg: str) -> None:
        print(f"[bench {time.monotonic() - began:6.1f}s] {msg}", file=sys.stderr, flush=True)

    try:
        (nginx.sites_enabled / "cognivern.conf").write_text(render_nginx_site(host.settings))
        nginx.start()

        def release(rid: str, mode: str = "ok") -> str:
            host.install(rid, *build_release_tarball(work, rid, mode))
            return rid

        def timed_install(rid: str) -> float:
            tarball, sha = build_release_tarball(work, rid)
            incoming = host.upload(tarball)
            start = time.monotonic()
            host.ok("install", rid, str(incoming), sha)
            return round(time.monotonic() - start, 2)

        def tool_activates(rid: str) -> bool:
            return host.run("activate", rid).returncode == 0

        def tool_refuses(rid: str) -> bool:
            return host.run("activate", rid).returncode == 1 and host.current() == previous

        def doc_fails_then_rolls_back(rid: str) -> bool:
            return (not doc.deploy(rid)) and doc.deploy(previous)

        base = release("base")
        host.ok("activate", base)
        previous = base
        say(f"nginx on 127.0.0.1:{nginx.port} -> app on 127.0.0.1:{host.port}; base release live")

        for i in range(args.repeat):
            check_budget()
            rid = f"new{i}"
            results["install"]["warm"].append(timed_install(rid))
            r = measure(load_url, tool_activates, rid)
            results["tool"]["a"].append(r)
            say(f"tool a #{i}: {r}")
            r = measure(load_url, tool_activates, previous)
            results["tool"]["b"].append(r)
            say(f"tool b #{i}: {r}")
            crash = release(f"crash{i}", "crash")
            r = measure(load_url, tool_refuses, crash)
            results["tool"]["c"].append(r)
            say(f"tool c #{i}: {r}")
            pm2crash = release(f"pm2crash{i}", "crash-under-pm2")
            r = measure(load_url, tool_refuses, pm2crash)
            results["tool"]["c2"].append(r)
            say(f"tool c2 #{i}: {r}")
            late = release(f"late{i}", "crash-after-preflight")
            r = measure(load_url, tool_refuses, late)
            results["tool"]["c3"].append(r)
            say(f"tool c3 #{i}: {r}")

        for i in range(args.repeat):
            check_budget()
            store = host.root / "cache" / "pnpm-store"
            shutil.rmtree(store)
            shutil.rmtree(Path(pwd.getpwnam(BENCH_USER).pw_dir) / ".cache" / "pnpm", ignore_errors=True)
            results["install"]["fresh"].append(timed_install(f"fresh{i}"))
            say(f"fresh install #{i}: {results['install']['fresh'][-1]}s")

        # the document's procedure, same app/nginx/load, its own PM2 daemon
        host.pm2("kill")
        time.sleep(0.5)
        if not doc.deploy(previous):
            raise RuntimeError("the document's procedure could not start the base release")
        for i in range(args.repeat):
            check_budget()
            new = f"new{i}"
            r = measure(load_url, doc.deploy, new)
            results["doc"]["a"].append(r)
            say(f"doc a #{i}: {r}")
            r = measure(load_url, doc.deploy, previous)
            results["doc"]["b"].append(r)
            say(f"doc b #{i}: {r}")
            for key, bad in (("c", f"crash{i}"), ("c2", f"pm2crash{i}"), ("c3", f"late{i}")):
                r = measure(load_url, doc_fails_then_rolls_back, bad)
                results["doc"][key].append(r)
                say(f"doc {key} #{i}: {r}")
    finally:
        doc.kill()
        host.stop()
        nginx.stop()
        if created_user:
            remove_app_user(BENCH_USER)

    summary = {
        side: {
            s: {
                "median_failed": median(runs, "failed"),
                "median_requests": median(runs, "requests"),
                "median_seconds": median(runs, "seconds"),
                "all_commands_as_expected": all(r["command_ok"] for r in runs),
            }
            for s, runs in results[side].items()
        }
        for side in ("tool", "doc")
    }
    installs = {k: float(statistics.median(v)) for k, v in results["install"].items()}
    report = {
        "clients": CLIENTS,
        "repeat": args.repeat,
        "doc_health_loop": {"retries": DOC_RETRIES, "sleep_seconds": DOC_SLEEP, "document_sleep_seconds": 5},
        "summary": summary,
        "install_median_seconds": installs,
        "runs": results,
        "wall_seconds": round(time.monotonic() - began, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\nRelease benchmark: {CLIENTS} clients through nginx, medians of {args.repeat} runs (failed / requests, seconds to healthy)")
    print(f"{'scenario':<34}| {'cognivern-release':<28}| {'document procedure (sleep 1 s)':<30}")
    print("-" * 34 + "+" + "-" * 29 + "+" + "-" * 31)
    for s in SCENARIOS:
        t, d = summary["tool"][s], summary["doc"][s]
        tool_cell = f"{t['median_failed']:.0f} / {t['median_requests']:.0f}, {t['median_seconds']:.1f} s"
        doc_cell = f"{d['median_failed']:.0f} / {d['median_requests']:.0f}, {d['median_seconds']:.1f} s"
        print(f"{TITLES[s]:<34}| {tool_cell:<28}| {doc_cell:<30}")
    print(f"{'install, warm store (same lockfile)':<34}| {installs['warm']:.1f} s")
    print(f"{'install, empty store':<34}| {installs['fresh']:.1f} s")
    print(f"\nJSON: {args.out}  (wall time {report['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
