"""The real `__main__.py` under the SDK's mock monitor: resources, options, order and secrecy."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from pulumi import RunError

from components.release import ArtifactError, resolve_artifact
from tests.support.program import DefaultMocks, Registration, is_secret, run_program, unsecret

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ8b0pTBp5e8hGQHDgNnLrHHOHxg0VHzUXoTWlBXDk8S deploy"
HETZNER = {"release": "v1", "sshPublicKey": KEY, "sshAllowedCidrs": ["198.51.100.0/24"]}
EXISTING = {"release": "v1", "host": "192.0.2.10"}
SERVER = "hcloud:index/server:Server"
COMMAND = "command:remote:Command"
COPY = "command:remote:CopyToRemote"


def deps_names(run: Any, reg: Registration) -> set[str]:
    by_urn = {r.urn: r.name for r in run.registrations}
    return {by_urn[u] for u in reg.dependencies}


def test_hetzner_stack_creates_a_protected_firewalled_server() -> None:
    run = run_program(HETZNER)
    hcloud = sorted(r.type for r in run.registrations if r.type.startswith("hcloud:"))
    assert hcloud == ["hcloud:index/firewall:Firewall", SERVER, "hcloud:index/sshKey:SshKey"]
    server = run.get("cognivern-prod-server")
    firewall = run.get("cognivern-prod-firewall")
    key = run.get("cognivern-prod-ssh-key")
    assert key.inputs["publicKey"] == KEY
    rules = {(r["protocol"], r.get("port"), tuple(r["sourceIps"])) for r in firewall.inputs["rules"]}
    assert rules == {
        ("tcp", "22", ("198.51.100.0/24",)),
        ("tcp", "80", ("0.0.0.0/0", "::/0")),
        ("tcp", "443", ("0.0.0.0/0", "::/0")),
        ("icmp", None, ("0.0.0.0/0", "::/0")),
    }
    assert all(r["direction"] == "in" for r in firewall.inputs["rules"])
    # attached at creation, so the first boot is already filtered
    assert server.inputs["firewallIds"] == [4711]
    assert firewall.urn in server.dependencies
    assert server.inputs["location"] == "fsn1" and server.inputs["serverType"] == "cx23" and server.inputs["image"] == "ubuntu-24.04"
    assert server.inputs["deleteProtection"] is True and server.inputs["rebuildProtection"] is True and server.protect is True
    assert server.inputs["backups"] is False
    assert server.inputs["labels"] == {"app": "cognivern", "stack": "prod", "managed-by": "pulumi"}
    assert {"userData", "sshKeys"} <= set(server.ignore_changes)
    assert server.inputs["userData"] == (Path("components/server/cloud-init.yaml").read_text())
    assert run.outputs["ipv4Address"] == "203.0.113.10" and run.outputs["ipv6Address"] == "2001:db8::1"
    assert run.outputs["url"] == "http://203.0.113.10/"
    assert run.outputs["sshCommand"] == "ssh -p 22 root@203.0.113.10"
    # every command connects to the created server
    for reg in run.by_type(COMMAND):
        assert unsecret(reg.inputs["connection"])["host"] == "203.0.113.10"


def test_protect_false_and_backups_follow_settings() -> None:
    run = run_program({**HETZNER, "protect": "false", "backups": "true"})
    server = run.get("cognivern-prod-server")
    assert server.inputs["deleteProtection"] is False and server.inputs["rebuildProtection"] is False and server.protect is False
    assert server.inputs["backups"] is True


def test_existing_host_registers_no_hetzner_resource() -> None:
    run = run_program(EXISTING)
    assert not [r for r in run.registrations if r.type.startswith("hcloud:")]
    assert run.outputs["host"] == "192.0.2.10" and "ipv4Address" not in run.outputs
    assert run.outputs["url"] == "http://192.0.2.10/"
    for reg in run.by_type(COMMAND):
        conn = reg.inputs["connection"]
        assert is_secret(conn), "the SDK must store the connection as a secret"
        assert unsecret(conn)["host"] == "192.0.2.10"


def test_children_are_named_after_their_component_and_parented() -> None:
    run = run_program(HETZNER)
    components = {r.urn: r.name for r in run.registrations if not r.custom}
    assert set(components.values()) == {"cognivern-prod", "cognivern-prod-release"}
    for reg in run.registrations:
        if reg.custom:
            assert reg.parent in components, reg.name
            assert reg.name.startswith(components[reg.parent] + "-"), reg.name


def test_host_commands_run_in_order() -> None:
    run = run_program(EXISTING)
    assert deps_names(run, run.get("cognivern-prod-provision")) == set()
    assert deps_names(run, run.get("cognivern-prod-run-script")) == {"cognivern-prod-provision"}
    assert deps_names(run, run.get("cognivern-prod-release-conf")) == {"cognivern-prod-provision"}
    assert deps_names(run, run.get("cognivern-prod-nginx-site")) == {"cognivern-prod-provision"}
    assert deps_names(run, run.get("cognivern-prod-ecosystem")) == {"cognivern-prod-run-script"}
    assert deps_names(run, run.get("cognivern-prod-env")) == {"cognivern-prod-run-script", "cognivern-prod-ecosystem"}


def test_provision_command_carries_the_script_and_installs_the_release_tool() -> None:
    run = run_program(EXISTING)
    provision = run.get("cognivern-prod-provision")
    create = provision.inputs["create"]
    assert create.startswith("bash -c '#!/usr/bin/env bash")
    assert create.endswith(" provision --root /opt/cognivern --app-user cognivern --node-major 22 --ssh-user root")
    assert provision.inputs["stdin"] == Path("components/release/cognivern-release.sh").read_text()
    assert "delete" not in provision.inputs, "destroying the stack must never remove anything from the host"


def test_non_root_ssh_user_runs_everything_through_sudo() -> None:
    run = run_program({**EXISTING, "sshUser": "deploy"})
    for reg in run.by_type(COMMAND):
        assert reg.inputs["create"].startswith("sudo -n "), reg.name


def test_runtime_files_are_rendered_from_settings() -> None:
    run = run_program({**EXISTING, "port": "4000", "agentsEnabled": "true"})
    eco = run.get("cognivern-prod-ecosystem")
    assert (
        "--dest /opt/cognivern/config/ecosystem.config.cjs --mode 0644 --owner root:root --reload-root /opt/cognivern"
        in eco.inputs["create"]
    )
    assert "forecasting-agent" in eco.inputs["stdin"] and "'exec_mode': 'cluster'" not in eco.inputs["stdin"]
    assert '"exec_mode": "cluster"' in eco.inputs["stdin"] and '"cwd": "/opt/cognivern/current"' in eco.inputs["stdin"]
    nginx = run.get("cognivern-prod-nginx-site")
    assert "server 127.0.0.1:4000;" in nginx.inputs["stdin"] and nginx.inputs["create"].endswith(" nginx-site --name cognivern-agent")
    conf = run.get("cognivern-prod-release-conf")
    assert "PORT=4000\n" in conf.inputs["stdin"] and "KEEP_RELEASES=5\n" in conf.inputs["stdin"]
    run_sh = run.get("cognivern-prod-run-script")
    assert run_sh.inputs["stdin"] == Path("components/host/run.sh").read_text()
    assert "--dest /opt/cognivern/shared/run.sh --mode 0755 --owner root:root --reload-root /opt/cognivern" in run_sh.inputs["create"]


SECRET_VALUE = "0xSECRET-private-key-do-not-leak"
PRIVATE_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA-not-real\n-----END OPENSSH PRIVATE KEY-----\n"


def plain_strings(value: Any) -> list[str]:
    """Every string leaf outside a secret wrapper."""
    if is_secret(value):
        return []
    if isinstance(value, dict):
        return [s for v in value.values() for s in plain_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in plain_strings(v)]
    return [value] if isinstance(value, str) else []


def test_secrets_only_travel_inside_secret_values() -> None:
    config = {**HETZNER, "secretEnv": json.dumps({"SAPIENCE_PRIVATE_KEY": SECRET_VALUE}), "sshPrivateKey": PRIVATE_KEY}
    run = run_program(config, secret_keys=("secretEnv", "sshPrivateKey"))
    for reg in run.registrations:
        for text in plain_strings(reg.inputs):
            assert SECRET_VALUE not in text and "PRIVATE KEY" not in text, reg.name
    for name, value in run.outputs.items():
        assert SECRET_VALUE not in json.dumps(value) and "PRIVATE KEY" not in json.dumps(value), name
    env = run.get("cognivern-prod-env")
    assert is_secret(env.inputs["stdin"])
    assert f"SAPIENCE_PRIVATE_KEY={SECRET_VALUE}\n" in unsecret(env.inputs["stdin"])
    assert env.inputs["logging"] == "none"
    assert {"stdout", "stderr"} <= set(env.additional_secret_outputs)
    assert "--dest /opt/cognivern/shared/.env --mode 0600 --owner cognivern:cognivern --reload-root /opt/cognivern" in env.inputs["create"]
    assert unsecret(run.get("cognivern-prod-provision").inputs["connection"])["privateKey"] == PRIVATE_KEY


def test_secrets_set_in_plain_text_are_refused() -> None:
    with pytest.raises(RunError, match="cognivern:secretEnv: must be stored encrypted"):
        run_program({**EXISTING, "secretEnv": '{"K": "v"}'})


BAD_PROGRAM = [
    ({"release": "v1; rm -rf /"}, "cognivern:release"),
    ({"host": "1.2.3.4 && id"}, "cognivern:host"),
    ({"port": "70000"}, "cognivern:port"),
    ({"keepReleases": "1"}, "cognivern:keepReleases"),
    ({"env": '{"BAD-NAME": "x"}'}, "cognivern:env"),
    ({"env": '{"A": "x\\ny"}'}, "cognivern:env"),
    ({"root": "relative/path"}, "cognivern:root"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD_PROGRAM)
def test_bad_config_fails_before_anything_registers(overrides: dict[str, str], key: str) -> None:
    recorded: list[Registration] = []
    with pytest.raises(RunError, match=key):
        run_program({**EXISTING, **overrides}, recorded=recorded)
    assert recorded == []


def test_missing_public_key_fails_before_anything_registers() -> None:
    recorded: list[Registration] = []
    with pytest.raises(RunError, match="cognivern:sshPublicKey: is required"):
        run_program({"release": "v1"}, recorded=recorded)
    assert recorded == []


def test_deprecated_server_type_is_a_warning() -> None:
    run = run_program({**HETZNER, "serverType": "cpx11"})
    assert any("cpx11 is deprecated" in w for w in run.warnings)


# --- releases -----------------------------------------------------------------


def make_artifact(tmp_path: Path, release: str, content: bytes = b"tarball") -> tuple[Path, str]:
    art = tmp_path / f"cognivern-{release}.tar.gz"
    art.write_bytes(content)
    digest = hashlib.sha256(content).hexdigest()
    art.with_name(art.name + ".sha256").write_text(f"{digest}  {art.name}\n")
    return art, digest


def test_release_with_artifact_uploads_installs_then_activates(tmp_path: Path) -> None:
    art, digest = make_artifact(tmp_path, "v2")
    run = run_program({**EXISTING, "release": "v2", "artifact": str(art), "keepReleases": "3"})
    upload, install, activate = (
        run.get("cognivern-prod-release-upload"),
        run.get("cognivern-prod-release-install"),
        run.get("cognivern-prod-release-activate"),
    )
    assert upload.type == COPY and install.type == COMMAND and activate.type == COMMAND
    assert upload.inputs["remotePath"] == "/opt/cognivern/incoming/cognivern-v2.tar.gz"
    assert upload.inputs["triggers"] == install.inputs["triggers"] == activate.inputs["triggers"] == ["v2", digest]
    assert (
        install.inputs["create"]
        == f"cognivern-release --root /opt/cognivern install v2 /opt/cognivern/incoming/cognivern-v2.tar.gz {digest}"
    )
    assert activate.inputs["create"] == (
        "cognivern-release --root /opt/cognivern activate v2 && cognivern-release --root /opt/cognivern prune --keep 3"
        " && cognivern-release --root /opt/cognivern list --json"
    )
    host_ready = {
        "cognivern-prod-provision",
        "cognivern-prod-run-script",
        "cognivern-prod-release-conf",
        "cognivern-prod-ecosystem",
        "cognivern-prod-env",
        "cognivern-prod-nginx-site",
    }
    assert deps_names(run, upload) == host_ready
    assert deps_names(run, install) == {"cognivern-prod-release-upload"}
    assert deps_names(run, activate) == {"cognivern-prod-release-install"}
    for reg in (install, activate):
        assert "delete" not in reg.inputs and not reg.delete_before_replace, "replacement must not undo the newer release"


def test_rollback_without_artifact_needs_no_upload() -> None:
    run = run_program({**EXISTING, "release": "v1-not-built-here"})
    assert not run.by_type(COPY)
    install = run.get("cognivern-prod-release-install")
    assert install.inputs["create"] == "cognivern-release --root /opt/cognivern install v1-not-built-here - -"
    assert install.inputs["triggers"] == ["v1-not-built-here", "on-server"]


def test_changing_the_release_changes_the_triggers(tmp_path: Path) -> None:
    a = run_program({**EXISTING, "release": "v1"}).get("cognivern-prod-release-activate").inputs["triggers"]
    b = run_program({**EXISTING, "release": "v2"}).get("cognivern-prod-release-activate").inputs["triggers"]
    assert a != b


def test_artifact_url_is_fetched_on_the_server() -> None:
    sha = "a" * 64
    run = run_program({**EXISTING, "artifactUrl": "https://dl.example.com/cognivern-v1.tar.gz", "artifactSha256": sha})
    assert not run.by_type(COPY)
    assert (
        run.get("cognivern-prod-release-install").inputs["create"].endswith(f"install v1 https://dl.example.com/cognivern-v1.tar.gz {sha}")
    )


def test_artifact_not_matching_its_sha256_fails_the_preview(tmp_path: Path) -> None:
    art, _ = make_artifact(tmp_path, "v3")
    art.write_bytes(b"tampered")
    recorded: list[Registration] = []
    with pytest.raises(RunError, match=r"does not match cognivern-v3\.tar\.gz\.sha256"):
        run_program({**EXISTING, "release": "v3", "artifact": str(art)}, recorded=recorded, preview=True)
    assert recorded == []


def test_missing_explicit_artifact_fails(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"cognivern:artifact: .* does not exist"):
        run_program({**EXISTING, "artifact": str(tmp_path / "nope.tar.gz")})


def test_default_artifact_location(tmp_path: Path) -> None:
    (tmp_path / ".artifacts").mkdir()
    _, digest = make_artifact(tmp_path / ".artifacts", "v9")
    found = resolve_artifact("v9", tmp_path, None, None, None)
    assert (found.kind, found.sha256) == ("file", digest)
    assert resolve_artifact("v8", tmp_path, None, None, None).kind == "none"
    (tmp_path / ".artifacts" / "cognivern-v9.tar.gz.sha256").unlink()
    with pytest.raises(ArtifactError, match="sha256 is missing"):
        resolve_artifact("v9", tmp_path, None, None, None)


def test_outputs_come_from_the_activation_step() -> None:
    state = {"current": "v2", "previous": "v1", "releases": [{"id": "v2", "state": "current"}, {"id": "v1", "state": "previous"}]}

    def stdout(name: str, inputs: dict[str, Any]) -> str:
        return json.dumps(state) + "\n" if name.endswith("-activate") else ""

    run = run_program({**EXISTING, "release": "v2"}, mocks=DefaultMocks(stdout))
    assert run.outputs["activeRelease"] == "v2"
    assert run.outputs["previousRelease"] == "v1"
    assert run.outputs["releases"] == state["releases"]
