"""Pulumi.yaml defaults reach the program the way the Pulumi CLI hands them over: as plain values.

The CLI's mergeConfig (pulumi/pulumi pkg/workspace/config.go) fills every declared key a stack
leaves unset with its `default`, unencrypted. `secretEnv` is declared `default: {}`, so a stack that
sets no secrets (an existing host, staging, a newcomer's first preview) gives the program the plain
string `{}`. These tests apply that merge (tests/engine/project_config.py) and check the program
still runs, while a plain secret that holds something is still refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pulumi import RunError

from components.settings import NAMESPACE, SECRET_KEYS, ConfigError, parse_settings
from tests.engine.engine import Engine
from tests.engine.project_config import ConfigValidationError, check_secret_declarations, merge_project_defaults, project_defaults
from tests.support.program import run_program

REPO = Path(__file__).resolve().parents[1]
PROD = yaml.safe_load((REPO / "Pulumi.prod.yaml").read_text())["config"]
HOST = {"release": "v1", "host": "192.0.2.10", "artifactUrl": "https://example.invalid/a.tar.gz", "artifactSha256": "0" * 64}


def as_stack_values(config: dict[str, Any]) -> dict[str, str]:
    """What the CLI hands the program for a stack file's values: strings, objects as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) if not isinstance(v, bool) else str(v).lower() for k, v in config.items()}


def settings_as_the_cli_runs_them(stack: dict[str, str], secret: tuple[str, ...] = ()) -> Any:
    merged = merge_project_defaults(stack)
    return parse_settings(lambda k: merged.get(f"{NAMESPACE}:{k}"), lambda k: k in secret)


def test_defaults_are_merged_plain_like_merge_config() -> None:
    defaults = project_defaults()
    assert defaults["cognivern:secretEnv"] == "{}"
    assert defaults["cognivern:sshPrivateKey"] == ""
    assert defaults["cognivern:sshAllowedCidrs"] == '["0.0.0.0/0","::/0"]'
    assert (defaults["cognivern:port"], defaults["cognivern:protect"]) == ("3000", "true")
    assert "cognivern:release" not in defaults  # required: no default
    merged = merge_project_defaults({"release": "v9", "cognivern:port": "8080"})
    assert (merged["cognivern:release"], merged["cognivern:port"]) == ("v9", "8080")


def test_prod_stack_without_secrets_passes_settings_under_the_cli_merge() -> None:
    """The bug: Pulumi.prod.yaml plus defaults used to fail with 'secretEnv: must be stored encrypted'."""
    stack = as_stack_values(PROD)
    stack["cognivern:sshPublicKey"] = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ8b0pTBp5e8hGQHDgNnLrHHOHxg0VHzUXoTWlBXDk8S t"
    settings = settings_as_the_cli_runs_them(stack)
    assert settings.secret_env == {} and settings.ssh_private_key is None


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_plain_secret_with_content_is_still_refused_after_the_merge(key: str) -> None:
    value = '{"K": "v"}' if key == "secretEnv" else "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----"
    with pytest.raises(ConfigError, match=f"cognivern:{key}: must be stored encrypted"):
        settings_as_the_cli_runs_them({**as_stack_values(HOST), f"cognivern:{key}": value})


def test_program_runs_on_an_existing_host_stack_that_sets_no_secrets() -> None:
    run = run_program(merge_project_defaults(HOST))
    assert any(r.type == "command:remote:Command" for r in run.registrations)


def test_program_refuses_a_plain_non_empty_secret_env_even_with_defaults() -> None:
    with pytest.raises(RunError, match="cognivern:secretEnv: must be stored encrypted"):
        run_program(merge_project_defaults({**HOST, "secretEnv": '{"K": "v"}'}))


def test_stand_in_applies_defaults_and_only_marks_keys_the_stack_sets(tmp_path: Path) -> None:
    """The stand-in is given secret_keys=('secretEnv', ...) by every scenario; an unset key is still a plain default."""
    report = Engine(tmp_path / "state").preview(HOST, secret_keys=SECRET_KEYS)
    assert report.error is None and report.ops()


def with_declaration(tmp_path: Path, key: str, **changes: Any) -> Path:
    project = yaml.safe_load((REPO / "Pulumi.yaml").read_text())
    project["config"][key].update(changes)
    path = tmp_path / "Pulumi.yaml"
    path.write_text(yaml.safe_dump(project, sort_keys=False))
    return path


def test_secret_true_with_a_default_fails_every_stack_that_leaves_the_key_unset(tmp_path: Path) -> None:
    """As the real CLI 3.274.1 does: the default is merged plain, then `secret: true` refuses it."""
    project_file = with_declaration(tmp_path, "secretEnv", secret=True)
    merged = merge_project_defaults(HOST, project_file)
    with pytest.raises(ConfigValidationError, match="configuration key 'secretEnv' must be encrypted as it's secret"):
        check_secret_declarations("test", merged, set(), project_file)
    check_secret_declarations("test", {**merged, "cognivern:secretEnv": '{"K": "v"}'}, {"cognivern:secretEnv"}, project_file)


def test_no_declared_key_combines_secret_true_with_a_default() -> None:
    """`secret: true` plus `default` breaks every stack that does not set the key (see the test above)."""
    declared = yaml.safe_load((REPO / "Pulumi.yaml").read_text())["config"]
    both = [key for key, decl in declared.items() if decl.get("secret") and "default" in decl]
    assert both == [], f"{both}: the CLI merges the default as a plain value, then refuses it as not encrypted"


def test_repo_project_passes_the_clis_secret_declaration_check_for_a_stack_without_secrets() -> None:
    check_secret_declarations("test", merge_project_defaults(HOST), set())
