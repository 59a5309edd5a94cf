"""Failed requests and time-to-healthy of `pulumi up` on the engine path vs the ops document's procedure.

    venv/bin/python -m bench.engine_bench [--repeat 3] [--out reports/engine-bench.json] [--budget 1200]

Runs as root on loopback only. The real `__main__.py` is deployed by the real engine
(tests/support/real_engine.py: the Pulumi CLI, the Python language host, pulumi-resource-command)
over real OpenSSH against a disposable TargetHost (private sshd, private nginx, temp ROOT, unique
app user), with the stack config and fixture artifacts built exactly as
tests/support/stack.py builds them (TargetStack). The host is prepared and the base
release deployed once ("first deploy": timed, no load); then, with 8 concurrent HTTP clients on
GET /release through the host's nginx:
  a  `pulumi up` of a new release (config change: release + artifact)
  b  rollback to the base release by config alone (no artifact)
  c  a release crashing at boot: the run fails, the base release keeps serving
  c2 a release that fails only under PM2: its slot start (a PM2 start) fails, the run fails
  c3 a release that fails except in a pre-flight (fixture mode crash-after-preflight): the blue/green
     tool has no pre-flight, so its slot start fails like c2 (before f6380ad's design was replaced,
     it passed the pre-flight and failed after the switch; bench/release_bench.py compares the two)
Per run: failed requests, wall time of the engine run (start to return), and time to healthy as
the clients see it: a/b the first response from the requested release (the fixture's /release
names it), c/c2/c3 when the last failed request was sent (0: never down). A release is its upload, then one
`deploy` command (install + activate + prune, the `-activate` resource): its time with a warm store comes from (a);
the same `pulumi up` after emptying the store gives the empty-store figure (no load), whose difference is the install.

The baseline, in the same run on the same host and load, is the document's procedure over the same
SSH connection (root, same sshd and key): upload the tarball (`cat >` over ssh), unpack into
releases/<id>, `pnpm install --prod` (as the app user, its default store), then DocProcedure:
`ln -sfn`, `pm2 startOrRestart` of the document's ecosystem (its own PM2_HOME) and the curl
health loop (5 tries; sleep shortened from 5 s to 1 s). Rollback (b) is the switch alone (the
release is on the server); a broken release (c/c2/c3) is followed at once by the document's
manual rollback. The program's PM2 is stopped before the baseline starts. Everything started is
stopped and the test user removed at the end (TargetHost cleanup).
"""

from __future__ import annotations

import json
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from bench import harness
from bench.harness import median
from bench.release_bench import CLIENTS, Load
from components.settings import Settings
from tests.support.real_engine import RunReport
from tests.support.stack import TargetStack
from tests.support.target_host import SYSTEM_PATH, TargetHost

SCENARIOS = ("a", "b", "c", "c2", "c3")
TITLES = {
    "a": "a  new release (release+artifact)",
    "b": "b  rollback by config alone",
    "c": "c  broken: crashes at boot",
    "c2": "c2 broken: fails only under PM2",
    "c3": "c3 broken: fails but in a pre-flight",
}
BROKEN = (("c", "crash"), ("c2", "crash-under-pm2"), ("c3", "crash-after-preflight"))  # scenario, fixture mode
BASE = "eb-base"
SETTLE = 1.0  # seconds of load before and after each measured command
STEP_NAMES = {"release-upload": "upload", "release-activate": "deploy"}  # resource suffix -> the step's name here
DOC_RETRIES, DOC_SLEEP = 5, 1  # the document's loop: 5 tries, sleep 5 s (shortened to 1 s here)


class DocHost(Protocol):
    """What DocProcedure needs of a host (here a TargetHost view, _DocView)."""

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


@dataclass(frozen=True)
class _DocView:
    """The TargetHost as DocHost sees a host."""

    root: Path
    user: str
    port: int
    settings: Settings


