"""Stack settings: a table of raw config -> the error that must name the key (pyinfra-style)."""

from __future__ import annotations

import json

import pytest

from components.settings import ConfigError, Settings, parse_settings

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ8b0pTBp5e8hGQHDgNnLrHHOHxg0VHzUXoTWlBXDk8S deploy"
BASE = {"release": "20261128120000-abc1234", "sshPublicKey": KEY}


def parse(**overrides: str | None) -> Settings:
    raw = {**BASE, **overrides}
    return parse_settings(lambda k: raw.get(k))


def test_defaults_follow_the_document() -> None:
    s = parse()
    assert (s.root, s.app_user, s.app_name, s.port, s.instances, s.node_major) == (
        "/opt/cognivern",
        "cognivern",
        "cognivern-agent",
        3000,
        1,
        22,
    )
    assert (s.ssh_user, s.ssh_port, s.server_type, s.location, s.image) == ("root", 22, "cx23", "fsn1", "ubuntu-24.04")
    assert (s.keep_releases, s.protect, s.backups, s.agents_enabled) == (5, True, False, False)
    assert s.ssh_allowed_cidrs == ("0.0.0.0/0", "::/0")
    assert s.creates_server and s.warnings == ()
    assert s.stack_env == {"PORT": "3000", "HOST": "127.0.0.1", "AGENTS_ENABLED": "false"}


def test_existing_host_needs_no_public_key() -> None:
    s = parse_settings({"release": "v1", "host": "10.0.0.5"}.get)
    assert s.host == "10.0.0.5" and not s.creates_server


def test_env_values_may_hold_any_printable_text() -> None:
    """Secrets contain $, quotes and ; routinely: they travel on stdin and are shell-quoted in .env, never interpolated."""
    value = "p@ss'w\"ord $(id) `id` ;|& \\ \t end"
    assert parse(secretEnv=json.dumps({"K": value})).secret_env == {"K": value}


def test_env_values_are_normalised_to_strings() -> None:
    s = parse(env='{"FLAG": true, "N": 3, "URL": "https://x/y?a=1&b=2"}', port="8080", agentsEnabled="true")
    assert s.stack_env == {
        "PORT": "8080",
        "HOST": "127.0.0.1",
        "AGENTS_ENABLED": "true",
        "FLAG": "true",
        "N": "3",
        "URL": "https://x/y?a=1&b=2",
    }


def test_deprecated_server_type_warns() -> None:
    assert "deprecated" in parse(serverType="cx22").warnings[0]
    assert parse(serverType="cpx22").warnings == ()


