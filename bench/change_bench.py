"""The user's clock per change (issue 22): the real `pulumi up` of each change, beside the same work run directly.

    venv/bin/python -m bench.change_bench [--repeat 3] [--out reports/change-bench.json] [--budget 2400]

Runs as root on loopback only: one TargetHost (private sshd, nginx, ROOT, unique app user) and one
stack of this program deployed by the real engine (tests/support/real_engine.py, as the tests run
it), existing-host mode, the fixture app, bakeSeconds 0, CLIENTS clients on GET /release through
the host's nginx, 10 ms between requests. Every row is run --repeat times; medians are quoted.

Per run: `wall` (from the start of `pulumi up --yes --skip-preview` to its return), `first` (from
that start to the first response of the target release: release rows only), failed/total requests,
and the engine's steps that were not `same` with their seconds (from each step's start to its
outputs, as the engine's event log shows them).

Rows (each from the state the one before left):
  noop            nothing changed: the engine's floor
  new-release     a new release, its slot cold: upload + one `deploy` command
  rollback-cold   back to the release before, not running any more: one `deploy ID - -`
  rollback-warm   the same with keepPreviousWarm (the release before still runs in the other slot)
  keep-releases   keepReleases 5 <-> 6: the prune command
  bake-health     bakeSeconds 0 <-> 1: the config file
  nginx           framePolicy same-origin <-> deny: the site, nginx -t, a reload
  env-value       a secretEnv value rotated: .env, one graceful reload
  tool-edit       the release tool edited (a comment appended): the tool's install
  host-key-pin    hostKey re-pinned (its comment changed): every command's connection
"Direct" is the same work without the engine, in the same run on the same host, over one SSH
connection each (the test harness's OpenSSH client): the release rows as `cat > incoming/...` plus
`cognivern-release deploy` (new) or `deploy ID - -` (rollbacks), timed the same way; the config rows
as the one host command the engine ran (prune, put-file, nginx-site, install-tool). At rest
(no request for 2 s), the app user's RSS is sampled with one app copy (after rollback-cold) and
with two (after rollback-warm): the keepPreviousWarm memory figure.
"""

from __future__ import annotations

import os
import pwd
import shlex
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import harness
from bench.harness import median
from bench.release_bench import RssSampler
from components.host import NGINX_SITE
from components.remote import PUT_FILE, script_command
from components.render import render_env, render_nginx_site, render_release_conf, site_name
from components.settings import Settings, parse_settings
from components.tool import INSTALL_TOOL, RELEASE_TOOL, release_tool_bundle
from tests.support.load import Load
from tests.support.real_engine import RunReport
from tests.support.target_host import TargetHost
from tests.test_boundaries import Stack

CLIENTS = 2
RELEASE_ROWS = ("new-release", "rollback-cold", "rollback-warm")
CONFIG_ROWS = ("noop", "keep-releases", "bake-health", "nginx", "env-value", "tool-edit", "host-key-pin")
GOALS = {
    "noop": 1.5,
    "new-release": 3.5,
    "rollback-cold": 3.0,
    "rollback-warm": 2.0,
}  # issue 22: seconds to the first response (noop: wall)


def engine_steps(report: RunReport) -> dict[str, float]:
    """Each step that ran, with its seconds (a replaced resource's later delete of its old copy as `NAME (delete)`)."""
    out: dict[str, float] = {}
    for s in report.steps:
        if s.op in ("same", "skipped"):
            continue
        name = s.name.removeprefix("cognivern-test-")
        out[f"{name} (delete)" if s.op == "delete" and name in out else name] = round(s.seconds, 2)
    return out


