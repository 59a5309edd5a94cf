"""scripts/ops picks its SSH target from the stack's outputs (server N of several) and refuses bad input.

A stand-in `pulumi` on PATH answers the two calls scripts/pulumi-local makes; its `sshCommand`s are
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
        '  "stack select --create"*) exit 0 ;;\n'
        "  *\"stack output servers --json\"*) cat <<'JSON'\n" + json.dumps(SERVERS) + "\nJSON\n;;\n"
        '  *"stack output sshCommand"*) echo "echo via-default root@192.0.2.1" ;;\n'
        '  *"config get cognivern:root"*) echo /srv/cognivern ;;\n'
        '  *"config get"*) exit 1 ;;\n'
        '  *) echo "unexpected: $*" >&2; exit 9 ;;\n'
        "esac\n"
    )
    script.chmod(0o755)
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
