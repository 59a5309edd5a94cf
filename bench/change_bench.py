"""The user's clock per change (issue 22): the real `pulumi up` of each change, before and after the new
boundaries in the same run, beside the same work run directly.

    venv/bin/python -m bench.change_bench [--repeat 3] [--out reports/change-bench.json] [--budget 3600]

Runs as root on loopback only: two TargetHosts (private sshd, nginx, ROOT, unique app user), each
with one stack deployed by the real engine (tests/support/real_engine.py, as the tests run it),
existing-host mode, the fixture app, bakeSeconds 0, CLIENTS clients on GET /release through the
host's nginx, 10 ms between requests. "before" runs the program of commit BEFORE (the layout before
issue 22, tests/test_upgrade.py takes it from git), "now" this checkout's; every row runs on one,
then on the other, so both meet the same machine load. Every row is run --repeat times; medians.

Per run: `wall` (from the start of `pulumi up --yes --skip-preview` to its return), `first` (from
that start to the first response of the target release: release rows only), failed requests, whether
an app process was restarted (PM2 pids and restart counters before and after), and the engine's
steps that were not `same`, with their seconds (from each step's start to its outputs).

Rows (each from the state the one before left):
  noop            nothing changed: the engine's floor
  new-release     a new release, its slot cold
  rollback-cold   back to the release before, not running any more
  rollback-warm   the same with keepPreviousWarm (the release before still runs in the other slot)
  keep-releases   keepReleases 5 <-> 6
  bake-health     bakeSeconds 0 <-> 1
  nginx           framePolicy same-origin <-> deny
  env-value       a secretEnv value rotated
  tool-edit       the release tool edited (a comment appended)
  host-key-pin    hostKey re-pinned (its comment changed)
"direct" is the same work without the engine, on the "now" host, over one SSH connection each (the
test harness's OpenSSH client): the release rows as `cat > incoming/...` plus `cognivern-release
deploy` (new) or `deploy ID - -` (rollbacks), timed the same way; the config rows as the one host
command the engine runs now (prune, put-file, nginx-site, install-tool). At rest (no request for
2 s), the app user's RSS is sampled with one app copy (after rollback-cold) and with two (after
rollback-warm): the keepPreviousWarm memory figure.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import harness
from bench.harness import median
from bench.release_bench import RssSampler
from components.host import NGINX_SITE, env_file, nginx_site_input
from components.remote import PUT_FILE, script_command
from components.render import render_env, render_nginx_site, render_release_conf, site_name
from components.settings import Settings, parse_settings
from components.tool import INSTALL_TOOL, bundle, release_tool_files
from tests.support.load import Load
from tests.support.real_engine import RunReport
from tests.support.target_host import TargetHost
from tests.test_boundaries import Stack
from tests.test_upgrade import BEFORE, OldStack, checkout

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


class Side:
    """One stack on its own TargetHost, measured under the same load as the other side."""

    def __init__(self, name: str, host: TargetHost, stack: Stack, runs: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
        self.name, self.host, self.stack, self.runs = name, host, stack, runs
        self.urls = [host.nginx.url("/release")]
        self.uid = pwd.getpwnam(host.app_user).pw_uid
        self.rest: dict[str, list[float]] = {"one_copy_mb": [], "two_copies_mb": []}

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
        self.runs.setdefault(side, {}).setdefault(row, []).append(run)
        return run

    def up(self, row: str, target: str | None = None, **changes: Any) -> dict[str, Any]:
        """The engine's `pulumi up` of this side's program, timed; `restarted`: an app process was."""
        pm2 = self.stack.pm2()

        def action() -> dict[str, Any]:
            report = self.stack.up(**changes)
            return {"ok": report.ok, "steps": engine_steps(report)}

        run = self.timed(self.name, row, target, action)
        run["restarted"] = self.stack.pm2() != pm2
        return run

    def ssh(self, row: str, target: str | None, *commands: tuple[str, str | bytes | None]) -> dict[str, Any]:
        """The same work without the engine: the host commands over SSH, timed."""

        def action() -> dict[str, Any]:
            ok = all(self.host.run(cmd, stdin, timeout=300).returncode == 0 for cmd, stdin in commands)
            return {"ok": ok}

        return self.timed("direct", row, target, action)

    def tool(self, *argv: str) -> str:
        return shlex.join(["cognivern-release", "--root", str(self.host.root), *argv])

    def at_rest(self, key: str) -> None:
        time.sleep(2)
        sampler = RssSampler(self.uid, self.host.bin_dir / "cognivern-release")
        samples = [sampler.sample()[0] for _ in range(5)]
        self.rest[key].append(round(statistics.median(samples) / 1024, 1))


def release_rows(side: Side, i: int, say: Callable[[str], None], direct: bool) -> None:
    stack, host = side.stack, side.host
    current = str(stack.settings["release"])
    new, other, warm = f"cb-new{i}", f"cb-direct{i}", f"cb-warm{i}"
    say(f"{side.name} {i}: new-release {side.up('new-release', new, release=new, artifact=stack.artifact(new))}")
    say(f"{side.name} {i}: rollback-cold {side.up('rollback-cold', current, release=current, artifact=None)}")
    side.at_rest("one_copy_mb")
    if direct:
        tarball = Path(stack.artifact(other))
        sha = tarball.with_name(tarball.name + ".sha256").read_text().split()[0]
        incoming = f"{host.root}/incoming/{tarball.name}"
        upload, deploy = (f"cat > {incoming}", tarball.read_bytes()), (side.tool("deploy", other, incoming, sha), None)
        say(f"direct {i}: new-release {side.ssh('new-release', other, upload, deploy)}")
        say(f"direct {i}: rollback-cold {side.ssh('rollback-cold', current, (side.tool('deploy', current, '-', '-'), None))}")
    stack.up(keepPreviousWarm=True)
    stack.up(release=warm, artifact=stack.artifact(warm))  # `current` stays warm in the other slot
    say(f"{side.name} {i}: rollback-warm {side.up('rollback-warm', current, release=current, artifact=None)}")
    side.at_rest("two_copies_mb")
    if direct:
        say(f"direct {i}: rollback-warm {side.ssh('rollback-warm', warm, (side.tool('deploy', warm, '-', '-'), None))}")
        host.run(side.tool("deploy", current, "-", "-"), check=True)  # back in line with the stack
    stack.up(keepPreviousWarm=False)


def config_rows(side: Side, i: int, say: Callable[[str], None], direct: bool) -> None:
    stack, host = side.stack, side.host
    s = settings_of(stack)
    say(f"{side.name} {i}: noop {side.up('noop')}")
    keep = 6 if i % 2 == 0 else 5
    say(f"{side.name} {i}: keep-releases {side.up('keep-releases', keepReleases=keep)}")
    bake = 1 if i % 2 == 0 else 0
    say(f"{side.name} {i}: bake-health {side.up('bake-health', bakeSeconds=bake)}")
    policy = "deny" if i % 2 == 0 else "same-origin"
    say(f"{side.name} {i}: nginx {side.up('nginx', framePolicy=policy)}")
    say(f"{side.name} {i}: env-value {side.up('env-value', secretEnv={'FIXTURE_ECHO': f'rotated-{i}'})}")
    cli = "components/release/cognivern_release/cli.py"  # a file of the tool's package, in both layouts
    stack.engine.edit(cli, (stack.engine.project / cli).read_text() + f"# change_bench round {i}\n")
    say(f"{side.name} {i}: tool-edit {side.up('tool-edit')}")
    assert host.sshd is not None
    say(f"{side.name} {i}: host-key-pin {side.up('host-key-pin', hostKey=f'{host.sshd.host_key} pin-{i}')}")
    if not direct:
        return
    side.ssh("keep-releases", None, (side.tool("prune", "--keep", str(keep)), None))
    conf = f"{host.root}/config/cognivern.conf"
    put_conf = script_command(PUT_FILE, ["--dest", conf, "--mode", "0644", "--owner", "root:root"])
    side.ssh("bake-health", None, (put_conf, render_release_conf(settings_of(stack, bakeSeconds=1 - bake))))
    site = script_command(NGINX_SITE, ["--name", site_name(s.app_name)])
    other = settings_of(stack, framePolicy="same-origin" if i % 2 == 0 else "deny")
    side.ssh("nginx", None, (site, nginx_site_input(other, render_nginx_site(other))))
    env_dest, env_mode, env_owner = env_file(s)
    put_env = script_command(PUT_FILE, ["--dest", env_dest, "--mode", env_mode, "--owner", env_owner, "--reload-root", str(host.root)])
    side.ssh("env-value", None, (put_env, render_env(s.stack_env, {"FIXTURE_ECHO": f"direct-{i}"})))
    files = [(n, text + f"# change_bench direct {i}\n" if n.endswith("/cli.py") else text) for n, text in release_tool_files()]
    side.ssh("tool-edit", None, (script_command(INSTALL_TOOL, []), bundle(files)))


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
        "restarted": sum(1 for r in runs if r.get("restarted")),
        "runs": len(runs),
        "all_ok": all(r["ok"] for r in runs),
        "median_steps": {n: median(v) for n, v in steps.items()},
    }


def cell(s: dict[str, Any] | None, clock: bool) -> str:
    """`1.23 s, 0 failed` (clock: the time to the first response, else the wall time); `restarted k/n` when
    app processes were; (!) when a run went wrong."""
    if s is None:
        return ""
    value = s["median_first"] if clock else s["median_wall"]
    text = f"{harness.fmt(value, ' s', 2)}, {s['failed']} failed"
    if s.get("restarted"):
        text += f", restarted {s['restarted']}/{s['runs']}"
    return text + ("" if s["all_ok"] else " (!)")


def settings_of(stack: Stack, **override: Any) -> Settings:
    """The Settings the program builds from the stack's config (with `override`), to render files as it does."""
    merged = {k: v for k, v in {**stack.settings, **override}.items() if v is not None}
    return parse_settings(stack.host_config(**merged).get)


