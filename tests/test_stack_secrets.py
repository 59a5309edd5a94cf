"""No secret in clear text in a stack file, and the exposure warnings every preview repeats.

`pulumi config set --path 'cognivern:secretEnv.NEW' value` without `--secret` writes that leaf in
clear text, and the program cannot see it (the object counts as secret once any leaf is), so the
committed stack files are checked here, and the program reads its own stack file and warns.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.security import plain_secret_leaves, stack_file_warnings
from components.settings import SECRET_KEYS
from tests.support.program import REPO, run_program
from tests.support.pulumi_cli import PulumiProject
from tests.test_program import EXISTING, HETZNER

LEAKY = {
    "cognivern:release": "v1",
    "cognivern:secretEnv": {"GOOD": {"secure": "v1:abc"}, "NEW": "clear-text-value", "NESTED": {"X": "y"}, "EMPTY": ""},
    "cognivern:sshPrivateKey": "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----\n",
    "cognivern:env": {"NODE_ENV": "production"},
}


@pytest.mark.parametrize("path", sorted(REPO.glob("Pulumi.*.yaml")), ids=lambda p: p.name)
def test_committed_stack_files_hold_secret_keys_only_encrypted(path: Path) -> None:
    config: dict[str, Any] = (yaml.safe_load(path.read_text()) or {}).get("config") or {}
    assert plain_secret_leaves(config) == []


def test_negative_control_a_clear_text_leaf_beside_encrypted_ones_is_found() -> None:
    assert sorted(plain_secret_leaves(LEAKY)) == ["cognivern:secretEnv.NESTED.X", "cognivern:secretEnv.NEW", "cognivern:sshPrivateKey"]
    assert plain_secret_leaves({"cognivern:secretEnv": {"A": {"secure": "x"}}, "cognivern:sshPrivateKey": {"secure": "y"}}) == []
    assert set(SECRET_KEYS) == {"secretEnv", "sshPrivateKey"}


def test_there_is_at_least_the_prod_stack_file_to_check() -> None:
    assert (REPO / "Pulumi.prod.yaml") in set(REPO.glob("Pulumi.*.yaml"))


@pytest.fixture
def leaky_stack() -> Iterator[str]:
    """A stack file with clear-text secrets next to the project, under a name no one else uses."""
    stack = f"leaky-{uuid.uuid4().hex[:8]}"
    path = REPO / f"Pulumi.{stack}.yaml"
    path.write_text(yaml.safe_dump({"config": LEAKY}))
    try:
        yield stack
    finally:
        path.unlink()


def test_the_program_warns_when_its_stack_file_holds_a_clear_text_secret(leaky_stack: str) -> None:
    run = run_program(EXISTING, stack=leaky_stack)
    found = [w for w in run.warnings if "in clear text" in w]
    assert len(found) == 3, run.warnings
    assert any(
        "cognivern:secretEnv.NEW" in w and "config set --secret --path 'cognivern:secretEnv.NEW'" in w and "scripts/pulumi-local " in w
        for w in found
    )
    assert not [w for w in run_program(EXISTING).warnings if "in clear text" in w]  # Pulumi.prod.yaml is clean


def test_stack_file_warnings_ignore_a_missing_file(tmp_path: Path) -> None:
    assert stack_file_warnings(tmp_path / "Pulumi.none.yaml") == []


def test_pulumi_yaml_declares_no_secret_key_the_cli_would_refuse_when_unset() -> None:
    """`secret: true` is deliberately not declared on secretEnv/sshPrivateKey.

    The CLI merges a declared default into the stack config as a plain value and then requires
    every `secret: true` key to be encrypted (pulumi/pulumi pkg/workspace/config.go, mergeConfig
    then validateStackConfigValue: "must be encrypted as it's secret"); without a default an unset
    key is "missing configuration". Either way a stack that leaves secretEnv or sshPrivateKey unset
    (ssh-agent, no secrets yet) would fail every preview. And it would not catch the real mistake:
    a clear-text leaf beside encrypted ones counts as secure (`Value.Secure()` of the object).
    """
    project = yaml.safe_load((REPO / "Pulumi.yaml").read_text())["config"]
    refused_when_unset = [key for key, decl in project.items() if decl.get("secret")]
    assert refused_when_unset == []


def test_ssh_open_to_the_world_warns_with_the_command_on_every_preview() -> None:
    open_ssh = {k: v for k, v in HETZNER.items() if k != "sshAllowedCidrs"}
    for preview in (False, True):
        run = run_program(open_ssh, preview=preview)
        (warning,) = [w for w in run.warnings if "SSH (port 22) is open" in w]
        assert "0.0.0.0/0, ::/0" in warning
        assert (
            "config set --path 'cognivern:sshAllowedCidrs[0]' YOUR.IP.ADDRESS/32" in warning
            and "scripts/pulumi-local prod config rm" in warning
        )
    assert not [w for w in run_program(HETZNER).warnings if "SSH (port 22)" in w]
    assert not [w for w in run_program(EXISTING).warnings if "SSH (port 22)" in w]  # no firewall of ours there


def test_the_check_finds_exactly_the_leaf_the_real_cli_writes_in_clear_text(tmp_path: Path) -> None:
    """`pulumi config set --path` (make pulumi-tools) of a plain leaf beside an encrypted one: the CLI
    accepts it and Pulumi counts the object as secret, but the stack file shows it and so do we."""
    project = PulumiProject(tmp_path)
    project.init({"cognivern:release": "v1", "cognivern:host": "192.0.2.10"})
    project.set("cognivern:secretEnv.GOOD", "an-encrypted-value", secret=True)
    project.set("cognivern:secretEnv.NEW", "typed-without-secret", plaintext=True)
    listed = json.loads(project.run("config", "--json").stdout)
    assert listed["cognivern:secretEnv"]["secret"] is True, "Pulumi's view: the whole object is secret"
    config = yaml.safe_load(project.stack_file())["config"]
    assert plain_secret_leaves(config) == ["cognivern:secretEnv.NEW"]
    (warning,) = stack_file_warnings(project.dir / f"Pulumi.{project.stack}.yaml")
    assert "cognivern:secretEnv.NEW in clear text" in warning and "an-encrypted-value" not in project.stack_file()
