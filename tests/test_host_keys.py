"""SSH host keys: created servers are pinned to a key the program generated, from the first connection.

Mock graph: each created server's user data carries its own generated key (`ssh_keys`), and every
connection to that server pins that key's public half. cloud-init's own schema accepts the user
data. Real SSH through the real engine (pulumi-command's Go client): a connection pinned to another key
fails before any command runs, while the generated key served by a real sshd is accepted; the
real engine runs the key's dynamic provider once and keeps its private half encrypted in state.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from pulumi import RunError

from components import metadata_filter
from components.server import render_user_data
from components.server.host_key import HostKeyProvider, generate_ed25519
from tests.support.program import Registration, is_secret, run_program, unsecret
from tests.support.real_engine import RealEngine, RunReport
from tests.support.real_engine import is_secret as is_secret_in_state
from tests.support.sshd import LocalSshd
from tests.test_program import HETZNER, HetznerMocks

HOST_KEY_TYPE = "pulumi-python:dynamic/cognivern:HostKey"
SERVER = "hcloud:index/server:Server"
REMOTE = ("command:remote:Command", "command:remote:CopyToRemote")


def public_of(private_pem: str) -> str:
    key = load_ssh_private_key(private_pem.encode(), password=None)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def injected_key(server: Registration) -> tuple[str, str]:
    """(private, public) from the server's user data, checked to be one key pair."""
    assert is_secret(server.inputs["userData"]), "the user data holds a private key: it must be secret"
    keys = yaml.safe_load(unsecret(server.inputs["userData"]))["ssh_keys"]
    assert set(keys) == {"ed25519_private", "ed25519_public"}
    assert public_of(keys["ed25519_private"]) == keys["ed25519_public"]
    return keys["ed25519_private"], keys["ed25519_public"]


@pytest.mark.parametrize("n", [1, 3])
def test_every_connection_to_a_created_server_carries_that_servers_generated_key(n: int) -> None:
    run = run_program({**HETZNER, "servers": str(n)}, mocks=HetznerMocks())
    servers = run.by_type(SERVER)
    assert len(servers) == n and len(run.by_type(HOST_KEY_TYPE)) == n
    components = {r.urn: r.name for r in run.registrations if not r.custom}
    for key in run.by_type(HOST_KEY_TYPE):
        assert components[key.parent] == "cognivern-prod" and key.additional_secret_outputs == ["private_key"]
    pins = {}
    for index in range(1, n + 1):  # by name: servers register as their keys resolve, in any order
        server = run.get(f"cognivern-prod-server-{index}" if n > 1 else "cognivern-prod-server")
        address = f"203.0.113.{10 + index}" if n > 1 else "203.0.113.10"
        pins[address] = injected_key(server)[1]
        key_name = f"cognivern-prod-host-key-{index}" if n > 1 else "cognivern-prod-host-key"
        assert run.get(key_name).urn in server.dependencies
    assert len(set(pins.values())) == n, "each server gets its own key"
    assert run.outputs["knownHosts"] == "".join(f"{address} {key}\n" for address, key in sorted(pins.items()))
    remote = [r for r in run.registrations if r.type in REMOTE]
    assert len(remote) >= 7 * n  # 5 host commands, install and activate (upload too with an artifact)
    for reg in remote:
        conn = unsecret(reg.inputs["connection"])
        assert conn["hostKey"] == pins[conn["host"]], reg.name
    assert not [w for w in run.warnings if "host key is not checked" in w]


def test_an_existing_servers_pin_set_by_the_operator_wins_over_the_generated_key() -> None:
    """A server created before the program generated keys ignores the new user data (ignore_changes)."""
    own = generate_ed25519()[1]
    run = run_program({**HETZNER, "hostKey": own})
    for reg in [r for r in run.registrations if r.type in REMOTE]:
        assert unsecret(reg.inputs["connection"])["hostKey"] == own, reg.name

    # several servers: hostKeys by address pins the old ones; the others keep their generated key
    run = run_program({**HETZNER, "servers": "2", "hostKeys": {"203.0.113.12": own}}, mocks=HetznerMocks())
    generated = injected_key(run.get("cognivern-prod-server-1"))[1]
    for reg in [r for r in run.registrations if r.type in REMOTE]:
        conn = unsecret(reg.inputs["connection"])
        assert conn["hostKey"] == {"203.0.113.11": generated, "203.0.113.12": own}[conn["host"]], reg.name


def test_the_key_is_created_once_and_never_changes() -> None:
    provider = HostKeyProvider()
    first, second = provider.create({}), provider.create({})
    assert first.outs is not None and second.outs is not None
    assert first.outs["public_key"] != second.outs["public_key"]
    assert public_of(first.outs["private_key"]) == first.outs["public_key"]
    assert provider.diff("id", first.outs, {"private_key": None, "public_key": None}).changes is False


