"""Whole-string validation: every settings pattern refuses a trailing newline, and the account/path rules.

Python's `$` also matches before a final newline, so `re.match(r"^[A-Z_]+$", "id\\n")` passes; the
`.env` would then get a line that runs `id` when sourced. Every pattern is checked here, so a new
one without a sample (or with `$`) fails this module.
"""

from __future__ import annotations

import re

import pytest

from components import settings
from components.settings import ConfigError, parse_settings

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ8b0pTBp5e8hGQHDgNnLrHHOHxg0VHzUXoTWlBXDk8S deploy"
BASE = {"release": "20261128120000-abc1234", "sshPublicKey": KEY}

# One value each pattern accepts; the test adds "\n" (and other line ends) to it.
SAMPLES = {
    "RELEASE_ID_RE": "v1",
    "ENV_KEY_RE": "API_KEY",
    "USER_RE": "cognivern",
    "APP_NAME_RE": "cognivern-agent",
    "HOSTNAME_RE": "app.example.com",
    "SERVER_NAME_RE": "api.example.com",
    "LISTEN_RE": "80",
    "SERVER_TYPE_RE": "cx23",
    "IMAGE_RE": "ubuntu-24.04",
    "SHA256_RE": "0" * 64,
    "DOMAIN_RE": "api.example.com",
    "EMAIL_RE": "ops@example.com",
    "ACME_SERVER_RE": "https://acme-staging-v02.api.letsencrypt.org/directory",
    "HOST_KEY_RE": KEY,
    "PUBLIC_KEY_RE": KEY,
    "LOAD_BALANCER_TYPE_RE": "lb11",
    "ROOT_CHARS_RE": "/opt/cognivern",
    "HEALTH_PATH_RE": "/health",
    "ARTIFACT_URL_RE": "https://example.com/a.tar.gz",
}
PATTERNS = {name: value for name, value in vars(settings).items() if isinstance(value, re.Pattern)}


def test_every_pattern_has_a_sample() -> None:
    assert set(PATTERNS) == set(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize("tail", ["\n", "\r\n", "\nid", "\r", "\0"])
def test_patterns_match_whole_strings_only(name: str, tail: str) -> None:
    pattern = PATTERNS[name]
    assert pattern.fullmatch(SAMPLES[name]) and pattern.match(SAMPLES[name])
    assert not pattern.fullmatch(SAMPLES[name] + tail)
    assert not pattern.match(SAMPLES[name] + tail), f"{name} accepts {SAMPLES[name] + tail!r} with .match"


def parse(**overrides: str) -> settings.Settings:
    raw = {**BASE, **overrides}
    return parse_settings(lambda k: raw.get(k))


# Values that reach the program through JSON (not through the single-line string reader).
NEWLINE_IN_JSON = [
    ({"env": '{"id\\n": "x"}'}, "cognivern:env: 'id\\n' is not a valid environment variable name"),
    ({"secretEnv": '{"A\\n": "x"}'}, "cognivern:secretEnv: 'A\\n' is not a valid"),
    ({"nginxListen": '["80\\n"]'}, "cognivern:nginxListen: '80\\n' is not allowed"),
    ({"hosts": '["192.0.2.1"]', "hostKeys": '{"192.0.2.1": "' + KEY + '\\n"}'}, "cognivern:hostKeys:"),
    ({"hosts": '["192.0.2.1"]', "hostKeys": '{"192.0.2.1": "' + KEY + '\\rx"}'}, "cognivern:hostKeys:"),
    ({"hosts": '["example.com\\n"]'}, "cognivern:hosts:"),
]


@pytest.mark.parametrize(("overrides", "message"), NEWLINE_IN_JSON)
def test_newlines_inside_json_values_are_refused(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(**overrides)
    assert str(err.value).startswith(message), str(err.value)


SYSTEM_ROOTS = ["/etc", "/etc/cognivern", "/usr", "/usr/local/cognivern", "/home", "/home/cognivern", "/var/lib", "/var"]
SYSTEM_ROOTS += ["/opt", "/srv", "/root", "/root/app", "/boot", "/bin", "/sbin", "/lib", "/proc/1", "/sys", "/dev", "/run"]
OWN_ROOTS = ["/opt/cognivern", "/srv/cognivern", "/var/lib/cognivern", "/data/cognivern", "/srv/cgv_root_x", "/etcetera", "/tmpfiles/x"]
SHARED_TEMP_ROOTS = ["/tmp", "/tmp/cgv_root_x", "/var/tmp/cognivern", "/dev/shm/x"]


@pytest.mark.parametrize("root", SYSTEM_ROOTS)
def test_system_directories_are_refused_as_root(root: str) -> None:
    with pytest.raises(ConfigError, match=r"^cognivern:root: .* is a system directory"):
        parse(root=root)


@pytest.mark.parametrize("root", OWN_ROOTS)
def test_directories_of_their_own_are_accepted_as_root(root: str) -> None:
    assert parse(root=root).root == root


@pytest.mark.parametrize("user", ["www-data", "nobody", "daemon", "sshd", "systemd-network", "_apt", "postgres", "ubuntu", "sudo"])
def test_system_accounts_are_refused_as_app_user(user: str) -> None:
    with pytest.raises(ConfigError, match=f"^cognivern:appUser: '{user}' is a system account"):
        parse(appUser=user)


def test_app_user_must_differ_from_ssh_user() -> None:
    with pytest.raises(ConfigError, match=r"^cognivern:appUser: must differ from cognivern:sshUser \(deploy\)"):
        parse(appUser="deploy", sshUser="deploy")
    assert parse(appUser="cognivern", sshUser="deploy").app_user == "cognivern"


@pytest.mark.parametrize(("major", "ok"), [("17", False), ("18", True), ("22", True), ("26", True), ("27", False), ("40", False)])
def test_node_major_is_bounded(major: str, ok: bool) -> None:
    if ok:
        assert parse(nodeMajor=major).node_major == int(major)
    else:
        with pytest.raises(ConfigError, match=r"^cognivern:nodeMajor: must be a whole number from 18 to 26"):
            parse(nodeMajor=major)


CANDIDATE_ROOTS = [
    *SYSTEM_ROOTS,
    *OWN_ROOTS,
    *SHARED_TEMP_ROOTS,
    "/var/www",
    "/var/www/app",
    "/snap",
    "/mnt/data/app",
    "/usr2",
    "/homework",
]
