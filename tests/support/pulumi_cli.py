"""The real Pulumi CLI (built by `make pulumi-tools` into .tools/bin) on a private project copy.

Each `PulumiProject` is a temp directory holding a copy of the repo's Pulumi.yaml, a `file://`
backend and a PULUMI_HOME of its own, the passphrase secrets provider, and no plugin downloads.
Config is set with `pulumi config set` exactly as the README tells users. Programs run inline
through the Automation API: the SDK serves the language runtime inside the Python process and
the CLI connects to it (`--client`), so no `pulumi-language-python` plugin is needed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / ".tools"
PULUMI = TOOLS / "bin" / "pulumi"
VERSION = (REPO / "tools" / "pulumi" / "VERSION").read_text().strip()
PASSPHRASE = "correct horse battery staple (test only)"


def pulumi_binary() -> Path:
    """The built CLI; a missing one fails the test (it must not be skipped)."""
    if not os.access(PULUMI, os.X_OK):
        pytest.fail(f"{PULUMI} is missing: run `make pulumi-tools` (builds the Pulumi CLI {VERSION} from Go modules)")
    return PULUMI


class PulumiProject:
    def __init__(self, tmp: Path, stack: str = "test", project_file: Path = REPO / "Pulumi.yaml") -> None:
        self.binary = pulumi_binary()
        self.dir = tmp / "project"
        self.dir.mkdir(parents=True)
        shutil.copy(project_file, self.dir / "Pulumi.yaml")
        (tmp / "state").mkdir()
        self.state_dir = tmp / "state"
        self.stack = stack
        self.env = {
            "PATH": f"{self.binary.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": os.environ.get("HOME", str(tmp)),
            "PULUMI_HOME": str(tmp / "pulumi-home"),
            "PULUMI_BACKEND_URL": f"file://{self.state_dir}",
            "PULUMI_CONFIG_PASSPHRASE": PASSPHRASE,
            "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
            "PULUMI_SKIP_UPDATE_CHECK": "true",
            "PULUMI_SKIP_CONFIRMATIONS": "true",
            "PULUMI_DIY_BACKEND_NO_LEGACY_WARNING": "true",
            "NO_COLOR": "1",
        }

    def run(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`pulumi ARGS` in the project directory, on this stack's private backend."""
        done = subprocess.run(
            [str(self.binary), *args, "--non-interactive"],
            cwd=self.dir,
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        self.end_leftovers()
        if check and done.returncode != 0:
            raise AssertionError(f"pulumi {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def leftovers(self) -> list[int]:
        """Processes still running with this project's PULUMI_HOME once its CLI has exited: plugins
        the CLI left behind (a stack refused at config validation leaves its language host, PPID 1,
        which checks its engine only every 5 minutes)."""
        mark = f"PULUMI_HOME={self.env['PULUMI_HOME']}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if mark in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    def end_leftovers(self) -> None:
        """Nothing a test started may outlive it."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.leftovers()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 3
            while pids and self.leftovers() and time.monotonic() < deadline:
                time.sleep(0.05)

    def init(self, config: Mapping[str, str] = {}, secrets: Mapping[str, str] = {}) -> None:
        """`pulumi stack init` (passphrase provider), then `pulumi config set [--secret] [--path]`."""
        self.run("stack", "init", self.stack, "--secrets-provider", "passphrase")
        for key, value in config.items():
            self.set(key, value)
        for key, value in secrets.items():
            self.set(key, value, secret=True)

    def set(
        self, key: str, value: str, *, secret: bool = False, plaintext: bool = False, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """`pulumi config set`; `--path` when the key names a leaf (`cognivern:secretEnv.NAME`); value on stdin.

        `plaintext`: the CLI refuses a plain value that "looks like a secret" without `--plaintext`.
        """
        flags = (["--secret"] if secret else ["--plaintext"] if plaintext else []) + (["--path"] if "." in key.split(":", 1)[-1] else [])
        return self.run("config", "set", *flags, key, stdin=value, check=check)

    def inline(self, program: str, op: str = "up") -> subprocess.CompletedProcess[str]:
        """`op` (up/preview) of an inline program of tests/support/inline_program.py, in a child
        process (the Automation API configures the SDK's process-global runtime)."""
        return subprocess.run(
            [sys.executable, "-m", "tests.support.inline_program", program, op, str(self.dir), self.stack],
            cwd=REPO,
            env={**self.env, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def stack_file(self) -> str:
        return (self.dir / f"Pulumi.{self.stack}.yaml").read_text()

    def raw_state(self) -> str:
        """Every file of the file:// backend, concatenated (state, backups, history)."""
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.state_dir.rglob("*")) if p.is_file())