def test_cloud_init_schema_accepts_the_user_data_with_ssh_keys(tmp_path: Path) -> None:
    private, public = generate_ed25519()
    text = render_user_data(private, public)
    assert text.startswith("#cloud-config\n")
    assert yaml.safe_load(text)["ssh_keys"] == {"ed25519_private": private, "ed25519_public": public}
    good = tmp_path / "user-data.yaml"
    good.write_text(text)
    result = _schema(good)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "bad.yaml"  # control: a key name cloud-init does not know is refused
    bad.write_text(text.replace("ed25519_private", "ed25519_secret"))
    assert _schema(bad).returncode != 0


def _schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["cloud-init", "schema", "--config-file", str(path)], capture_output=True, text=True, check=False)


def test_an_unpinned_existing_host_warns_with_the_commands_and_require_host_key_refuses_it() -> None:
    run = run_program({"release": "v1", "host": "192.0.2.10", "sshPort": "2222"})
    (warning,) = [w for w in run.warnings if "host key is not checked" in w]
    assert "ssh-keyscan -p 2222 -t ed25519 192.0.2.10" in warning
    assert "config set cognivern:hostKey" in warning and "scripts/pulumi-local " in warning and "requireHostKey" in warning
    assert run.outputs["knownHosts"] == ""
    pin = generate_ed25519()[1]
    pinned = run_program({"release": "v1", "host": "192.0.2.10", "hostKey": pin, "sshPort": "2222"})
    assert not [w for w in pinned.warnings if "host key is not checked" in w]
    assert pinned.outputs["knownHosts"] == f"[192.0.2.10]:2222 {pin}\n"

    hosts = run_program({"release": "v1", "hosts": ["192.0.2.10", "192.0.2.11"], "hostKeys": {"192.0.2.10": generate_ed25519()[1]}})
    (warning,) = [w for w in hosts.warnings if "host key is not checked" in w]
    assert warning.startswith("192.0.2.11:") and """'cognivern:hostKeys["192.0.2.11"]' --path""" in warning

    with pytest.raises(RunError, match=r"cognivern:requireHostKey: is true but no host key is pinned for 192.0.2.10"):
        run_program({"release": "v1", "host": "192.0.2.10", "requireHostKey": "true"})
    created = run_program({**HETZNER, "requireHostKey": "true"})  # created servers are always pinned
    assert created.by_type(SERVER)


# ---------------------------------------------------------------- real SSH through the real engine

PROGRAM = """
import pulumi
from pulumi_command import remote

cfg = pulumi.Config("cognivern")
conn = remote.ConnectionArgs(
    host="127.0.0.1",
    port=int(cfg.require("port")),
    user="root",
    private_key=cfg.require_secret("key"),
    host_key=cfg.require("hostKey"),
    dial_error_limit=1,  # the provider retries every dial error, a host key mismatch too (REAL-ENGINE.md)
)
remote.Command("touch", connection=conn, create="touch " + cfg.require("marker") + " && echo ran")
"""


@pytest.fixture(scope="module")
def sshd_with_generated_key() -> Iterator[LocalSshd]:
    """A real sshd whose host key is one the program's provider generated, written as cloud-init writes it (0600)."""
    daemon = LocalSshd()
    private, public = generate_ed25519()
    key_path = daemon.dir / "ssh_host_ed25519_key"
    key_path.write_text(private)
    key_path.chmod(0o600)
    key_path.with_suffix(".pub").write_text(public + "\n")
    daemon.host_key = public
    with daemon:
        yield daemon


def _up(sshd: LocalSshd, tmp: Path, host_key: str) -> tuple[RealEngine, Path, RunReport]:
    """`pulumi up` of a one-command program pinned to `host_key` (pulumi-command's Go SSH client)."""
    marker = tmp / "ran"
    engine = RealEngine(tmp / "engine", program=PROGRAM)
    config = {"port": str(sshd.port), "key": sshd.private_key, "hostKey": host_key, "marker": str(marker)}
    return engine, marker, engine.up(config, secret_keys=["key"], check=False)


def test_real_ssh_a_pin_to_another_key_fails_before_any_command_runs(sshd_with_generated_key: LocalSshd, tmp_path: Path) -> None:
    seen = len(sshd_with_generated_key.log_path.read_text())  # the daemon is the module's: read only this test's part
    engine, marker, report = _up(sshd_with_generated_key, tmp_path, generate_ed25519()[1])
    assert not report.ok and not marker.exists()
    assert report.op("touch") == "failed", report.summary()
    assert "after 1 failed attempts: ssh: handshake failed: ssh: host key mismatch" in report.errors[0], report.errors
    assert engine.resources() == {}
    log = sshd_with_generated_key.log_path.read_text()[seen:]
    assert "Connection closed by authenticating user" in log or "Connection closed by" in log, log
    assert "Accepted publickey" not in log


