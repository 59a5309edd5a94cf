"""The real Pulumi CLI behind a recording `pulumi` on PATH: what each call was asked, of which stack, and how it ended.

    tests put `pulumi` (a two-line script running this module) first on PATH; it appends one JSON
    line per call to $RECORD_PULUMI_LOG, then exits with the real CLI's exit code:
    {"argv": [...], "backend": PULUMI_BACKEND_URL or null, "passphrase": a hash of the passphrase
     (PULUMI_CONFIG_PASSPHRASE, or the contents of PULUMI_CONFIG_PASSPHRASE_FILE) or null,
     "stack": the stack the call names (`--stack X`, `stack init|select X`) or null, "exit": N}

The real CLI ($RECORD_PULUMI_REAL) does the work: stack files, state, secrets and errors are its
own. Only the recording is added, because which backend, stack and passphrase a documented
command reaches is not visible in the CLI's output.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path


def passphrase_id() -> str | None:
    value = os.environ.get("PULUMI_CONFIG_PASSPHRASE")
    path = os.environ.get("PULUMI_CONFIG_PASSPHRASE_FILE")
    if not value and path:
        try:
            value = Path(path).read_text()
        except OSError:
            return None
    return hashlib.sha256(value.encode()).hexdigest()[:16] if value else None


def stack_of(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg in ("--stack", "-s") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--stack="):
            return arg.split("=", 1)[1]
    words = [a for a in argv if not a.startswith("-")]
    return words[2] if words[:2] in (["stack", "init"], ["stack", "select"]) and len(words) > 2 else None


def main() -> int:
    argv = sys.argv[1:]
    code = subprocess.run([os.environ["RECORD_PULUMI_REAL"], *argv], check=False).returncode
    entry = {"argv": argv, "backend": os.environ.get("PULUMI_BACKEND_URL"), "passphrase": passphrase_id(), "stack": stack_of(argv)}
    with open(os.environ["RECORD_PULUMI_LOG"], "a") as log:
        log.write(json.dumps({**entry, "exit": code}) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