def main(argv: list[str] | None = None) -> int:
    args, budget = harness.start(__doc__, "change-bench", budget=3600, argv=argv)
    tmp = Path(tempfile.mkdtemp(prefix="cgv-change-bench-"))
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    hosts = [TargetHost(), TargetHost()]
    sides: list[Side] = []
    try:
        for host in hosts:
            host.start()
        before = OldStack(hosts[0], tmp / "before", checkout(BEFORE, tmp / "before-program"))
        now = Stack(hosts[1], tmp / "now")
        for name, host, stack in (("before", hosts[0], before), ("now", hosts[1], now)):
            stack.settings.update(bakeSeconds=0)
            stack.up(release="cb-base", artifact=stack.artifact("cb-base"))
            sides.append(Side(name, host, stack, runs))
        for i in range(args.repeat):
            budget.check()
            for side in sides:  # the two layouts one after the other, row by row: the same load for both
                release_rows(side, i, budget.say, direct=side.name == "now")
            for side in sides:
                config_rows(side, i, budget.say, direct=side.name == "now")
    finally:
        for host in hosts:
            host.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)  # both stacks' projects, venvs and states (~275 MB)
    out: dict[str, Any] = {"clients": CLIENTS, "repeat": args.repeat, "bake_seconds": 0, "before": BEFORE}
    out["load_average_at_end"] = os.getloadavg()
    out["summary"] = {side: {row: summary(r) for row, r in rows.items()} for side, rows in runs.items()}
    out["at_rest_rss_mb"] = {side.name: {k: median(v) for k, v in side.rest.items()} for side in sides}
    out["runs"] = runs
    rows = []
    for row in (*CONFIG_ROWS[:1], *RELEASE_ROWS, *CONFIG_ROWS[1:]):
        clock = row in RELEASE_ROWS
        now_s = out["summary"]["now"].get(row)
        goal = GOALS.get(row)
        rows.append(
            [
                row,
                cell(out["summary"]["before"].get(row), clock=False),
                cell(now_s, clock=False),
                cell(out["summary"]["before"].get(row), clock=True) if clock else "",
                cell(now_s, clock=True) if clock else "",
                cell(out["summary"].get("direct", {}).get(row), clock=clock),
                "" if goal is None else f"{goal} s",
                ", ".join(f"{n} {v:.2f}" for n, v in (now_s or {}).get("median_steps", {}).items()),
            ]
        )
    harness.print_table(
        ["change", "before: wall", "now: wall", "before: first resp.", "now: first resp.", "direct", "goal", "now: engine steps (s)"],
        rows,
        title=f"pulumi up per change (real engine), {BEFORE[:7]} (before) and this checkout (now) on two hosts, row by row;"
        f" medians of {args.repeat}, {CLIENTS} clients, bakeSeconds 0; load average at the end {out['load_average_at_end'][0]:.1f}",
    )
    # issue 22's user's clock: the engine's median (failed requests counted) beside the tool alone, against the goal
    out["goals"] = {}
    goal_rows = []
    for row, goal in GOALS.items():
        clock = row in RELEASE_ROWS
        key = "median_first" if clock else "median_wall"
        figures = {side: (out["summary"].get(side, {}).get(row) or {}).get(key) for side in ("before", "now", "direct")}
        now_s = out["summary"].get("now", {}).get(row) or {}
        met = figures["now"] is not None and figures["now"] <= goal and now_s.get("failed") == 0
        out["goals"][row] = {"goal_seconds": goal, "clock": "first response" if clock else "wall", **figures, "met": met}
        goal_rows.append(
            [
                row,
                f"{goal} s",
                cell(now_s or None, clock=clock),
                cell(out["summary"].get("before", {}).get(row), clock=clock),
                cell(out["summary"].get("direct", {}).get(row), clock=clock) if row != "noop" else "",
                "yes" if met else "no",
            ]
        )
    harness.print_table(
        ["step (issue 22)", "goal", "now (engine)", "before (engine)", "the tool alone", "met"],
        goal_rows,
        title="issue 22's clock: `pulumi up --yes --skip-preview` to the first response of the target release (no-op: to its end)",
    )
    for name, rest in out["at_rest_rss_mb"].items():
        print(
            f"{name}: the app user's RSS at rest, one app copy {rest['one_copy_mb']} MB, two (keepPreviousWarm) {rest['two_copies_mb']} MB"
        )
    harness.write_json(args.out, {**out, "wall_seconds": round(budget.elapsed(), 1)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