class SshDocProcedure(DocProcedure):
    """The document's procedure, every step run over the TargetHost's SSH (root, same sshd and key).

    Steps 4-6 (ln -sfn, pm2 startOrRestart, curl loop) are DocProcedure's script,
    written into ROOT as a deploy script on the server would be; steps 1-3 (upload, unpack,
    pnpm install --prod) are added here.
    """

    def __init__(self, target: TargetHost, settings: Settings) -> None:
        super().__init__(_DocView(target.root, target.app_user, target.app_port, settings))
        self.target = target
        self.stage_script = target.root / "doc-stage.sh"
        root, user = target.root, target.app_user
        self.stage_script.write_text(
            f"""#!/bin/bash
# The document's steps 2-3 after the upload: unpack into releases/<id>, pnpm install --prod.
# Unpacked as root (the SSH user) and handed to the app user, which runs pnpm with its own HOME.
set -e
mkdir "{root}/releases/$1"
tar -xzf "{root}/incoming/doc-$1.tar.gz" --no-same-owner -C "{root}/releases/$1"
chown -R {user}:{user} "{root}/releases/$1"
cd "{root}/releases/$1" && runuser -u {user} -- env HOME="{self.home}" pnpm install --prod >/dev/null 2>&1
"""
        )

    def upload(self, release_id: str, tarball: Path) -> bool:
        dest = f"{self.target.root}/incoming/doc-{release_id}.tar.gz"
        return self.target.run(f"cat > {dest}", tarball.read_bytes(), timeout=120).returncode == 0

    def stage(self, release_id: str) -> bool:
        return self.target.run(f"bash {self.stage_script} {release_id}", timeout=300).returncode == 0

    def deploy(self, release_id: str) -> bool:
        """Steps 4-6 only: what the document does for a release already on the server (rollback)."""
        return self.target.run(f"bash {self.script} {release_id}", timeout=120).returncode == 0

    def full(self, release_id: str, tarball: Path) -> bool:
        """Steps 1-6: upload, unpack, install, switch, restart, health loop."""
        return self.upload(release_id, tarball) and self.stage(release_id) and self.deploy(release_id)

    def kill(self) -> None:
        env = f"env -i HOME={self.home} PM2_HOME={self.pm2_home} PATH={SYSTEM_PATH}"
        proc = self.target.run(f"runuser -u {self.host.user} -- {env} pm2 kill", timeout=60)
        if proc.returncode != 0:
            super().kill()  # sshd already gone: the same command locally


def measure(load_url: str, action: Callable[[], dict[str, Any]], target: str, broken: bool) -> dict[str, Any]:
    """Run `action()` under load. `target`: the release the clients should end up on."""
    with Load(load_url) as load:
        time.sleep(SETTLE)
        start = time.monotonic()
        result = action()
        seconds = time.monotonic() - start
        time.sleep(SETTLE)
    last = load.last_failure
    if broken:
        healthy: float | None = max(0.0, last - start) if last is not None else 0.0
    else:
        first = load.first_seen.get(target)
        healthy = max(0.0, first - start) if first is not None else None
    return {
        "seconds": round(seconds, 2),
        "healthy_seconds": None if healthy is None else round(healthy, 2),
        "failed": load.failed,
        "last_failed_sent_seconds": None if last is None else round(last - start, 2),
        "requests": load.ok + load.failed,
        "errors": load.errors,
        "served": load.served,
        **result,
    }


def step_durations(report: RunReport) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in report.steps:
        short = next((n for suffix, n in STEP_NAMES.items() if s.name.endswith(suffix)), None)
        if short is not None and s.op not in ("same", "delete", "skipped"):
            out[short] = round(s.seconds, 2)
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    healthy = [r["healthy_seconds"] for r in runs if r["healthy_seconds"] is not None]
    return {
        "median_failed": median([r["failed"] for r in runs]),
        "median_requests": median([r["requests"] for r in runs]),
        "median_seconds": median([r["seconds"] for r in runs]),
        "median_healthy_seconds": median(healthy) if len(healthy) == len(runs) else None,
        "all_commands_as_expected": all(r["command_ok"] for r in runs),
    }


def cell(s: dict[str, Any]) -> str:
    healthy = "never" if s["median_healthy_seconds"] is None else f"{s['median_healthy_seconds']:.1f} s"
    ok = "" if s["all_commands_as_expected"] else " (!)"
    return f"{s['median_failed']:.0f} / {s['median_requests']:.0f}, {s['median_seconds']:.1f} s, {healthy}{ok}"


