"""A pristine Debian server from nothing (tests/support/pristine_host.py): base root, boot, provisioning.

    venv/bin/python -m bench.pristine_bench [--release bookworm] [--repeat 3] [--cold-build]
        [--cold-apt] [--engine] [--out reports/pristine-bench.json] [--budget 1800]

Measures, on one pristine host of the release (and, with --cold-build, a base root built from
Debian's mirror into a throwaway cache):
- the first boot (cloud-init's first run included) and `--repeat` reboots: seconds from starting
  the boot to `systemctl is-system-running --wait` answering running/degraded, and from
  `systemctl reboot` to the end of PID 1;
- provisioning from nothing (the program's command, Node from the distribution) and a re-run;
  with --cold-apt the packages are downloaded as a new server would (no kept archives);
- what provisioning installed: every new package with its version, and the npm globals.
With --engine, provisioning is the real `pulumi up` of the program instead (tests/support/stack.py's
PristineStack: existing-host mode pinned to the generated host key, `metadataFilter`, the fixture app
as v1, agentsEnabled, bakeSeconds 2): seconds from the start of `pulumi up` to the first 200 of
/health through nginx (one client asking every 50 ms) and to the end of the run, then for each of
`--repeat` reboots the seconds from the start of the boot to the first 200 (no deploy runs).
Root only; everything it starts is torn down.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bench import harness
from components.settings import SECRET_KEYS
from tests.support.load import Load
from tests.support.pristine_host import PristineHost, base_root
from tests.support.stack import PristineStack


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--release", default="bookworm", help="Debian release (default bookworm)")
    parser.add_argument("--cold-build", action="store_true", help="also build the base root from the mirror into a throwaway cache")
    parser.add_argument("--cold-apt", action="store_true", help="provision without the kept package archives (a new server's downloads)")
    parser.add_argument("--engine", action="store_true", help="deploy with the real pulumi up and time pristine/boot to the first 200")


def main(argv: list[str] | None = None) -> int:
    args, budget = harness.start(__doc__, "pristine-bench", repeat=3, budget=1800, extra=_extra, argv=argv)
    report: dict[str, object] = {"release": args.release, "cold_apt": args.cold_apt}
    rows: list[list[str]] = []
    if args.cold_build:
        with tempfile.TemporaryDirectory(prefix="pristine-cold-") as cache:
            saved = os.environ.get("COGNIVERN_TOOLS_CACHE")
            os.environ["COGNIVERN_TOOLS_CACHE"] = cache
            try:
                budget.say("building the base root from the mirror")
                started = time.monotonic()
                base_root(args.release)
                cold_build = round(time.monotonic() - started, 1)
                report["cold_build_seconds"] = cold_build
            finally:
                if saved is None:
                    del os.environ["COGNIVERN_TOOLS_CACHE"]
                else:
                    os.environ["COGNIVERN_TOOLS_CACHE"] = saved
        rows.append(["base root, cold build", harness.fmt(cold_build)])
    base_root(args.release)  # the cached one: not part of the boot figures
    if args.engine:
        return _engine(args, budget, report, rows)
    with PristineHost(args.release, apt_cache=not args.cold_apt) as host:
        assert host.boot_report is not None
        first_boot = host.boot_report
        budget.say(f"first boot: {first_boot}")
        before = host.packages()
        budget.check()
        started = time.monotonic()
        first = host.provision()
        provision_seconds = round(time.monotonic() - started, 1)
        if first.returncode != 0:
            raise SystemExit(f"provisioning failed: {first.stderr[-2000:]}")
        started = time.monotonic()
        again = host.provision()
        rerun_seconds = round(time.monotonic() - started, 1)
        installed = {k: v for k, v in host.packages().items() if k not in before}
        npm = host.ssh("npm ls -g --depth=0 --json", check=True).stdout
        reboots: list[dict[str, object]] = []
        reboot_boots: list[float] = []
        shutdowns: list[float] = []
        for _ in range(args.repeat):
            budget.check()
            r = host.reboot()
            budget.say(f"reboot: {r}")
            reboots.append({"shutdown_seconds": r.shutdown_seconds, "boot_seconds": r.boot.seconds, "state": r.boot.state})
            reboot_boots.append(r.boot.seconds)
            shutdowns.append(r.shutdown_seconds)
    boot_median, shutdown_median = harness.median(reboot_boots), harness.median(shutdowns)
    report.update(
        first_boot={"seconds": first_boot.seconds, "state": first_boot.state, "failed": first_boot.failed},
        reboots=reboots,
        reboot_boot_median_seconds=boot_median,
        shutdown_median_seconds=shutdown_median,
        provision_seconds=provision_seconds,
        provision_output=first.stdout.splitlines(),
        rerun_seconds=rerun_seconds,
        rerun_changed=[line for line in again.stdout.splitlines() if "ok (" not in line and not line.endswith(": done")],
        installed_packages=installed,
        npm_globals=npm,
    )
    rows += [
        ["first boot to running (cloud-init's first run)", harness.fmt(first_boot.seconds, digits=2)],
        [f"reboot: boot to running (median of {args.repeat})", harness.fmt(boot_median, digits=2)],
        [f"reboot: shutdown (median of {args.repeat})", harness.fmt(shutdown_median, digits=2)],
        ["provisioning from nothing" + (" (cold apt)" if args.cold_apt else " (kept archives)"), harness.fmt(provision_seconds)],
        ["provisioning again", harness.fmt(rerun_seconds)],
        ["packages installed", str(len(installed))],
    ]
    return finish(args, f"pristine {args.release}", rows, installed, report)


def finish(args: argparse.Namespace, title: str, rows: list[list[str]], installed: dict[str, str], report: dict[str, object]) -> int:
    """The table, the main packages' versions (the rest in the JSON), the JSON."""
    harness.print_table([title, "seconds"], rows)
    key = ("nginx", "nodejs", "npm", "curl")
    print("\n" + ", ".join(f"{k} {installed[k]}" for k in key if k in installed) + f", and {len(installed) - len(key)} more (see JSON)")
    harness.write_json(args.out, report)
    return 0


