"""The real `__main__.py` under the SDK's mock monitor: resources, options, order and secrecy."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from pulumi import RunError

from components import remote
from components.host import digest as command_digest
from components.host import pinned_versions
from components.release.cognivern_release import facts
from components.release.component import ArtifactError, resolve_artifact
from components.render import HOST_DIR
from components.tool import INSTALL_TOOL
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
    # the base cloud-config, then this server's generated host key (secret: it holds the private half)
    assert is_secret(server.inputs["userData"])
    assert unsecret(server.inputs["userData"]).startswith(Path("components/server/cloud-init.yaml").read_text())
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
    assert set(components.values()) == {"cognivern-prod", "cognivern-prod-tool", "cognivern-prod-release"}
    for reg in run.registrations:
        if reg.custom:
            assert reg.parent in components, reg.name
            assert reg.name.startswith(components[reg.parent] + "-"), reg.name


def test_host_commands_run_in_order() -> None:
    run = run_program(EXISTING)
    assert deps_names(run, run.get("cognivern-prod-provision")) == set()
    assert deps_names(run, run.get("cognivern-prod-env-preload")) == {"cognivern-prod-provision"}
    assert deps_names(run, run.get("cognivern-prod-tool-install")) == {"cognivern-prod-provision"}
    assert deps_names(run, run.get("cognivern-prod-tool-conf")) == {"cognivern-prod-provision"}
    assert deps_names(run, run.get("cognivern-prod-nginx-site")) == {"cognivern-prod-provision"}
    # both reload the apps through the installed tool, which reads cognivern.conf first
    assert deps_names(run, run.get("cognivern-prod-ecosystem")) == {
        "cognivern-prod-env-preload",
        "cognivern-prod-tool-install",
        "cognivern-prod-tool-conf",
    }
    assert deps_names(run, run.get("cognivern-prod-env")) == {"cognivern-prod-ecosystem"}


def test_provision_carries_its_script_and_does_nothing_when_only_its_connection_changes() -> None:
    run = run_program(EXISTING)
    provision = run.get("cognivern-prod-provision")
    create = provision.inputs["create"]
    assert create.startswith("bash -c '#!/usr/bin/env bash")
    pins = pinned_versions()
    assert create.endswith(
        " provision --root /opt/cognivern --app-user cognivern --build-user cognivern-build --ssh-user root --node-major 22"
        " --node-source nodesource"
        f" --pm2-version {pins['PM2_VERSION']} --pnpm-version {pins['PNPM_VERSION']} --metadata-filter no"
    )
    # the metadata filter's files as source text, each after its marker line: a diff shows what
    # changed, line by line; the release tool is not among them (its own command, below)
    parts = re.split(r"^#--- ([\w./-]+) ---\n", provision.inputs["stdin"], flags=re.MULTILINE)
    assert parts[0] == ""
    files = dict(zip(parts[1::2], parts[2::2], strict=True))
    assert list(files) == ["cognivern-metadata-filter", "cognivern-metadata-filter.service"], "every file, in a fixed order"
    assert files["cognivern-metadata-filter"] == Path("components/metadata_filter/metadata-filter.sh").read_text()
    assert files["cognivern-metadata-filter.service"] == Path("components/metadata_filter/cognivern-metadata-filter.service").read_text()
    # the digest of its command and stdin is its trigger (a changed script or file replaces it: it
    # runs); `update` is what runs when anything else changed, i.e. the connection alone (a host-key pin): nothing
    assert provision.inputs["triggers"] == [command_digest(create, provision.inputs["stdin"])]
    assert provision.inputs["update"] == "true"
    assert "delete" not in provision.inputs, "destroying the stack must never remove anything from the host"


def test_the_release_tool_is_installed_and_configured_by_its_own_commands() -> None:
    run = run_program(EXISTING)
    install = run.get("cognivern-prod-tool-install")
    assert shlex.split(install.inputs["create"])[3] == "install-tool"
    parts = re.split(r"^#--- ([\w./-]+) ---\n", install.inputs["stdin"], flags=re.MULTILINE)
    assert parts[0] == ""
    files = dict(zip(parts[1::2], parts[2::2], strict=True))
    release = Path("components/release")
    tool = ["cognivern-release", *(f"cognivern_release/{p.name}" for p in sorted((release / "cognivern_release").glob("*.py")))]
    assert list(files) == tool, "the launcher and every file of its package, in a fixed order"
    assert all(files[name] == (release / name).read_text() for name in tool)
    conf = run.get("cognivern-prod-tool-conf")
    assert "--dest /opt/cognivern/config/cognivern.conf --mode 0644 --owner root:root" in conf.inputs["create"]
    assert "--reload-root" not in shlex.split(conf.inputs["create"])[4:], (
        "a settings change is read at the tool's next run: nothing reloads"
    )
    for reg in (install, conf):
        assert run.parent_name(reg) == "cognivern-prod-tool"
    assert run.parent_name(run.get("cognivern-prod-tool")) == "cognivern-prod", "the tool is installed on its Host"
    # the config file was the Host's `release-conf`: its alias keeps that state on upgrade
    assert conf.aliases == [{"spec": {"name": "cognivern-prod-release-conf", "parentUrn": run.get("cognivern-prod").urn}}]


@pytest.mark.parametrize(
    ("config", "wanted"),
    [
        ({}, "yes"),
        ({"metadataFilter": "false"}, "yes"),  # a created server's user data holds its host key: never off
        (EXISTING, "no"),
        ({**EXISTING, "metadataFilter": "true"}, "yes"),
        ({"release": "v1", "hosts": ["192.0.2.10", "192.0.2.11"], "metadataFilter": "true"}, "yes"),
    ],
    ids=["created", "created-false", "existing", "existing-asked", "hosts-asked"],
)
def test_servers_the_program_creates_get_the_metadata_filter_existing_hosts_when_asked(config: dict[str, Any], wanted: str) -> None:
    """Hetzner's metadata service exists where the program created the server; an existing host may
    have none (PM2 there must not require a filter unit that is not installed) unless metadataFilter says so."""
    existing = "host" in config or "hosts" in config
    run = run_program(config) if existing else run_program({**HETZNER, **config}, mocks=HetznerMocks())
    provisions = [r for r in run.by_type(COMMAND) if r.name.endswith("-provision")]
    assert provisions and {r.inputs["create"].rsplit(" --metadata-filter ", 1)[1] for r in provisions} == {wanted}


def test_an_existing_host_with_metadata_filter_is_provisioned_exactly_like_a_created_server() -> None:
    """What the pristine-host scenarios rely on to test a created server's provisioning in existing-host
    mode (no Hetzner here): with metadataFilter the command and its stdin are the created server's."""
    created = run_program(HETZNER, mocks=HetznerMocks()).get("cognivern-prod-provision")
    existing = run_program({**EXISTING, "metadataFilter": "true"}).get("cognivern-prod-provision")
    assert (existing.inputs["create"], existing.inputs["stdin"]) == (created.inputs["create"], created.inputs["stdin"])


