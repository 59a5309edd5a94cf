"""The real Pulumi CLI (make pulumi-tools) on the project's config: defaults, secrets, state.

What the CLI does to the stack config before the program sees it is the CLI's, not ours: these
tests set config with `pulumi config set` as the README says and run, through the real engine, an
inline program that reads the settings exactly as __main__.py does (the Automation API; no
resource is registered). They fail (never skip) when the CLI has not been built. The merge of
Pulumi.yaml's defaults: tests/test_project_defaults.py; the whole program: tests/test_scenarios.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.pulumi_cli import REPO, VERSION, PulumiProject, pulumi_binary

PROD = yaml.safe_load((REPO / "Pulumi.prod.yaml").read_text())["config"]
RELEASE = PROD["cognivern:release"]
HOST = {"cognivern:release": RELEASE, "cognivern:host": "192.0.2.10"}
SECRET_VALUE = "s3cr3t-'quote' $(id) value-7f1c"
SECOND_SECRET = "another-secret-a9e2"
KEY_BODY = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ-test-only-4c7d"
PRIVATE_KEY = f"-----BEGIN OPENSSH PRIVATE KEY-----\n{KEY_BODY}\n-----END OPENSSH PRIVATE KEY-----\n"


def result(done: Any) -> dict[str, Any]:
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result line:\n{done.stdout}\n{done.stderr}"
    out: dict[str, Any] = json.loads(lines[-1])
    return out


@pytest.fixture
def project(tmp_path: Path) -> PulumiProject:
    return PulumiProject(tmp_path)


def test_the_cli_is_the_pinned_build(project: PulumiProject) -> None:
    assert pulumi_binary() == project.binary
    assert project.run("version").stdout.strip() == f"v{VERSION}"  # (its env: a private PULUMI_HOME, no log in root's)


def test_main_reads_settings_with_the_call_the_inline_program_uses() -> None:
    """The inline `settings` program stands for __main__.py's settings read: keep them one call."""
    call = 'parse_settings(config.get, lambda key: is_config_secret(f"{NAMESPACE}:{key}"), stack=pulumi.get_stack())'
    assert call in (REPO / "__main__.py").read_text()
    assert call in (REPO / "tests" / "support" / "inline_program.py").read_text()


def test_stack_without_secret_env_runs_under_the_real_cli(project: PulumiProject) -> None:
    """The bug: a stack that never sets secretEnv got 'cognivern:secretEnv: must be stored encrypted'."""
    project.init(HOST)
    out = result(project.inline("settings"))
    assert out["ok"], out["error"]
    assert out["outputs"]["secretEnvNames"]["value"] == []
    assert out["outputs"]["release"]["value"] == RELEASE


def test_secrets_set_as_the_readme_says_reach_the_program_and_stay_encrypted(project: PulumiProject) -> None:
    project.init(HOST)
    project.set("cognivern:secretEnv.SAPIENCE_PRIVATE_KEY", SECRET_VALUE, secret=True)
    project.set("cognivern:secretEnv.RECALL_API_KEY", SECOND_SECRET, secret=True)
    project.set("cognivern:sshPrivateKey", PRIVATE_KEY, secret=True)  # from stdin, as `< ~/.ssh/key`
    out = result(project.inline("settings"))
    assert out["ok"], out["error"]
    assert out["outputs"]["hasPrivateKey"]["value"] is True
    assert out["outputs"]["secretEnvNames"]["value"] == ["RECALL_API_KEY", "SAPIENCE_PRIVATE_KEY"]
    assert out["outputs"]["secretEnv"] == {"value": {"SAPIENCE_PRIVATE_KEY": SECRET_VALUE, "RECALL_API_KEY": SECOND_SECRET}, "secret": True}
    exported = project.run("stack", "export").stdout
    shown = project.run("stack", "export", "--show-secrets").stdout
    assert KEY_BODY in project.run("config", "get", "cognivern:sshPrivateKey").stdout
    for secret in (SECRET_VALUE, SECOND_SECRET, KEY_BODY):
        if secret != KEY_BODY:  # the key is only in the stack file (encrypted); secretEnv is also exported
            assert secret in shown  # the value is in the state, encrypted
        assert secret not in exported
        assert secret not in project.raw_state()
        assert secret not in project.stack_file()
        assert json.dumps(secret)[1:-1] not in project.raw_state()


def test_plain_secret_env_set_without_secret_is_refused_by_the_program(project: PulumiProject) -> None:
    project.init(HOST)
    refused = project.set("cognivern:secretEnv.SAPIENCE_PRIVATE_KEY", SECRET_VALUE, check=False)
    assert refused.returncode != 0 and "looks like a secret; rerun with --secret" in refused.stderr  # the CLI's own guard
    project.set("cognivern:secretEnv.SAPIENCE_PRIVATE_KEY", SECRET_VALUE, plaintext=True)
    out = result(project.inline("settings", op="preview"))
    assert not out["ok"]
    assert "cognivern:secretEnv: must be stored encrypted" in out["error"]


def test_plain_leaf_next_to_secret_ones_is_secret_for_the_program(project: PulumiProject) -> None:
    """A plain `--path` leaf beside secure ones: the object counts as secret (Value.Secure of any leaf).

    The plain leaf is written in clear text to the stack file; the program cannot tell (platform-facts).
    """
    project.init(HOST)
    project.set("cognivern:secretEnv.SAPIENCE_PRIVATE_KEY", SECRET_VALUE, secret=True)
    project.set("cognivern:secretEnv.PLAIN_ONE", "visible-in-stack-file", plaintext=True)
    assert "visible-in-stack-file" in project.stack_file()
    out = result(project.inline("settings"))
    assert out["ok"], out["error"]
    assert out["outputs"]["secretEnvNames"]["value"] == ["PLAIN_ONE", "SAPIENCE_PRIVATE_KEY"]
