"""How long provisioning takes on a host that is already prepared (issue: "re-running changes nothing and takes seconds").

    venv/bin/python -m bench.provision_rerun [--runs 5] [--out reports/provision-rerun.json]

Runs the program's exact provisioning command (components.remote.script_command on provision.sh,
release tool on stdin) over SSH against a disposable TargetHost: once to prepare, then `--runs`
more times, and reports the median re-run. Loopback only; the host is torn down afterwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from components.host import PROVISION, provision_args, release_tool_bundle
from components.remote import script_command
from tests.support.target_host import TargetHost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("reports/provision-rerun.json"))
    args = parser.parse_args(argv)
    with TargetHost() as host:
        argv_ = provision_args(host.settings())
        command, tool = script_command(PROVISION, argv_), release_tool_bundle()
        times = []
        for _ in range(args.runs + 1):
            started = time.monotonic()
            last = host.run(command, stdin=tool, check=True)
            times.append(round(time.monotonic() - started, 3))
    changed = [line for line in last.stdout.splitlines() if "ok (" not in line and "skipped" not in line and not line.endswith(": done")]
    result = {"first_seconds": times[0], "rerun_seconds": times[1:], "rerun_median_seconds": statistics.median(times[1:])}
    result["last_rerun_changed"] = changed
    print(f"{'provision':<22}| seconds")
    print(f"{'first run':<22}| {times[0]:.2f}")
    print(f"{'re-run (median of ' + str(args.runs) + ')':<22}| {result['rerun_median_seconds']:.2f}")
    print(f"{'changed on last re-run':<22}| {changed or 'nothing'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