def test_every_host_script_command_carries_lib_sh_in_front_of_its_script(tmp_path: Path) -> None:
    """lib.sh and the generated rules travel inside each command (nothing to install first), so editing
    either changes the command."""
    lib = Path("components/host/lib.sh").read_text()
    for reg in run_program(EXISTING).by_type(COMMAND):
        script = reg.inputs["create"]
        if not script.startswith("bash -c "):
            continue  # the installed release tool
        _, _, text, name, *_ = shlex.split(script)
        path = INSTALL_TOOL if name == "install-tool" else HOST_DIR / f"{name}.sh"
        assert text == lib + "\n" + facts.shell_prelude() + path.read_text(), reg.name
    edited = tmp_path / "lib.sh"
    edited.write_text(lib + "# one more line\n")
    with mock.patch.object(remote, "LIB", edited):
        assert shlex.split(remote.script_command(HOST_DIR / "put-file.sh", ["--dest", "/x"]))[2].startswith(edited.read_text())


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
    assert (
        '"exec_mode": "cluster"' in eco.inputs["stdin"] and 'const STATE_FILE = "/opt/cognivern/config/state.json";' in eco.inputs["stdin"]
    )
    nginx = run.get("cognivern-prod-nginx-site")
    assert "include sites-available/cognivern-agent.upstream;" in nginx.inputs["stdin"]
    assert nginx.inputs["create"].endswith(" nginx-site --name cognivern-agent")
    assert nginx.inputs["stdin"].endswith("#--- cognivern-agent.upstream ---\n" + facts.upstream_text("cognivern_agent_app", 4000, 4000))
    conf = run.get("cognivern-prod-tool-conf")
    assert "PORT=4000\n" in conf.inputs["stdin"] and "KEEP_RELEASES" not in conf.inputs["stdin"], "keepReleases is prune's argument"
    assert "BAKE_SECONDS=30\n" in conf.inputs["stdin"] and "KEEP_PREVIOUS_WARM=false\n" in conf.inputs["stdin"]
    assert "NGINX_UPSTREAM=/etc/nginx/sites-available/cognivern-agent.upstream\n" in conf.inputs["stdin"]
    assert "AGENT_APPS=forecasting-agent\n" in conf.inputs["stdin"]
    assert "BUILD_USER=cognivern-build\n" in conf.inputs["stdin"]
    env = run.get("cognivern-prod-env")
    assert "--dest /opt/cognivern/shared/.env --mode 0640 --owner root:cognivern --reload-root /opt/cognivern" in env.inputs["create"]


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
    # root's, read by the app's group: the app cannot rewrite the values the release tool masks with
    assert "--dest /opt/cognivern/shared/.env --mode 0640 --owner root:cognivern --reload-root /opt/cognivern" in env.inputs["create"]
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


