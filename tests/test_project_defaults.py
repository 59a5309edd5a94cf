"""Pulumi.yaml defaults reach the program the way the Pulumi CLI hands them over: as plain values.

The CLI's mergeConfig (pulumi/pulumi pkg/workspace/config.go) fills every declared key a stack
leaves unset with its `default`, unencrypted. `secretEnv` is declared `default: {}`, so a stack that
sets no secrets (an existing host, staging, a newcomer's first preview) gives the program the plain
string `{}`. The merge is the real CLI's: `pulumi config --json` of a stack set up as the README
says lists every key with the value and secretness the program will get (the CLI runs the same
merge for `config` as for `up`/`preview`), and these tests read the settings from that, check the
program still runs on it, and that a plain secret that holds something is still refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pulumi import RunError

from components.settings import NAMESPACE, SECRET_KEYS, ConfigError, parse_settings
from tests.support.program import run_program
from tests.support.pulumi_cli import REPO, PulumiProject
from tests.support.real_engine import RealEngine

PROD = yaml.safe_load((REPO / "Pulumi.prod.yaml").read_text())["config"]
HOST = {
    "cognivern:release": "v1",
    "cognivern:host": "192.0.2.10",
    "cognivern:artifactUrl": "https://example.invalid/a.tar.gz",
    "cognivern:artifactSha256": "0" * 64,
}
PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ8b0pTBp5e8hGQHDgNnLrHHOHxg0VHzUXoTWlBXDk8S t"


def merged(project: PulumiProject) -> tuple[dict[str, str], set[str]]:
    """The stack's config as the CLI hands it to the program (`config --json --show-secrets`): values, secret keys."""
    listed = json.loads(project.run("config", "--json", "--show-secrets").stdout)
    return {key: entry["value"] for key, entry in listed.items()}, {key for key, entry in listed.items() if entry["secret"]}


def settings_of(project: PulumiProject) -> Any:
    values, secret = merged(project)
    return parse_settings(lambda k: values.get(f"{NAMESPACE}:{k}"), lambda k: f"{NAMESPACE}:{k}" in secret)


def stack(
    tmp: Path, config: dict[str, Any], project_file: Path = REPO / "Pulumi.yaml", plain_leaves: dict[str, str] | None = None
) -> PulumiProject:
    """A stack with `config` (plain values: `config set-all --json`, objects and arrays as structured values)
    and `plain_leaves` set the way a user sets one by mistake: `config set --path KEY.NAME --plaintext`.
    Its program is empty (registers nothing) and runs in the repository's venv."""
    project = PulumiProject(tmp, project_file=project_file)
    (project.dir / "__main__.py").write_text("")
    (project.dir / "venv").symlink_to(REPO / "venv")
    project.init()
    entries = {k: {"value": v if isinstance(v, str) else json.dumps(v), "secret": False} for k, v in config.items()}
    for key, value in config.items():
        if isinstance(value, (dict, list)):
            entries[key]["objectValue"] = value
        elif isinstance(value, bool):
            entries[key]["value"] = str(value).lower()
    project.run("config", "set-all", "--json", json.dumps(entries))
    for key, value in (plain_leaves or {}).items():
        project.set(key, value, plaintext=True)
    return project


def test_defaults_are_merged_plain(tmp_path: Path) -> None:
    """mergeConfig, observed: every unset key is listed with its declared default, none of them secret."""
    values, secret = merged(stack(tmp_path, {"cognivern:release": "v9", "cognivern:port": "8080"}))
    assert values["cognivern:secretEnv"] == "{}"
    assert values["cognivern:sshPrivateKey"] == ""
    assert values["cognivern:sshAllowedCidrs"] == '["0.0.0.0/0","::/0"]'
    assert (values["cognivern:protect"], values["cognivern:release"], values["cognivern:port"]) == ("true", "v9", "8080")
    assert secret == set()
    declared = yaml.safe_load((REPO / "Pulumi.yaml").read_text())["config"]
    assert {k.split(":", 1)[1] for k in values} == set(declared), "every declared key, required ones only when set"
    assert (tmp_path / "project" / "Pulumi.test.yaml").read_text().count("cognivern:") == 2, "the defaults are not written"


def test_prod_stack_without_secrets_passes_settings_under_the_cli_merge(tmp_path: Path) -> None:
    """The bug: Pulumi.prod.yaml plus defaults used to fail with 'secretEnv: must be stored encrypted'."""
    settings = settings_of(stack(tmp_path, {**PROD, "cognivern:sshPublicKey": PUBLIC_KEY}))
    assert settings.secret_env == {} and settings.ssh_private_key is None
    assert settings.release == PROD["cognivern:release"]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_plain_secret_with_content_is_still_refused_after_the_merge(tmp_path: Path, key: str) -> None:
    if key == "secretEnv":
        project = stack(tmp_path, HOST, plain_leaves={"cognivern:secretEnv.K": "v"})
    else:
        project = stack(tmp_path, {**HOST, f"cognivern:{key}": "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----"})
    with pytest.raises(ConfigError, match=f"cognivern:{key}: must be stored encrypted"):
        settings_of(project)


def test_program_runs_on_an_existing_host_stack_that_sets_no_secrets(tmp_path: Path) -> None:
    """The real program under the real CLI: the stack config validates and `pulumi preview` plans every resource."""
    report = RealEngine(tmp_path).preview(HOST)
    assert report.ok, report.output
    assert set(report.ops().values()) == {"create"} and any(name.endswith("-release-activate") for name in report.ops())


def test_program_refuses_a_plain_non_empty_secret_env_even_with_defaults(tmp_path: Path) -> None:
    values, secret = merged(stack(tmp_path, HOST, plain_leaves={"cognivern:secretEnv.K": "v"}))
    assert "cognivern:secretEnv" not in secret
    with pytest.raises(RunError, match="cognivern:secretEnv: must be stored encrypted"):
        run_program(values, secret_keys=tuple(secret))


def with_declaration(tmp_path: Path, key: str, **changes: Any) -> Path:
    project = yaml.safe_load((REPO / "Pulumi.yaml").read_text())
    project["config"][key].update(changes)
    path = tmp_path / "Pulumi.yaml"
    path.write_text(yaml.safe_dump(project, sort_keys=False))
    return path


def test_secret_true_with_a_default_fails_every_stack_that_leaves_the_key_unset(tmp_path: Path) -> None:
    """The real CLI validates the stack before the program runs: the default is merged plain, then `secret: true` refuses it."""
    project = stack(tmp_path / "declared", HOST, with_declaration(tmp_path, "secretEnv", secret=True))
    refused = project.run("preview", check=False)
    assert refused.returncode != 0
    assert project.leftovers() == [], "the refused preview's language host outlived the CLI"
    assert "validating stack config: Stack 'test' with configuration key 'secretEnv' must be encrypted as it's secret" in refused.stderr
    project.set("cognivern:secretEnv.K", "v", secret=True)
    assert project.run("preview", check=False).returncode == 0  # control: the key set encrypted passes
    # (the repository's own Pulumi.yaml passes that validation with no secret set: the preview above)


def test_no_declared_key_combines_secret_true_with_a_default() -> None:
    """`secret: true` plus `default` breaks every stack that does not set the key (see the test above)."""
    declared = yaml.safe_load((REPO / "Pulumi.yaml").read_text())["config"]
    both = [key for key, decl in declared.items() if decl.get("secret") and "default" in decl]
    assert both == [], f"{both}: the CLI merges the default as a plain value, then refuses it as not encrypted"