T = TypeVar("T")


def _first_200(stack: PristineStack, action: Callable[[], T], since: Callable[[], float], timeout: float = 60) -> tuple[T, float | None]:
    """Run `action` while one client asks /health through nginx every 50 ms; seconds from `since()`
    (read once `action` has returned: a boot's start is known only then) to the first 200 after it."""
    with Load([stack.url("/health")], clients=1, retry=False) as watch:
        result = action()
        start = since()
        deadline = time.monotonic() + timeout
        while watch.first("ok", start) is None and time.monotonic() < deadline:
            time.sleep(0.05)
    return result, watch.first("ok", start)


def _engine(args: argparse.Namespace, budget: harness.Budget, report: dict[str, object], rows: list[list[str]]) -> int:
    with tempfile.TemporaryDirectory(prefix="pristine-engine-") as tmp, PristineHost(args.release, apt_cache=not args.cold_apt) as host:
        stack = PristineStack(host, Path(tmp), metadataFilter=True, agentsEnabled=True, bakeSeconds=2)
        before = host.packages()
        config = stack.config(release="bench-v1", artifact=stack.artifact("bench-v1"))
        budget.check()
        started = time.monotonic()
        up, to_200 = _first_200(stack, lambda: stack.engine.up(config, secret_keys=SECRET_KEYS), lambda: started)
        budget.say(f"pristine -> first 200: {harness.fmt(to_200)} s (pulumi up {up.seconds:.1f} s)")
        installed = {k: v for k, v in host.packages().items() if k not in before}
        npm = host.ssh("npm ls -g --depth=0 --json", check=True).stdout
        boots: list[float | None] = []
        for _ in range(args.repeat):
            budget.check()
            rebooted, boot_to_200 = _first_200(stack, host.reboot, lambda: host.boot_started)
            budget.say(f"reboot: boot -> first 200 {harness.fmt(boot_to_200, digits=2)} s ({rebooted})")
            boots.append(boot_to_200)
        median_200 = harness.median(boots)
        report.update(
            engine=True,
            pristine_to_first_200_seconds=to_200,
            pulumi_up_seconds=round(up.seconds, 1),
            boot_to_first_200_seconds=boots,
            boot_to_first_200_median_seconds=median_200,
            installed_packages=installed,
            npm_globals=npm,
        )
    apt = " (cold apt)" if args.cold_apt else " (kept archives)"
    rows += [
        [f"pulumi up on a pristine host: start -> first 200{apt}", harness.fmt(to_200)],
        ["pulumi up on a pristine host: the whole run", harness.fmt(up.seconds)],
        [f"reboot: boot -> first 200, no deploy (median of {args.repeat})", harness.fmt(median_200, digits=2)],
        ["packages installed", str(len(installed))],
    ]
    return finish(args, f"pristine {args.release}, real engine", rows, installed, report)


if __name__ == "__main__":
    sys.exit(main())