def main(argv: list[str] | None = None) -> int:
    args, budget = harness.start(__doc__, "engine-bench", argv=argv)
    say, check_budget = budget.say, budget.check
    results: dict[str, Any] = {
        "engine": {s: [] for s in SCENARIOS},
        "doc": {s: [] for s in SCENARIOS},
        "deploy": {"warm": [], "fresh": []},
    }
    extra: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="cgv-engine-bench-"))
    host = TargetHost()
    doc: SshDocProcedure | None = None
    try:
        host.start()
        stack = TargetStack(host, tmp, secretEnv={"FIXTURE_ECHO": "bench"})
        load_url = host.nginx.url("/release")

        def serving() -> str | None:
            try:
                return str(stack.serving()["release"])
            except (AssertionError, httpx.HTTPError, ValueError, KeyError):
                return None

        # -- first deploy: fresh host prepared, base release live (timed once, no load)
        artifact = stack.artifact(BASE)
        start = time.monotonic()
        first = stack.up(release=BASE, artifact=artifact)
        extra["first_deploy_seconds"] = round(time.monotonic() - start, 2)
        extra["first_deploy_steps"] = {s.name.removeprefix("cognivern-test-"): round(s.seconds, 2) for s in first.steps}
        if serving() != BASE:
            raise RuntimeError("the base release is not serving after the first deploy")
        start = time.monotonic()
        noop = stack.up()
        extra["no_change_up_seconds"] = round(time.monotonic() - start, 2)
        if noop.commands:
            raise RuntimeError(f"a run without changes executed commands: {noop.commands}")
        say(f"first deploy {extra['first_deploy_seconds']} s, no-change up {extra['no_change_up_seconds']} s; nginx :{host.nginx.port}")

        def engine_new(rid: str, path: str) -> Callable[[], dict[str, Any]]:
            def action() -> dict[str, Any]:
                report = stack.up(release=rid, artifact=path, check=False)
                return {"command_ok": report.ok and stack.current() == rid, "steps": step_durations(report), "error": None}

            return action

        def engine_rollback() -> dict[str, Any]:
            report = stack.up(release=BASE, artifact=None, check=False)
            return {"command_ok": report.ok and stack.current() == BASE, "steps": step_durations(report), "error": None}

        def engine_broken(rid: str, path: str) -> Callable[[], dict[str, Any]]:
            def action() -> dict[str, Any]:
                report = stack.up(release=rid, artifact=path, check=False)
                handled = not report.ok and stack.current() == BASE and serving() == BASE
                err = report.errors[0].splitlines()[0][:200] if report.errors else None
                return {"command_ok": handled, "steps": step_durations(report), "error": err}

            return action

        for i in range(args.repeat):
            check_budget()
            rid = f"eb-new{i}"
            r = measure(load_url, engine_new(rid, stack.artifact(rid)), rid, broken=False)
            results["engine"]["a"].append(r)
            if "deploy" in r["steps"]:
                results["deploy"]["warm"].append(r["steps"]["deploy"])
            say(f"engine a #{i}: {r}")
            r = measure(load_url, engine_rollback, BASE, broken=False)
            results["engine"]["b"].append(r)
            say(f"engine b #{i}: {r}")
            for key, mode in BROKEN:
                bad = f"eb-{key}-{i}"
                r = measure(load_url, engine_broken(bad, stack.artifact(bad, mode)), BASE, broken=True)
                results["engine"][key].append(r)
                say(f"engine {key} #{i}: {r}")

        # -- the same `pulumi up` with an empty pnpm store (no load; only the deploy step is quoted)
        for i in range(args.repeat):
            check_budget()
            shutil.rmtree(host.root / "cache" / "build" / "work", ignore_errors=True)  # the build account's store and HOME
            rid = f"eb-fresh{i}"
            report = stack.up(release=rid, artifact=stack.artifact(rid), check=False)
            if not report.ok:
                raise RuntimeError(f"empty-store deploy failed: {report.summary()}")
            results["deploy"]["fresh"].append(step_durations(report)["deploy"])
            say(f"engine deploy step, empty store #{i}: {results['deploy']['fresh'][-1]} s")

        # -- the document's procedure on the same host, over the same SSH, same nginx and load
        host.kill_pm2()
        time.sleep(0.5)
        doc_settings = host.settings(release=BASE)
        # The document runs one app on `port`: point the upstream the tool switches back at it (the
        # tool may have left the green slot, port+1, live).
        host.nginx.write_upstream(doc_settings)
        host.nginx.reload()
        doc = SshDocProcedure(host, doc_settings)
        doc_base = "doc-base"
        if not doc.full(doc_base, Path(stack.artifact(doc_base))):
            raise RuntimeError("the document's procedure could not start its base release")
        say("document procedure: base release live under its own PM2")

        def doc_new(rid: str, path: Path) -> Callable[[], dict[str, Any]]:
            def action() -> dict[str, Any]:
                assert doc is not None
                return {"command_ok": doc.full(rid, path)}

            return action

        def doc_rollback() -> dict[str, Any]:
            assert doc is not None
            return {"command_ok": doc.deploy(doc_base)}

        def doc_broken(rid: str, path: Path) -> Callable[[], dict[str, Any]]:
            def action() -> dict[str, Any]:
                assert doc is not None
                failed = not doc.full(rid, path)
                return {"command_ok": failed and doc.deploy(doc_base)}

            return action

        for i in range(args.repeat):
            check_budget()
            rid = f"doc-new{i}"
            r = measure(load_url, doc_new(rid, Path(stack.artifact(rid))), rid, broken=False)
            results["doc"]["a"].append(r)
            say(f"doc a #{i}: {r}")
            r = measure(load_url, doc_rollback, doc_base, broken=False)
            results["doc"]["b"].append(r)
            say(f"doc b #{i}: {r}")
            for key, mode in BROKEN:
                bad = f"doc-{key}-{i}"
                r = measure(load_url, doc_broken(bad, Path(stack.artifact(bad, mode))), doc_base, broken=True)
                results["doc"][key].append(r)
                say(f"doc {key} #{i}: {r}")
    finally:
        if doc is not None:
            doc.kill()
        host.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {side: {s: summarise(runs) for s, runs in results[side].items()} for side in ("engine", "doc")}
    deploys = {k: median(v) for k, v in results["deploy"].items()}
    step_medians = {n: median([r["steps"][n] for r in results["engine"]["a"] if n in r["steps"]]) for n in STEP_NAMES.values()}
    out = {
        "clients": CLIENTS,
        "repeat": args.repeat,
        "path": "the real pulumi up (CLI, language host, pulumi-command) of __main__.py over OpenSSH against a TargetHost",
        "doc_health_loop": {"retries": DOC_RETRIES, "sleep_seconds": DOC_SLEEP, "document_sleep_seconds": 5},
        "healthy_seconds": "a/b: first response from the requested release after the command started; "
        "c/c2/c3: when the last failed request was sent, after the start (0: never down)",
        **extra,
        "summary": summary,
        "engine_step_median_seconds_a": step_medians,
        "deploy_step_median_seconds": deploys,
        "runs": results,
        "wall_seconds": round(budget.elapsed(), 1),
    }
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in step_medians.items() if v is not None)
    rows = [[TITLES[s], cell(summary["engine"][s]), cell(summary["doc"][s])] for s in SCENARIOS]
    rows += [
        ["first deploy (prepare host + base)", f"{extra['first_deploy_seconds']:.1f} s (once, no load)", ""],
        ["up with no change", f"{extra['no_change_up_seconds']:.1f} s (nothing executed)", ""],
        ["engine steps in (a)", steps, ""],
        ["deploy step (install + activate), warm store", harness.fmt(deploys["warm"], " s"), ""],
        ["deploy step, empty store (no load)", harness.fmt(deploys["fresh"], " s"), ""],
    ]
    harness.print_table(
        ["scenario", "pulumi up (real engine, SSH)", "document procedure over SSH (sleep 1 s)"],
        rows,
        title=f"Engine-path benchmark: {CLIENTS} clients through the host's nginx, medians of {args.repeat} runs"
        "\n(failed / requests, run wall time, time to healthy: a/b first response from the new release,"
        " c/c2/c3 last failed request sent)",
    )
    harness.write_json(args.out, out)
    print(f"(wall time {out['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
