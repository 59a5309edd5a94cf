"""The user data the program sends to Hetzner passes cloud-init's own schema validator."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.program import run_program

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ8b0pTBp5e8hGQHDgNnLrHHOHxg0VHzUXoTWlBXDk8S deploy"


def schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["cloud-init", "schema", "--config-file", str(path)], capture_output=True, text=True, check=False)


def test_user_data_is_valid_cloud_config(tmp_path: Path) -> None:
    user_data = run_program({"release": "v1", "sshPublicKey": KEY}).get("cognivern-prod-server").inputs["userData"]
    path = tmp_path / "user-data.yaml"
    path.write_text(user_data)
    result = schema(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout
    assert "deprecat" not in (result.stdout + result.stderr).lower()
    # minimal by design: key-only SSH from the first boot, nothing that a later edit would need
    assert "ssh_pwauth: false" in user_data and "runcmd" not in user_data and "write_files" not in user_data


def test_the_validator_rejects_a_broken_config(tmp_path: Path) -> None:
    """Control: the same check fails on an invalid document, so the test above can fail."""
    path = tmp_path / "bad.yaml"
    path.write_text("#cloud-config\nssh_pwauth: [1]\n")
    assert schema(path).returncode != 0