HOST_READY = {
    "cognivern-prod-provision",
    "cognivern-prod-env-preload",
    "cognivern-prod-ecosystem",
    "cognivern-prod-env",
    "cognivern-prod-nginx-site",
    "cognivern-prod-tool-install",
    "cognivern-prod-tool-conf",
}


def test_release_with_artifact_is_an_upload_then_one_deploy_command(tmp_path: Path) -> None:
    art, digest = make_artifact(tmp_path, "v2")
    run = run_program({**EXISTING, "release": "v2", "artifact": str(art), "keepReleases": "3"})
    upload, activate, prune = (
        run.get("cognivern-prod-release-upload"),
        run.get("cognivern-prod-release-activate"),
        run.get("cognivern-prod-release-prune"),
    )
    assert upload.type == COPY and activate.type == COMMAND and prune.type == COMMAND
    assert not [r for r in run.registrations if r.name.endswith("-install") and r.name != "cognivern-prod-tool-install"]
    assert upload.inputs["remotePath"] == "/opt/cognivern/incoming/cognivern-v2.tar.gz"
    assert upload.inputs["triggers"] == activate.inputs["triggers"] == ["v2", digest]
    assert (
        activate.inputs["create"]
        == f"cognivern-release --root /opt/cognivern deploy v2 /opt/cognivern/incoming/cognivern-v2.tar.gz {digest}"
    )
    # any change that is not the release (the connection, the command's wording) lists the state: nothing switches
    assert activate.inputs["update"] == "cognivern-release --root /opt/cognivern list --json"
    # keepReleases is prune's own command, run after the activation: changing it never touches the
    # activation; it is prune's trigger, and a change of the connection alone runs nothing
    assert prune.inputs["create"] == "cognivern-release --root /opt/cognivern prune --keep 3"
    assert prune.inputs["triggers"] == ["3"] and prune.inputs["update"] == "true"
    assert deps_names(run, upload) == HOST_READY
    assert deps_names(run, activate) == {"cognivern-prod-release-upload"}
    assert deps_names(run, prune) == {"cognivern-prod-release-activate"}
    for reg in (upload, activate, prune):
        assert "delete" not in reg.inputs and not reg.delete_before_replace, "replacement must not undo the newer release"


def test_rollback_without_artifact_is_one_command() -> None:
    run = run_program({**EXISTING, "release": "v1-not-built-here"})
    assert not run.by_type(COPY)
    activate = run.get("cognivern-prod-release-activate")
    assert activate.inputs["create"] == "cognivern-release --root /opt/cognivern deploy v1-not-built-here - -"
    assert activate.inputs["triggers"] == ["v1-not-built-here", "on-server"]
    assert deps_names(run, activate) == HOST_READY


def test_changing_the_release_changes_the_triggers(tmp_path: Path) -> None:
    a = run_program({**EXISTING, "release": "v1"}).get("cognivern-prod-release-activate").inputs["triggers"]
    b = run_program({**EXISTING, "release": "v2"}).get("cognivern-prod-release-activate").inputs["triggers"]
    assert a != b


