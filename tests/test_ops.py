"""scripts/ops picks its SSH target from the stack's outputs (server N of several), pins the
server's host key to the stack's `knownHosts` output, and refuses bad input.

A stand-in `pulumi` on PATH answers the calls scripts/pulumi-local makes. In the first tests its
`sshCommand`s are `echo` commands, so what ops would run on the server is visible on stdout. The
host key tests connect to a real sshd (LocalSshd, as root) whose `cognivern-release` is a stand-in
that records that it ran: a wrong pin or no pin must stop ops before anything runs there, even when
the operator's own known_hosts (trust on first use) holds the server's key. The release tool itself
over real SSH is covered by tests/test_scenarios.py (test_11, test_12).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import SYSTEM_PATH
from tests.support.sshd import LocalSshd

pytestmark = pytest.mark.needs_root("the host key tests start a real sshd that logs in as root")

REPO = Path(__file__).resolve().parents[1]
SERVERS = [{"name": f"s{i}", "address": f"192.0.2.{i}", "sshCommand": f"echo via-server-{i} root@192.0.2.{i}"} for i in (1, 2)]
PIN = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ8b0pTBp5e8hGQHDgNnLrHHOHxg0VHzUXoTWlBXDk8S"
KNOWN_HOSTS = f"192.0.2.1 {PIN}\n192.0.2.2 {PIN}\n"
# what ops puts in front of the stack's ssh command: only the stack's pins count
PINNED = r"-o StrictHostKeyChecking=yes -o UserKnownHostsFile=\S+ -o GlobalKnownHostsFile=/dev/null -o UpdateHostKeys=no"


def stand_in_pulumi(tmp_path: Path, ssh_command: str, known_hosts: str) -> dict[str, str]:
    """An environment whose `pulumi` answers scripts/pulumi-local's calls with these outputs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "known_hosts.out").write_text(known_hosts)
    script = bin_dir / "pulumi"
    script.write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in\n'
        "  version) echo v3.274.1 ;;\n"
        '  "stack select prod") exit 0 ;;\n'
        "  *\"stack output servers --json\"*) cat <<'JSON'\n" + json.dumps(SERVERS) + "\nJSON\n;;\n"
        f"  *\"stack output sshCommand\"*) echo '{ssh_command}' ;;\n"
        f'  *"stack output knownHosts"*) cat {tmp_path / "known_hosts.out"} ;;\n'
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


@pytest.fixture
def fake_pulumi(tmp_path: Path) -> dict[str, str]:
    return stand_in_pulumi(tmp_path, "echo via-default root@192.0.2.1", KNOWN_HOSTS)


def ops(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "scripts" / "ops"), *args], capture_output=True, text=True, env=env, timeout=60, check=False)


def test_default_target_is_the_stacks_ssh_command(fake_pulumi: dict[str, str]) -> None:
    result = ops(fake_pulumi, "prod", "list")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(PINNED + r" via-default root@192\.0\.2\.1 -- cognivern-release --root /srv/cognivern list", result.stdout.strip())


def test_server_n_of_several(fake_pulumi: dict[str, str]) -> None:
    result = ops(fake_pulumi, "prod:2", "activate", "v1.2")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert re.fullmatch(PINNED + r" via-server-2 root@192\.0\.2\.2 -- cognivern-release --root /srv/cognivern activate v1\.2", line)
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


# ---------------------------------------------------------------------------- host keys, real sshd
@pytest.fixture(scope="module")
def server() -> Iterator[LocalSshd]:
    """A real sshd whose `cognivern-release` stand-in records each run in <dir>/ran."""
    sshd = LocalSshd(set_env={"PATH": f"{{dir}}/bin:{SYSTEM_PATH}"})
    try:
        (sshd.dir / "bin").mkdir()
        tool = sshd.dir / "bin" / "cognivern-release"
        tool.write_text(f'#!/bin/sh\necho "ran: $*" >>{sshd.dir / "ran"}\necho "tool ran: $*"\n')
        tool.chmod(0o755)
        sshd.start()
        yield sshd
    finally:
        sshd.stop()


@pytest.fixture
def ran(server: LocalSshd) -> Iterator[Path]:
    """The stand-in tool's record, empty at the start of each test."""
    record = server.dir / "ran"
    record.unlink(missing_ok=True)
    yield record
    record.unlink(missing_ok=True)


def other_key(tmp_path: Path) -> str:
    """A host key that is not the server's (what an impostor in the network path would present)."""
    path = tmp_path / "impostor"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


def operator_env(server: LocalSshd, tmp_path: Path, known_hosts: str) -> dict[str, str]:
    """The stack's sshCommand for `server` (with the client key), and an operator whose own
    known_hosts already trusts the server's real key (accepted on a first connection)."""
    tofu = tmp_path / "operator_known_hosts"
    tofu.write_text(f"[127.0.0.1]:{server.port} {server.host_key}\n")
    command = (
        f"ssh -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -i {server.private_key_path}"
        f" -o UserKnownHostsFile={tofu} -p {server.port} root@127.0.0.1"
    )
    return stand_in_pulumi(tmp_path, command, known_hosts)


def test_a_pinned_host_key_connects(server: LocalSshd, ran: Path, tmp_path: Path) -> None:
    env = operator_env(server, tmp_path, f"[127.0.0.1]:{server.port} {server.host_key}\n")
    result = ops(env, "prod", "list")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "tool ran: --root /srv/cognivern list\n"
    assert ran.read_text() == "ran: --root /srv/cognivern list\n"


def test_a_server_presenting_another_key_than_the_pin_is_refused(server: LocalSshd, ran: Path, tmp_path: Path) -> None:
    """The stack pins one key, the server presents another: nothing runs, though the operator's
    own known_hosts would have accepted the server."""
    env = operator_env(server, tmp_path, f"[127.0.0.1]:{server.port} {other_key(tmp_path)}\n")
    result = ops(env, "prod", "activate", "v1")
    assert result.returncode == 255 and "Host key verification failed" in result.stderr, result.stderr
    assert not ran.exists() and "tool ran" not in result.stdout


@pytest.mark.parametrize("known_hosts", ["", "192.0.2.9 {key}\n"], ids=["no-pin", "pin-for-another-server"])
def test_a_stack_without_a_pin_for_the_server_is_refused_unless_the_operator_says_so(
    server: LocalSshd, ran: Path, tmp_path: Path, known_hosts: str
) -> None:
    env = operator_env(server, tmp_path, known_hosts.format(key=server.host_key))
    result = ops(env, "prod", "restore", "data.tar.gz")
    assert result.returncode == 1 and not ran.exists()
    assert f"ops: stack prod pins no host key for [127.0.0.1]:{server.port}" in result.stderr
    assert "COGNIVERN_ALLOW_UNPINNED=1 scripts/ops prod restore data.tar.gz" in result.stderr
    allowed = ops({**env, "COGNIVERN_ALLOW_UNPINNED": "1"}, "prod", "restore", "data.tar.gz")
    assert allowed.returncode == 0, allowed.stderr
    assert (
        "warning: stack prod pins no host key" in allowed.stderr and ran.read_text() == "ran: --root /srv/cognivern restore data.tar.gz\n"
    )