class Bench:
    def __init__(self, host: TargetHost, stack: Stack) -> None:
        self.host, self.stack = host, stack
        self.urls = [host.nginx.url("/release")]
        self.runs: dict[str, dict[str, list[dict[str, Any]]]] = {"engine": {}, "direct": {}}
        self.rest: dict[str, list[float]] = {"one_copy_mb": [], "two_copies_mb": []}
        self.uid = pwd.getpwnam(host.app_user).pw_uid

    def timed(self, side: str, row: str, target: str | None, action: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        with Load(self.urls, clients=CLIENTS, pause=0.01) as load:
            started = time.monotonic()
            result = action()
            wall = time.monotonic() - started
            if target is not None:
                deadline = time.monotonic() + 5
                while load.first(target, started) is None and time.monotonic() < deadline:
                    time.sleep(0.02)
        first = load.first(target, started) if target is not None else None
        run = {
            "wall": round(wall, 2),
            "first": None if first is None else round(first, 2),
            "failed": len(load.failures),
            "requests": len(load.results),
            **result,
        }
        self.runs[side].setdefault(row, []).append(run)
        return run

    # -- the engine
    def up(self, row: str, target: str | None = None, **changes: Any) -> dict[str, Any]:
        def action() -> dict[str, Any]:
            report = self.stack.up(**changes)
            return {"ok": report.ok, "steps": engine_steps(report)}

        return self.timed("engine", row, target, action)

    # -- the same work without it
    def ssh(self, row: str, target: str | None, *commands: tuple[str, str | bytes | None]) -> dict[str, Any]:
        def action() -> dict[str, Any]:
            ok = all(self.host.run(cmd, stdin, timeout=300).returncode == 0 for cmd, stdin in commands)
            return {"ok": ok}

        return self.timed("direct", row, target, action)

    def tool(self, *argv: str) -> str:
        return shlex.join(["cognivern-release", "--root", str(self.host.root), *argv])

    def at_rest(self, key: str) -> None:
        time.sleep(2)
        samples = [RssSampler(self.uid).sample()[0] for _ in range(5)]
        self.rest[key].append(round(statistics.median(samples) / 1024, 1))


def one_round(b: Bench, i: int, say: Callable[[str], None]) -> None:
    stack, host = b.stack, b.host
    current = str(stack.settings["release"])
    new, direct, warm = f"cb-new{i}", f"cb-direct{i}", f"cb-warm{i}"
    say(f"round {i}: new-release {b.up('new-release', new, release=new, artifact=stack.artifact(new))}")
    say(f"round {i}: rollback-cold {b.up('rollback-cold', current, release=current, artifact=None)}")
    b.at_rest("one_copy_mb")
    tarball = Path(stack.artifact(direct))
    sha = tarball.with_name(tarball.name + ".sha256").read_text().split()[0]
    incoming = f"{host.root}/incoming/{tarball.name}"
    upload, deploy = (f"cat > {incoming}", tarball.read_bytes()), (b.tool("deploy", direct, incoming, sha), None)
    say(f"round {i}: direct new-release {b.ssh('new-release', direct, upload, deploy)}")
    say(f"round {i}: direct rollback-cold {b.ssh('rollback-cold', current, (b.tool('deploy', current, '-', '-'), None))}")
    stack.up(keepPreviousWarm=True)
    stack.up(release=warm, artifact=stack.artifact(warm))  # `current` stays warm in the other slot
    say(f"round {i}: rollback-warm {b.up('rollback-warm', current, release=current, artifact=None)}")
    b.at_rest("two_copies_mb")
    say(f"round {i}: direct rollback-warm {b.ssh('rollback-warm', warm, (b.tool('deploy', warm, '-', '-'), None))}")
    host.run(b.tool("deploy", current, "-", "-"), check=True)  # back in line with the stack
    stack.up(keepPreviousWarm=False)

    s = settings_of(stack)
    say(f"round {i}: noop {b.up('noop')}")
    keep = 6 if i % 2 == 0 else 5
    say(f"round {i}: keep-releases {b.up('keep-releases', keepReleases=keep)}")
    b.ssh("keep-releases", None, (b.tool("prune", "--keep", str(keep)), None))
    bake = 1 if i % 2 == 0 else 0
    say(f"round {i}: bake-health {b.up('bake-health', bakeSeconds=bake)}")
    conf = f"{host.root}/config/cognivern.conf"
    put_conf = script_command(PUT_FILE, ["--dest", conf, "--mode", "0644", "--owner", "root:root"])
    b.ssh("bake-health", None, (put_conf, render_release_conf(settings_of(stack, bakeSeconds=1 - bake))))
    policy = "deny" if i % 2 == 0 else "same-origin"
    say(f"round {i}: nginx {b.up('nginx', framePolicy=policy)}")
    site = script_command(NGINX_SITE, ["--name", site_name(s.app_name), "--upstream-port", str(s.port)])
    b.ssh("nginx", None, (site, render_nginx_site(settings_of(stack, framePolicy="same-origin" if i % 2 == 0 else "deny"))))
    say(f"round {i}: env-value {b.up('env-value', secretEnv={'FIXTURE_ECHO': f'rotated-{i}'})}")
    env_dest = f"{host.root}/shared/.env"
    put_env = script_command(
        PUT_FILE, ["--dest", env_dest, "--mode", "0600", "--owner", f"{s.app_user}:{s.app_user}", "--reload-root", str(host.root)]
    )
    b.ssh("env-value", None, (put_env, render_env(s.stack_env, {"FIXTURE_ECHO": f"direct-{i}"})))
    stack.engine.edit("components/release/cognivern-release.sh", RELEASE_TOOL.read_text() + f"# change_bench round {i}\n")
    say(f"round {i}: tool-edit {b.up('tool-edit')}")
    b.ssh("tool-edit", None, (script_command(INSTALL_TOOL, []), release_tool_bundle()))
    assert host.sshd is not None
    say(f"round {i}: host-key-pin {b.up('host-key-pin', hostKey=f'{host.sshd.host_key} pin-{i}')}")


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    steps: dict[str, list[float]] = {}
    for r in runs:
        for name, seconds in r.get("steps", {}).items():
            steps.setdefault(name, []).append(seconds)
    return {
        "median_wall": median(r["wall"] for r in runs),
        "median_first": median(r["first"] for r in runs) if all(r["first"] is not None for r in runs) else None,
        "failed": sum(r["failed"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
        "all_ok": all(r["ok"] for r in runs),
        "median_steps": {n: median(v) for n, v in steps.items()},
    }


def cell(s: dict[str, Any] | None, clock: bool) -> str:
    """`1.23 s, 0/812 failed` (clock: the time to the first response, else the wall time); (!) when a run went wrong."""
    if s is None:
        return ""
    value = s["median_first"] if clock else s["median_wall"]
    return f"{harness.fmt(value, ' s', 2)}, {s['failed']}/{s['requests']} failed" + ("" if s["all_ok"] else " (!)")


def settings_of(stack: Stack, **override: Any) -> Settings:
    """The Settings the program builds from the stack's config (with `override`), to render files as it does."""
    merged = {k: v for k, v in {**stack.settings, **override}.items() if v is not None}
    return parse_settings(stack.host_config(**merged).get)


def main(argv: list[str] | None = None) -> int:
    args, budget = harness.start(__doc__, "change-bench", budget=2400, argv=argv)
    tmp = Path(tempfile.mkdtemp(prefix="cgv-change-bench-"))
    host = TargetHost()
    bench: Bench | None = None
    try:
        host.start()
        stack = Stack(host, tmp)
        stack.settings.update(bakeSeconds=0)
        base = "cb-base"
        stack.up(release=base, artifact=stack.artifact(base))
        bench = Bench(host, stack)
        for i in range(args.repeat):
            budget.check()
            one_round(bench, i, budget.say)
    finally:
        host.cleanup()
    assert bench is not None
    out: dict[str, Any] = {"clients": CLIENTS, "repeat": args.repeat, "bake_seconds": 0, "load_average": os.getloadavg()}
    out["summary"] = {side: {row: summary(runs) for row, runs in rows.items()} for side, rows in bench.runs.items()}
    out["at_rest_rss_mb"] = {k: median(v) for k, v in bench.rest.items()}
    out["runs"] = bench.runs
    rows = []
    for row in (*CONFIG_ROWS[:1], *RELEASE_ROWS, *CONFIG_ROWS[1:]):
        engine = out["summary"]["engine"].get(row)
        direct = out["summary"]["direct"].get(row)
        clock = row in RELEASE_ROWS
        goal = GOALS.get(row)
        steps = ", ".join(f"{n} {v:.2f}" for n, v in (engine or {}).get("median_steps", {}).items())
        rows.append(
            [
                row,
                cell(engine, clock=False),
                cell(engine, clock=True) if clock else "",
                cell(direct, clock=clock),
                "" if goal is None else f"≤ {goal} s",
                steps,
            ]
        )
    harness.print_table(
        ["change", "pulumi up: wall", "pulumi up: first response", "direct (first response / wall)", "goal", "engine steps (s)"],
        rows,
        title=f"pulumi up per change (real engine), medians of {args.repeat}, {CLIENTS} clients, bakeSeconds 0,"
        f" load average at the end {out['load_average'][0]:.1f}",
    )
    rest = out["at_rest_rss_mb"]
    print(f"app user's RSS at rest: one app copy {rest['one_copy_mb']} MB, two (keepPreviousWarm) {rest['two_copies_mb']} MB")
    harness.write_json(args.out, {**out, "wall_seconds": round(budget.elapsed(), 1)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