def test_artifact_url_is_fetched_on_the_server() -> None:
    sha = "a" * 64
    run = run_program({**EXISTING, "artifactUrl": "https://dl.example.com/cognivern-v1.tar.gz", "artifactSha256": sha})
    assert not run.by_type(COPY)
    assert (
        run.get("cognivern-prod-release-activate").inputs["create"].endswith(f"deploy v1 https://dl.example.com/cognivern-v1.tar.gz {sha}")
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


# --- several servers (issue 6) -------------------------------------------------

PLACEMENT = "hcloud:index/placementGroup:PlacementGroup"
NETWORK = "hcloud:index/network:Network"
SUBNET = "hcloud:index/networkSubnet:NetworkSubnet"
SERVER_NETWORK = "hcloud:index/serverNetwork:ServerNetwork"
LB = "hcloud:index/loadBalancer:LoadBalancer"
LB_NETWORK = "hcloud:index/loadBalancerNetwork:LoadBalancerNetwork"
LB_TARGET = "hcloud:index/loadBalancerTarget:LoadBalancerTarget"
LB_SERVICE = "hcloud:index/loadBalancerService:LoadBalancerService"
BALANCER_TYPES = {PLACEMENT, NETWORK, SUBNET, SERVER_NETWORK, LB, LB_NETWORK, LB_TARGET, LB_SERVICE}


class HetznerMocks(DefaultMocks):
    """hcloud ids are numbers (the program converts them with int()); each server its own address."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[str, str] = {}

    def new_resource(self, args: Any) -> tuple[str | None, dict[str, Any]]:
        rid, outputs = super().new_resource(args)
        if not args.typ.startswith("hcloud:"):
            return rid, outputs
        rid = self.ids.setdefault(args.name, str(1000 + len(self.ids)))
        if args.typ == SERVER:
            index = int(args.name.rsplit("-", 1)[-1]) if args.name[-1].isdigit() else 0
            outputs.update(ipv4Address=f"203.0.113.{10 + index}", ipv6Address=f"2001:db8::{10 + index}")
        elif args.typ == LB:
            outputs.update(ipv4="198.51.100.80", ipv6="2001:db8:80::1")
        return rid, outputs


def run_servers(n: int, **extra: str) -> tuple[Any, HetznerMocks]:
    mocks = HetznerMocks()
    return run_program({**HETZNER, "servers": str(n), **extra}, mocks=mocks), mocks


def test_one_server_explicitly_is_todays_stack() -> None:
    default, explicit = run_program(HETZNER), run_program({**HETZNER, "servers": "1", "loadBalancerType": "lb21"})
    assert sorted((r.type, r.urn) for r in explicit.registrations) == sorted((r.type, r.urn) for r in default.registrations)
    assert not [r for r in explicit.registrations if r.type in BALANCER_TYPES]
    assert explicit.outputs["servers"] == [
        {"name": "cognivern-prod", "address": "203.0.113.10", "activeRelease": None, "sshCommand": "ssh -p 22 root@203.0.113.10"}
    ]


@pytest.mark.parametrize("n", [2, 3])
def test_several_servers_sit_behind_a_load_balancer_on_a_private_network(n: int) -> None:
    run, mocks = run_servers(n)
    ids = mocks.ids
    servers = sorted(run.by_type(SERVER), key=lambda r: r.name)
    assert [s.name for s in servers] == [f"cognivern-prod-server-{i}" for i in range(1, n + 1)]
    (group,) = run.by_type(PLACEMENT)
    assert group.inputs["type"] == "spread"
    firewall = run.get("cognivern-prod-firewall")
    for server in servers:
        assert server.inputs["placementGroupId"] == int(ids[group.name]) and group.urn in server.dependencies
        assert server.inputs["firewallIds"] == [int(ids[firewall.name])]
        assert server.protect and {"userData", "sshKeys"} <= set(server.ignore_changes)
    # no public web ports: the balancer reaches the servers over the private network (not filtered)
    rules = {(r["protocol"], r.get("port"), tuple(r["sourceIps"])) for r in firewall.inputs["rules"]}
    assert rules == {("tcp", "22", ("198.51.100.0/24",)), ("icmp", None, ("0.0.0.0/0", "::/0"))}

    (network,) = run.by_type(NETWORK)
    (subnet,) = run.by_type(SUBNET)
    assert network.inputs["ipRange"] == "10.0.0.0/16"
    assert subnet.inputs == {**subnet.inputs, "networkId": int(ids[network.name]), "type": "cloud", "networkZone": "eu-central"}
    assert subnet.inputs["ipRange"] == "10.0.1.0/24"
    attachments = sorted(run.by_type(SERVER_NETWORK), key=lambda r: r.name)
    assert [(a.inputs["serverId"], a.inputs["ip"]) for a in attachments] == [
        (int(ids[f"cognivern-prod-server-{i}"]), f"10.0.1.{10 + i}") for i in range(1, n + 1)
    ]
    assert all(a.inputs["networkId"] == int(ids[network.name]) and subnet.urn in a.dependencies for a in attachments)

    (lb,) = run.by_type(LB)
    assert (lb.inputs["loadBalancerType"], lb.inputs["location"]) == ("lb11", "fsn1")
    (lb_net,) = run.by_type(LB_NETWORK)
    assert lb_net.inputs["loadBalancerId"] == int(ids[lb.name]) and lb_net.inputs["networkId"] == int(ids[network.name])
    targets = sorted(run.by_type(LB_TARGET), key=lambda r: r.name)
    assert len(targets) == n
    for i, (target, attachment) in enumerate(zip(targets, attachments, strict=True), start=1):
        assert target.inputs["type"] == "server" and target.inputs["usePrivateIp"] is True
        assert target.inputs["serverId"] == int(ids[f"cognivern-prod-server-{i}"])
        assert target.inputs["loadBalancerId"] == int(ids[lb.name])
        assert {lb_net.urn, attachment.urn} <= set(target.dependencies)
    (service,) = run.by_type(LB_SERVICE)
    assert (service.inputs["protocol"], service.inputs["listenPort"], service.inputs["destinationPort"]) == ("http", 80, 80)
    check = service.inputs["healthCheck"]
    assert (check["protocol"], check["port"], check["http"]["path"]) == ("http", 80, "/health")
    assert 1 <= check["retries"] <= 5 and 1 <= check["timeout"] < check["interval"] <= 60

    # every server is prepared and released over its own public address
    for i in range(1, n + 1):
        for reg in run.registrations:
            if reg.type in (COMMAND, COPY) and reg.name.startswith(f"cognivern-prod-{i}-"):
                assert unsecret(reg.inputs["connection"])["host"] == f"203.0.113.{10 + i}", reg.name
    assert len(run.by_type(COMMAND)) == n * (5 + 2 + 3)  # host, tool, release (install, activate, prune)
    assert run.outputs["url"] == "http://198.51.100.80/" and run.outputs["loadBalancerIpv4Address"] == "198.51.100.80"
    assert "ipv4Address" not in run.outputs
    assert [s["name"] for s in run.outputs["servers"]] == [f"cognivern-prod-{i}" for i in range(1, n + 1)]
    assert [s["address"] for s in run.outputs["servers"]] == [f"203.0.113.{10 + i}" for i in range(1, n + 1)]


@pytest.mark.parametrize(
    ("location", "zone"), [("nbg1", "eu-central"), ("hel1", "eu-central"), ("ash", "us-east"), ("hil", "us-west"), ("sin", "ap-southeast")]
)
def test_the_subnet_is_in_the_locations_network_zone(location: str, zone: str) -> None:
    run, _ = run_servers(2, location=location)
    assert run.by_type(SUBNET)[0].inputs["networkZone"] == zone
    assert run.by_type(LB)[0].inputs["location"] == location
    assert {s.inputs["location"] for s in run.by_type(SERVER)} == {location}


def test_balancer_follows_type_and_health_path_settings() -> None:
    run, _ = run_servers(2, loadBalancerType="lb21", healthPath="/api/health", serverName="api.example.com")
    assert run.by_type(LB)[0].inputs["loadBalancerType"] == "lb21"
    http = run.by_type(LB_SERVICE)[0].inputs["healthCheck"]["http"]
    assert http["path"] == "/api/health" and http["domain"] == "api.example.com"
    assert run.outputs["url"] == "http://api.example.com/"


@pytest.mark.parametrize("n", [2, 3])
def test_children_of_several_servers_are_named_after_their_component(n: int) -> None:
    run, _ = run_servers(n)
    components = {r.urn: r.name for r in run.registrations if not r.custom}
    expected = {"cognivern-prod", "cognivern-prod-balancer"}
    for i in range(1, n + 1):
        expected |= {f"cognivern-prod-{i}", f"cognivern-prod-{i}-tool", f"cognivern-prod-{i}-release"}
    assert set(components.values()) == expected
    for reg in run.registrations:
        if reg.custom:
            assert reg.parent in components, reg.name
            assert reg.name.startswith(components[reg.parent] + "-"), reg.name


def step_deps(run: Any, name: str) -> set[str]:
    """A step's dependencies on other steps (a created server and its host key are also ones: the
    server's address and the key's public half are in the connection)."""
    hcloud = {r.name for r in run.registrations if r.type.startswith(("hcloud:", "pulumi-python:dynamic"))}
    return deps_names(run, run.get(name)) - hcloud


def assert_rolling_order(run: Any, nodes: list[str]) -> None:
    """Installs everywhere first (none waits for an activation); activations one server at a time, in order."""
    installs = {f"{node}-release-install" for node in nodes}
    activations = [f"{node}-release-activate" for node in nodes]
    for node in nodes:
        install_deps = step_deps(run, f"{node}-release-install")
        assert not [d for d in install_deps if d.endswith("-activate")], (node, install_deps)
        ready = ("provision", "env-preload", "ecosystem", "env", "nginx-site", "tool-install", "tool-conf")
        assert install_deps == {f"{node}-{c}" for c in ready}
        assert step_deps(run, f"{node}-release-prune") == {f"{node}-release-activate"}
    assert step_deps(run, activations[0]) == installs
    for previous, activate, node in zip(activations, activations[1:], nodes[1:], strict=False):
        assert step_deps(run, activate) == {f"{node}-release-install", previous}


@pytest.mark.parametrize("n", [2, 3])
def test_activations_roll_one_server_at_a_time(n: int) -> None:
    run, _ = run_servers(n)
    assert_rolling_order(run, [f"cognivern-prod-{i}" for i in range(1, n + 1)])


def test_one_server_activation_is_its_own_install() -> None:
    run = run_program(HETZNER)
    assert "cognivern-prod-release-install" not in run.names
    assert step_deps(run, "cognivern-prod-release-activate") == HOST_READY


def test_rollback_by_config_rolls_every_server_back_in_the_same_order() -> None:
    v2 = run_servers(3, release="v2")[0]
    v1 = run_servers(3, release="v1")[0]
    for i in range(1, 4):
        for step in ("install", "activate"):
            name = f"cognivern-prod-{i}-release-{step}"
            assert v2.get(name).inputs["triggers"][0] == "v2" and v1.get(name).inputs["triggers"][0] == "v1"
    assert_rolling_order(v1, [f"cognivern-prod-{i}" for i in range(1, 4)])


def test_existing_hosts_are_each_prepared_and_released_without_hetzner() -> None:
    other_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeHostKeyForTheSecondHost000000000000000"
    config = {
        "release": "v1",
        "hosts": ["192.0.2.10", "192.0.2.11", "app3.example.com"],
        "hostKey": KEY.rsplit(" ", 1)[0],
        "hostKeys": {"192.0.2.11": other_key},
    }
    run = run_program(config)
    assert not [r for r in run.registrations if r.type.startswith("hcloud:")]
    nodes = [f"cognivern-prod-{i}" for i in (1, 2, 3)]
    components = {r.name for r in run.registrations if not r.custom}
    assert components == set(nodes) | {f"{n}-release" for n in nodes} | {f"{n}-tool" for n in nodes}
    for node, address in zip(nodes, config["hosts"], strict=True):
        for reg in run.registrations:
            if reg.type == COMMAND and reg.name.startswith(f"{node}-"):
                conn = unsecret(reg.inputs["connection"])
                assert conn["host"] == address, reg.name
                assert conn["hostKey"] == (other_key if address == "192.0.2.11" else KEY.rsplit(" ", 1)[0]), reg.name
    assert_rolling_order(run, nodes)
    assert run.outputs["hosts"] == config["hosts"] and "host" not in run.outputs
    assert [s["address"] for s in run.outputs["servers"]] == config["hosts"]
    assert run.outputs["sshCommand"] == "ssh -p 22 root@192.0.2.10"


def test_a_single_entry_in_hosts_is_indexed() -> None:
    run = run_program({"release": "v1", "hosts": ["192.0.2.10"]})
    assert {r.name for r in run.registrations if not r.custom} == {"cognivern-prod-1", "cognivern-prod-1-tool", "cognivern-prod-1-release"}
    assert "cognivern-prod-1-release-install" not in run.names, "one server: the deploy command installs"


BAD_SEVERAL = [
    ({**HETZNER, "servers": "0"}, "cognivern:servers: must be a whole number from 1 to 10, got 0"),
    ({**HETZNER, "servers": "11"}, "cognivern:servers: must be a whole number from 1 to 10, got 11"),
    ({**HETZNER, "servers": "two"}, "cognivern:servers"),
    ({**HETZNER, "servers": "2", "loadBalancerType": "lb11;id"}, "cognivern:loadBalancerType"),
    ({**EXISTING, "hosts": ["192.0.2.11"]}, "cognivern:hosts: set either cognivern:host"),
    ({"release": "v1", "hosts": ["192.0.2.10", "1.2.3.4 && id"]}, "cognivern:hosts: '1.2.3.4 && id' is not allowed"),
    ({"release": "v1", "hosts": ["192.0.2.10", "192.0.2.10"]}, "cognivern:hosts: 192.0.2.10 is listed twice"),
    ({"release": "v1", "hosts": "192.0.2.10"}, "cognivern:hosts: must be a list"),
    ({"release": "v1", "hosts": ["192.0.2.10"], "servers": "2"}, "cognivern:servers: only counts servers the program creates"),
    ({"release": "v1", "hosts": ["192.0.2.10"], "hostKeys": {"192.0.2.99": KEY}}, "cognivern:hostKeys: 192.0.2.99 is not one of"),
]


@pytest.mark.parametrize(("config", "message"), BAD_SEVERAL)
def test_bad_several_server_settings_fail_before_anything_registers(config: dict[str, Any], message: str) -> None:
    recorded: list[Registration] = []
    with pytest.raises(RunError, match=message.replace("(", r"\(").replace("|", r"\|").replace("&", "&")):
        run_program(config, recorded=recorded)
    assert recorded == []


def test_growing_a_one_server_stack_keeps_its_server() -> None:
    """Server 1 of several carries an alias to the one-server name, so it is not replaced (URN moves, resource stays)."""
    from unittest import mock

    from tests.support import program as program_module

    aliases: dict[str, list[str]] = {}

    class AliasMonitor(program_module.RecordingMonitor):
        def RegisterResource(self, request: Any) -> Any:  # noqa: N802 (gRPC name)
            aliases[request.name] = [str(a) for a in request.aliases]
            return super().RegisterResource(request)

    with mock.patch.object(program_module, "RecordingMonitor", AliasMonitor):
        run_program({**HETZNER, "servers": "2"}, mocks=HetznerMocks())
    assert any("cognivern-prod-server" in a and "server-1" not in a for a in aliases["cognivern-prod-server-1"]), aliases
    assert not aliases["cognivern-prod-server-2"]


@pytest.mark.parametrize("config", [{**HETZNER, "servers": "2"}, {"release": "v1", "hosts": ["192.0.2.10", "192.0.2.11"]}])
def test_server_1_of_several_keeps_the_state_of_the_one_server_stack(config: dict[str, Any]) -> None:
    """Server 1's components carry the one-server names as aliases (their children follow): growing
    re-runs nothing there. The other servers have none; a one-server stack carries the `-1` names."""
    run = run_program(config, mocks=HetznerMocks())

    def names(reg: Registration) -> list[str]:
        return [a["spec"]["name"] for a in reg.aliases]

    assert names(run.get("cognivern-prod-1")) == ["cognivern-prod"]
    # the tool is the Host's child, named after it: it follows the Host's alias (the SDK derives
    # `cognivern-prod-tool` under the Host's old name), so it needs none of its own
    assert run.parent_name(run.get("cognivern-prod-1-tool")) == "cognivern-prod-1" and not names(run.get("cognivern-prod-1-tool"))
    assert names(run.get("cognivern-prod-1-release")) == ["cognivern-prod-release"]
    assert not [r for r in run.registrations if not r.custom and r.name.startswith("cognivern-prod-2") and r.aliases]
    one = run_program(EXISTING)
    assert names(one.get("cognivern-prod")) == ["cognivern-prod-1"]
    assert names(one.get("cognivern-prod-release")) == ["cognivern-prod-1-release"]


# --- HTTPS ----------------------------------------------------------------------

TLS = {"domain": "api.example.com", "acmeEmail": "ops@example.com"}


def test_one_server_with_a_domain_gets_a_certbot_step_after_the_http_site() -> None:
    run = run_program({**EXISTING, **TLS, "acmeServer": "https://acme.test:14000/dir"})
    tls = run.get("cognivern-prod-tls")
    assert tls.inputs["create"].startswith("bash -c '#!/usr/bin/env bash")
    assert tls.inputs["create"].endswith(
        " tls --name cognivern-agent --domain api.example.com --email ops@example.com --server https://acme.test:14000/dir"
    )
    assert deps_names(run, tls) == {"cognivern-prod-nginx-site"}
    assert "ssl_certificate /etc/letsencrypt/live/api.example.com/fullchain.pem;" in tls.inputs["stdin"]
    assert "Strict-Transport-Security" in tls.inputs["stdin"]
    assert "/.well-known/acme-challenge/" in run.get("cognivern-prod-nginx-site").inputs["stdin"]
    # a Let's Encrypt outage must not hold back releases: the release does not wait for the certificate
    assert "cognivern-prod-tls" not in deps_names(run, run.get("cognivern-prod-release-activate"))
    assert run.outputs["url"] == "https://api.example.com/"


def test_without_a_domain_there_is_no_tls_step_and_the_site_is_unchanged() -> None:
    run = run_program(EXISTING)
    assert "cognivern-prod-tls" not in run.names
    site = run.get("cognivern-prod-nginx-site").inputs["stdin"]
    assert "acme-challenge" not in site and "Strict-Transport-Security" not in site and "location = /health {" in site


def test_several_servers_terminate_tls_on_the_balancer_with_a_managed_certificate() -> None:
    run, _ = run_servers(2, domain="api.example.com")
    assert not [n for n in run.names if n.endswith("-tls")]
    cert = run.get("cognivern-prod-balancer-certificate")
    assert cert.type == "hcloud:index/managedCertificate:ManagedCertificate" and cert.inputs["domainNames"] == ["api.example.com"]
    services = run.by_type("hcloud:index/loadBalancerService:LoadBalancerService")
    assert [s.name for s in services] == ["cognivern-prod-balancer-https"]
    https = services[0].inputs
    assert (https["protocol"], https["listenPort"], https["destinationPort"]) == ("https", 443, 80)
    assert https["http"]["redirectHttp"] is True and len(https["http"]["certificates"]) == 1
    assert https["healthCheck"]["http"]["path"] == "/health"
    for index in (1, 2):
        assert "Strict-Transport-Security" in run.get(f"cognivern-prod-{index}-nginx-site").inputs["stdin"]
    assert run.outputs["url"] == "https://api.example.com/"


def test_custom_health_path_is_proxied_as_the_health_location() -> None:
    run = run_program({**EXISTING, "healthPath": "/api/healthz"})
    assert "location = /api/healthz {" in run.get("cognivern-prod-nginx-site").inputs["stdin"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({**EXISTING, "domain": "api.example.com"}, "cognivern:acmeEmail: is required"),
        ({**EXISTING, **TLS, "domain": "API.example.com"}, "cognivern:domain"),
        ({**EXISTING, **TLS, "domain": "*.example.com"}, "cognivern:domain"),
        ({**EXISTING, **TLS, "acmeEmail": "ops@;id"}, "cognivern:acmeEmail"),
        ({**EXISTING, **TLS, "acmeServer": "http://acme.example.com/dir"}, "cognivern:acmeServer"),
        ({"release": "v1", "hosts": ["192.0.2.10", "192.0.2.11"], **TLS}, "cognivern:domain: with cognivern:hosts"),
    ],
    ids=["no-email", "uppercase", "wildcard", "bad-email", "plain-http-acme", "hosts"],
)
def test_bad_tls_settings_fail_before_anything_registers(config: dict[str, Any], message: str) -> None:
    recorded: list[Registration] = []
    with pytest.raises(RunError, match=message):
        run_program(config, recorded=recorded)
    assert recorded == []


def test_acme_settings_without_a_domain_warn() -> None:
    run = run_program({**EXISTING, "acmeEmail": "ops@example.com"})
    assert any("have no effect without cognivern:domain" in w for w in run.warnings)


class PreviewCreatesServerMocks(HetznerMocks):
    """A preview of a stack with no state: the engine does not know a server's id before creating it."""

    def new_resource(self, args: Any) -> tuple[str | None, dict[str, Any]]:
        rid, outputs = super().new_resource(args)
        return ("" if args.typ == SERVER else rid), outputs