BAD = [
    ({"release": None}, "cognivern:release: is required"),
    ({"release": "v1;rm -rf /"}, "cognivern:release: 'v1;rm -rf /' is not allowed"),
    ({"release": "$(reboot)"}, "cognivern:release"),
    ({"release": "-v1"}, "cognivern:release"),
    ({"release": "a" * 65}, "cognivern:release"),
    ({"release": "v1\nv2"}, "cognivern:release: must be a single line"),
    ({"host": "example.com;id"}, "cognivern:host"),
    ({"host": "$(id)"}, "cognivern:host"),
    ({"sshPublicKey": None}, "cognivern:sshPublicKey: is required when the program creates the server"),
    ({"sshPublicKey": "not a key"}, "cognivern:sshPublicKey"),
    ({"port": "0"}, "cognivern:port: must be a whole number from 1 to 65534, got 0"),
    ({"port": "65535"}, "cognivern:port: must be a whole number from 1 to 65534, got 65535"),  # green listens on port+1
    ({"bakeSeconds": "-1"}, "cognivern:bakeSeconds: must be a whole number from 0 to 3600, got -1"),
    ({"bakeSeconds": "3601"}, "cognivern:bakeSeconds: must be a whole number from 0 to 3600, got 3601"),
    ({"bakeSeconds": "ten"}, "cognivern:bakeSeconds"),
    ({"keepPreviousWarm": "maybe"}, "cognivern:keepPreviousWarm"),
    ({"port": "80; id"}, "cognivern:port"),
    ({"sshPort": "70000"}, "cognivern:sshPort"),
    ({"keepReleases": "1"}, "cognivern:keepReleases: must be a whole number from 2 to 100, got 1"),
    ({"env": '{"1BAD": "x"}'}, "cognivern:env: '1BAD' is not a valid environment variable name"),
    ({"env": '{"A-B": "x"}'}, "cognivern:env: 'A-B' is not a valid environment variable name"),
    ({"env": '{"A": "line1\\nline2"}'}, "cognivern:env: A must be a single line"),
    ({"env": '{"PORT": "1"}'}, "cognivern:env: PORT is set by the program"),
    ({"env": '["A"]'}, "cognivern:env: must be an object"),
    ({"secretEnv": '{"K": "a\\rb"}'}, "cognivern:secretEnv: K must be a single line"),
    ({"env": '{"K": "bell\\u0007"}'}, "cognivern:env: K must be a single line of printable characters"),
    ({"env": '{"K": "esc\\u001b[31m"}'}, "cognivern:env: K must be a single line of printable characters"),
    ({"secretEnv": '{"K": "1"}', "env": '{"K": "2"}'}, "cognivern:secretEnv: K also set in cognivern:env"),
    ({"root": "opt/cognivern"}, "cognivern:root: 'opt/cognivern' must be an absolute, normalised path"),
    ({"root": "/opt/../etc"}, "cognivern:root"),
    ({"root": "/opt/cognivern/"}, "cognivern:root"),
    ({"root": "/opt//cognivern"}, "cognivern:root"),
    ({"root": "/"}, "cognivern:root"),
    ({"root": "/opt/cog nivern"}, "cognivern:root: '/opt/cog nivern' may contain only"),
    # sticky, world-writable: another user creates it first, temp cleanup deletes releases and data
    ({"root": "/tmp/cognivern"}, "cognivern:root: '/tmp/cognivern' is /tmp or inside it, which every local user can write"),
    ({"root": "/tmp"}, "cognivern:root: '/tmp' is /tmp or inside it"),
    ({"root": "/var/tmp/cognivern"}, "cognivern:root: '/var/tmp/cognivern' is /var/tmp or inside it"),
    ({"root": "/dev/shm/cognivern"}, "cognivern:root: '/dev/shm/cognivern' is /dev/shm or inside it"),
    ({"root": "/run/lock/cognivern"}, "cognivern:root: '/run/lock/cognivern' is /run/lock or inside it"),
    ({"root": "/var/lock/cognivern/app"}, "cognivern:root: '/var/lock/cognivern/app' is /var/lock or inside it"),
    ({"root": "/var/crash/cognivern"}, "cognivern:root: '/var/crash/cognivern' is /var/crash or inside it"),
    ({"appUser": "root"}, "cognivern:appUser: must not be root"),
    ({"appUser": "Bad User"}, "cognivern:appUser"),
    ({"appName": "a b"}, "cognivern:appName"),
    ({"location": "moon1"}, "cognivern:location: 'moon1' is not a Hetzner location"),
    ({"serverType": "cx23;id"}, "cognivern:serverType"),
    ({"sshAllowedCidrs": '["10.0.0.300/8"]'}, "cognivern:sshAllowedCidrs: '10.0.0.300/8' is not an IPv4 or IPv6 CIDR"),
    ({"sshAllowedCidrs": "[]"}, "cognivern:sshAllowedCidrs: must list at least one CIDR"),
    ({"protect": "maybe"}, "cognivern:protect: must be true or false"),
    ({"instances": "0"}, "cognivern:instances"),
    ({"hostKey": "AAAA"}, "cognivern:hostKey"),
    ({"healthPath": "/health;id"}, "cognivern:healthPath"),
    ({"nginxListen": '["80; include /etc/passwd"]'}, "cognivern:nginxListen"),
    ({"nginxListen": '["99999"]'}, "cognivern:nginxListen: '99999': port must be 1-65535"),
    ({"serverName": "a b"}, "cognivern:serverName"),
    ({"artifactUrl": "https://example.com/a.tgz"}, "cognivern:artifactSha256: is required with cognivern:artifactUrl"),
    ({"artifactUrl": "http://example.com/a.tgz", "artifactSha256": "0" * 64}, "cognivern:artifactUrl"),
    ({"artifactUrl": "https://example.com/a.tgz?x=$(id)", "artifactSha256": "0" * 64}, "cognivern:artifactUrl"),
    ({"artifactSha256": "XYZ"}, "cognivern:artifactSha256"),
    ({"artifact": "a.tgz", "artifactUrl": "https://e.com/a.tgz", "artifactSha256": "0" * 64}, "cognivern:artifact: set either"),
    ({"sshPrivateKey": "hunter2"}, "cognivern:sshPrivateKey: must be a PEM/OpenSSH private key"),
    ({"servers": "0"}, "cognivern:servers: must be a whole number from 1 to 10, got 0"),
    ({"servers": "11"}, "cognivern:servers: must be a whole number from 1 to 10, got 11"),
    ({"servers": "2", "host": "192.0.2.1"}, "cognivern:servers: only counts servers the program creates"),
    ({"loadBalancerType": "LB11"}, "cognivern:loadBalancerType: 'LB11' is not allowed"),
    ({"hosts": '["192.0.2.1"]', "host": "192.0.2.2"}, "cognivern:hosts: set either cognivern:host"),
    ({"hosts": '["192.0.2.1", "$(id)"]'}, "cognivern:hosts: '$(id)' is not allowed"),
    ({"hosts": '["192.0.2.1", 7]'}, "cognivern:hosts: 7 is not an address"),
    ({"hosts": '["2001:db8::1", "2001:DB8::1"]'}, "cognivern:hosts: 2001:db8::1 is listed twice"),
    ({"hosts": json.dumps([f"192.0.2.{i}" for i in range(11)])}, "cognivern:hosts: lists 11 addresses; at most 10"),
    ({"hosts": '{"a": "192.0.2.1"}'}, "cognivern:hosts: must be a list"),
    ({"host": "192.0.2.1", "hostKeys": json.dumps({"192.0.2.1": KEY})}, "cognivern:hostKeys: pins keys of cognivern:hosts"),
    ({"hosts": '["192.0.2.1"]', "hostKeys": '{"192.0.2.1": "AAAA"}'}, "cognivern:hostKeys: 'AAAA' is not allowed"),
    ({"nodeSource": "debian"}, "cognivern:nodeSource: 'debian' is not a Node.js source; allowed: nodesource, distribution"),
    ({"nodeSource": "Distribution"}, "cognivern:nodeSource: 'Distribution' is not a Node.js source"),
    (
        {"nodeSource": "distribution", "image": "debian-12"},  # nodeMajor's default, 22
        "cognivern:nodeMajor: is 22, but cognivern:nodeSource distribution on image debian-12 gives Node 18 (its nodejs package);"
        " set cognivern:nodeMajor to 18, or cognivern:nodeSource to nodesource",
    ),
    ({"nodeSource": "distribution", "image": "debian-13", "nodeMajor": "18"}, "cognivern:nodeMajor: is 18, but cognivern:nodeSource"),
    (
        {"nodeSource": "distribution", "nodeMajor": "20"},
        "cognivern:nodeMajor: is 20, but cognivern:nodeSource distribution on image ubuntu-24.04",
    ),
    (
        {"nodeSource": "distribution", "image": "ubuntu-22.04", "nodeMajor": "18"},
        "cognivern:nodeSource: is distribution, but image ubuntu-22.04 packages Node 12, older than the 18",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[m.split(":")[1] + f"-{i}" for i, (_, m) in enumerate(BAD)])
def test_bad_values_name_the_key(overrides: dict[str, str | None], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(**overrides)
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize("key", ["secretEnv", "sshPrivateKey"])
def test_secret_keys_must_be_encrypted(key: str) -> None:
    raw = {**BASE, "secretEnv": '{"K": "v"}', "sshPrivateKey": "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----"}
    with pytest.raises(ConfigError, match=f"cognivern:{key}: must be stored encrypted: scripts/pulumi-local STACK config set --secret"):
        parse_settings(raw.get, lambda k: k != key)


GOOD_IDS = ["v1", "20261128120000-abc1234", "1.2.3", "release_2", "A" * 64]


@pytest.mark.parametrize("release", GOOD_IDS)
def test_good_release_ids(release: str) -> None:
    assert parse(release=release).release == release


@pytest.mark.parametrize("host", ["203.0.113.7", "2001:db8::7", "app.example.com"])
def test_good_hosts(host: str) -> None:
    assert parse(host=host).host == host


def test_one_server_by_default() -> None:
    s = parse()
    assert (s.servers, s.load_balancer_type, s.hosts, s.node_count, s.indexed) == (1, "lb11", (), 1, False)
    assert parse_settings({"release": "v1", "host": "192.0.2.1"}.get).node_count == 1


@pytest.mark.parametrize(
    ("location", "zone"),
    [
        ("fsn1", "eu-central"),
        ("nbg1", "eu-central"),
        ("hel1", "eu-central"),
        ("ash", "us-east"),
        ("hil", "us-west"),
        ("sin", "ap-southeast"),
    ],
)
def test_several_created_servers_and_their_network_zone(location: str, zone: str) -> None:
    s = parse(servers="3", location=location, loadBalancerType="lb21")
    assert (s.creates_server, s.node_count, s.indexed, s.network_zone, s.load_balancer_type) == (True, 3, True, zone, "lb21")


def test_existing_hosts_are_normalised_and_pinned_per_host() -> None:
    other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeHostKeyForTheSecondHost000000000000000"
    s = parse_settings(
        {
            "release": "v1",
            "hosts": '["192.0.2.1", "2001:DB8::1", "app.example.com"]',
            "hostKey": KEY,
            "hostKeys": json.dumps({"2001:db8:0::1": other}),
        }.get
    )
    assert s.hosts == ("192.0.2.1", "2001:db8::1", "app.example.com") and not s.creates_server
    assert (s.node_count, s.indexed) == (3, True)
    assert s.host_key_for("2001:db8::1") == other and s.host_key_for("192.0.2.1") == KEY
    assert parse_settings({"release": "v1", "hosts": "[]", "sshPublicKey": KEY}.get).hosts == ()


@pytest.mark.parametrize(
    ("overrides", "source", "major"),
    [
        ({}, "nodesource", 22),
        ({"nodeMajor": "24"}, "nodesource", 24),
        ({"nodeSource": "distribution", "image": "debian-12", "nodeMajor": "18"}, "distribution", 18),
        ({"nodeSource": "distribution", "image": "debian-13", "nodeMajor": "20"}, "distribution", 20),
        ({"nodeSource": "distribution", "nodeMajor": "18"}, "distribution", 18),  # the default image, ubuntu-24.04
        # An image the program knows nothing about: provisioning checks the host's own package.
        ({"nodeSource": "distribution", "image": "rocky-9", "nodeMajor": "22"}, "distribution", 22),
        # An existing host's OS is unknown until provisioning asks its apt: nothing to check here.
        ({"nodeSource": "distribution", "host": "192.0.2.1", "image": "debian-12", "nodeMajor": "22"}, "distribution", 22),
    ],
)
def test_node_source_and_the_majors_it_can_give(overrides: dict[str, str], source: str, major: int) -> None:
    s = parse(**overrides)
    assert (s.node_source, s.node_major) == (source, major)
