"""A pristine Debian server from nothing (tests/support/pristine_host.py): base root, boot, provisioning.

    venv/bin/python -m bench.pristine_bench [--release bookworm] [--repeat 3] [--cold-build]
        [--cold-apt] [--out reports/pristine-bench.json] [--budget 1800]

Measures, on one pristine host of the release (and, with --cold-build, a base root built from
Debian's mirror into a throwaway cache):
- the first boot (cloud-init's first run included) and `--repeat` reboots: seconds from starting
  the boot to `systemctl is-system-running --wait` answering running/degraded, and from
  `systemctl reboot` to the end of PID 1;
- provisioning from nothing (the program's command, Node from the distribution) and a re-run;
  with --cold-apt the packages are downloaded as a new server would (no kept archives);
- what provisioning installed: every new package with its version, and the npm globals.
Root only; everything it starts is torn down.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from bench import harness
from tests.support.pristine_host import PristineHost, base_root


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--release", default="bookworm", help="Debian release (default bookworm)")
    parser.add_argument("--cold-build", action="store_true", help="also build the base root from the mirror into a throwaway cache")
    parser.add_argument("--cold-apt", action="store_true", help="provision without the kept package archives (a new server's downloads)")


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
    harness.print_table([f"pristine {args.release}", "seconds"], rows)
    key = ("nginx", "nodejs", "npm", "curl")
    print("\n" + ", ".join(f"{k} {installed[k]}" for k in key if k in installed) + f", and {len(installed) - len(key)} more (see JSON)")
    harness.write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