def test_preview_that_creates_the_server_needs_an_artifact() -> None:
    with pytest.raises(RunError, match=r"this deploy creates the server.*no artifact.*scripts/build-artifact"):
        run_program({**HETZNER, "release": "20261128120000-0000000"}, mocks=PreviewCreatesServerMocks(), preview=True)


def test_preview_with_an_artifact_creates_the_server(tmp_path: Path) -> None:
    art, digest = make_artifact(tmp_path, "v1")
    run = run_program({**HETZNER, "artifact": str(art)}, mocks=PreviewCreatesServerMocks(), preview=True)
    assert (
        run.get("cognivern-prod-release-activate")
        .inputs["create"]
        .endswith(f"deploy v1 /opt/cognivern/incoming/cognivern-v1.tar.gz {digest}")
    )


def test_existing_server_without_artifact_keeps_the_server_side_check() -> None:
    """The server is in state (its id is known in the preview): the tool's install looks for the release there."""
    run = run_program({**HETZNER, "release": "v0"}, mocks=HetznerMocks(), preview=True)
    assert run.get("cognivern-prod-release-activate").inputs["create"].endswith("deploy v0 - -")
    hosts = run_program({**EXISTING, "release": "v0"}, preview=True)
    assert hosts.get("cognivern-prod-release-activate").inputs["create"].endswith("deploy v0 - -")
    several = run_servers(2, release="v0")[0]
    install = several.get("cognivern-prod-1-release-install")
    assert install.inputs["create"].endswith("install v0 - -") and install.inputs["update"] == "true", "a new pin installs nothing"
