"""scripts/ops picks its SSH target from the stack's outputs (server N of several) and refuses bad input.

A stand-in `pulumi` on PATH answers the calls scripts/pulumi-local makes; its `sshCommand`s are
`echo` commands, so what ops would run on the server is visible on stdout. The real SSH path is
covered by tests/test_scenarios.py (test_11, test_12).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVERS = [{"name": f"s{i}", "address": f"192.0.2.{i}", "sshCommand": f"echo via-server-{i} root@192.0.2.{i}"} for i in (1, 2)]


@pytest.fixture
def fake_pulumi(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "pulumi"
    script.write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in\n'
        "  version) echo v3.274.1 ;;\n"
        '  "stack select prod") exit 0 ;;\n'
        "  *\"stack output servers --json\"*) cat <<'JSON'\n" + json.dumps(SERVERS) + "\nJSON\n;;\n"
        '  *"stack output sshCommand"*) echo "echo via-default root@192.0.2.1" ;;\n'
        '  *"config get cognivern:root"*) echo /srv/cognivern ;;\n'
        '  *"config get"*) exit 1 ;;\n'
        '  *) echo "unexpected: $*" >&2; exit 9 ;;\n'
        "esac\n"
    )
    script.chmod(0o755)
    (tmp_path / "state").mkdir()
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("COGNIVERN_")},
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PULUMI_BACKEND_URL": f"file://{tmp_path / 'state'}",
        "PULUMI_CONFIG_PASSPHRASE": "test-only",
    }


def ops(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "scripts" / "ops"), *args], capture_output=True, text=True, env=env, timeout=60, check=False)


def test_default_target_is_the_stacks_ssh_command(fake_pulumi: dict[str, str]) -> None:
    result = ops(fake_pulumi, "prod", "list")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "via-default root@192.0.2.1 -- cognivern-release --root /srv/cognivern list"


def test_server_n_of_several(fake_pulumi: dict[str, str]) -> None:
    result = ops(fake_pulumi, "prod:2", "activate", "v1.2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "via-server-2 root@192.0.2.2 -- cognivern-release --root /srv/cognivern activate v1.2"
    missing = ops(fake_pulumi, "prod:3", "list")
    assert missing.returncode != 0 and "has 2 server(s), not 3" in missing.stderr


@pytest.mark.parametrize(
    "args",
    [("prod:x", "list"), ("prod;id", "list"), ("prod", "activate", "v1;touch /tmp/x"), ("prod", "restore", "a b"), ("prod", "nope")],
    ids=["server", "stack", "release-id", "backup-name", "action"],
)
def test_bad_input_is_refused_before_anything_runs(fake_pulumi: dict[str, str], args: tuple[str, ...]) -> None:
    result = ops(fake_pulumi, *args)
    assert result.returncode == 2
    assert "cognivern-release" not in result.stdout


def test_arguments_are_validated_before_the_stack_is_looked_up(tmp_path: Path) -> None:
    """No pulumi on PATH at all: a bad command must still be refused as such, not as "CLI not found"."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PULUMI_CLI_URL": f"file://{tmp_path}/nowhere"}
    result = ops(env, "prod", "frobnicate")
    assert result.returncode == 2
    assert "unknown command: frobnicate" in result.stderr
    assert "pulumi" not in result.stderr.split("Operator commands")[0]
    assert "bad array subscript" not in result.stderr


def test_help_exits_zero_and_names_the_override() -> None:
    result = ops(dict(os.environ), "--help")
    assert result.returncode == 0
    assert "COGNIVERN_SSH" in result.stdout and "activate ID" in result.stdout


def test_override_reaches_the_server_without_pulumi(tmp_path: Path) -> None:
    """The emergency rollback: COGNIVERN_SSH/COGNIVERN_ROOT, and no pulumi anywhere (a pulumi that runs would fail the test)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    trap = bin_dir / "pulumi"
    trap.write_text(f"#!/bin/sh\ntouch {tmp_path / 'pulumi-ran'}\nexit 1\n")
    trap.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "COGNIVERN_SSH": "echo ssh -p 2222 deploy@198.51.100.7"}
    result = ops(env, "prod", "activate", "20261127090000-def5678")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "ssh -p 2222 deploy@198.51.100.7 -- sudo -n cognivern-release --root /opt/cognivern activate 20261127090000-def5678"
    )
    assert "scripts/pulumi-local prod config set cognivern:release 20261127090000-def5678" in result.stderr
    result = ops({**env, "COGNIVERN_ROOT": "/srv/app"}, "prod", "list")
    assert result.stdout.strip() == "ssh -p 2222 deploy@198.51.100.7 -- sudo -n cognivern-release --root /srv/app list"
    assert not (tmp_path / "pulumi-ran").exists()