def test_real_ssh_the_generated_key_served_by_sshd_is_accepted(sshd_with_generated_key: LocalSshd, tmp_path: Path) -> None:
    """Control: the same setup pinned to the key the server really has runs the command."""
    _, marker, report = _up(sshd_with_generated_key, tmp_path, sshd_with_generated_key.host_key)
    assert report.ok, report.output
    assert report.op("touch") == "create" and marker.exists()


# ---------------------------------------------------------------- the metadata service


@pytest.fixture
def metadata_netns(tmp_path: Path) -> Iterator[str]:
    """A private network namespace with an HTTP server on 169.254.169.254, standing in for Hetzner's metadata service."""
    ns = f"cgvmeta{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    server: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "169.254.169.254/32", "dev", "lo"], check=True)
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "http.server", "--bind", "169.254.169.254", "80"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=tmp_path,
        )
        deadline = time.monotonic() + 20
        while _fetch(ns, as_user=None) != "200":
            assert time.monotonic() < deadline and server.poll() is None, "metadata stand-in did not start"
            time.sleep(0.1)
        yield ns
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        subprocess.run(["ip", "netns", "delete", ns], check=False)


def _fetch(ns: str, as_user: str | None) -> str:
    curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "http://169.254.169.254/"]
    user = ["runuser", "-u", as_user, "--"] if as_user else []
    return subprocess.run(["ip", "netns", "exec", ns, *user, *curl], capture_output=True, text=True, check=False).stdout


@pytest.mark.parametrize("runner", ["bootcmd", "unit"])
def test_only_root_can_read_the_metadata_service_after_boot(metadata_netns: str, runner: str) -> None:
    """The cloud-config's bootcmd, run as cloud-init runs it, or the script as its unit's ExecStart
    runs it (every boot: twice here), blocks every other user."""
    (bootcmd,) = yaml.safe_load(render_user_data(*generate_ed25519()))["bootcmd"]
    argv = bootcmd if runner == "bootcmd" else ["sh", str(metadata_filter.SCRIPT)]
    assert _fetch(metadata_netns, as_user="nobody") == "200"  # control: readable by anyone before
    for _boot in range(2):
        subprocess.run(["ip", "netns", "exec", metadata_netns, *argv], check=True, capture_output=True)
    assert _fetch(metadata_netns, as_user=None) == "200", "root (cloud-init) still reads it"
    assert _fetch(metadata_netns, as_user="nobody") == "000", "any other user is refused"
    rules = subprocess.run(["ip", "netns", "exec", metadata_netns, "nft", "list", "ruleset"], capture_output=True, text=True, check=True)
    assert rules.stdout.count("169.254.169.254") == 1, "a second boot does not stack rules"


# ---------------------------------------------------------------- the real engine runs the dynamic provider

KEY_PROGRAM = """
import pulumi
from components.server.host_key import HostKey

key = HostKey("server-host-key")
pulumi.export("publicKey", key.public_key)
"""


def test_the_real_engine_creates_the_key_once_keeps_it_and_encrypts_its_private_half(tmp_path: Path) -> None:
    """The engine runs the dynamic provider through its plugin host (`pulumi-resource-pulumi-python`, which runs
    `python -m pulumi.dynamic` in the project's virtualenv): `create` once, then its `diff` keeps it."""
    engine = RealEngine(tmp_path, program=KEY_PROGRAM)
    first = engine.up({})
    assert first.ops() == {"server-host-key": "create"}, first.summary()
    public = first.outputs["publicKey"]
    assert public.startswith("ssh-ed25519 ")
    (stored,) = engine.resources().values()
    assert stored["additionalSecretOutputs"] == ["private_key"] and is_secret_in_state(stored["outputs"]["private_key"])
    shown = json.loads(engine.cli("stack", "export", "--show-secrets").stdout)
    (revealed,) = [r for r in shown["deployment"]["resources"] if r["urn"].endswith("::server-host-key")]
    assert public_of(json.loads(revealed["outputs"]["private_key"]["plaintext"])) == public
    again = engine.up({})
    assert again.ops() == {"server-host-key": "same"} and again.outputs["publicKey"] == public, "never regenerated"
    assert "PRIVATE KEY" not in engine.raw_state(), "the private half is encrypted in state"
    assert public in engine.raw_state()
