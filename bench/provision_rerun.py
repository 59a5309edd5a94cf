"""How long provisioning takes on a host that is already prepared (issue: "re-running changes nothing and takes seconds").

    venv/bin/python -m bench.provision_rerun [--repeat 5] [--out reports/provision-rerun.json] [--budget 600]

Runs the program's exact provisioning command (components.remote.script_command on provision.sh)
over SSH against a disposable TargetHost: once to prepare, then `--repeat`
more times, and reports the median re-run. Loopback only; the host is torn down afterwards.
"""

from __future__ import annotations

import sys
import time

from bench import harness
from components.host import PROVISION, provision_args
from components.remote import script_command
from tests.support.target_host import TargetHost


def main(argv: list[str] | None = None) -> int:
    args, budget = harness.start(__doc__, "provision-rerun", repeat=5, alias="--runs", budget=600, argv=argv)
    with TargetHost() as host:
        argv_ = provision_args(host.settings())
        command = script_command(PROVISION, argv_)
        times = []
        for _ in range(args.repeat + 1):
            budget.check()
            started = time.monotonic()
            last = host.run(command, check=True)
            times.append(round(time.monotonic() - started, 3))
    changed = [line for line in last.stdout.splitlines() if "ok (" not in line and "skipped" not in line and not line.endswith(": done")]
    rerun = harness.median(times[1:])
    result = {"first_seconds": times[0], "rerun_seconds": times[1:], "rerun_median_seconds": rerun, "last_rerun_changed": changed}
    rows = [
        ["first run", harness.fmt(times[0], digits=2)],
        [f"re-run (median of {args.repeat})", harness.fmt(rerun, digits=2)],
        ["changed on last re-run", str(changed or "nothing")],
    ]
    harness.print_table(["provision", "seconds"], rows)
    harness.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
