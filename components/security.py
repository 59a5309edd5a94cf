"""Warnings about what a stack leaves exposed: unpinned host keys, SSH open to the world, and
secrets written in clear text into the stack file.

They repeat on every preview until fixed, each with the exact command that fixes it. The stack
file check exists because Pulumi cannot see the mistake: `pulumi config set --path
'cognivern:secretEnv.NEW' value` without `--secret` writes that leaf in clear text, yet the whole
`secretEnv` object still counts as secret once any other leaf is (`config.Value.Secure()`), so
the program's own "must be stored encrypted" check never fires.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from components.settings import NAMESPACE, SECRET_KEYS, Settings, config_command

WORLD = frozenset({"0.0.0.0/0", "::/0"})


def host_key_warnings(s: Settings) -> list[str]:
    """One warning per existing server whose host key nobody pinned (every connection then trusts any key)."""
    out = []
    for address in s.unpinned_hosts:
        key = f"'{NAMESPACE}:hostKeys[\"{address}\"]' --path" if s.hosts else f"{NAMESPACE}:hostKey"
        out.append(
            f"{address}: the SSH host key is not checked, so every deploy sends its secrets and root commands to whoever answers. Pin it: "
            f"ssh-keyscan -p {s.ssh_port} -t ed25519 {address} > /tmp/hostkey; ssh-keygen -lf /tmp/hostkey "
            "(compare with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the server's console); "
            f"{s.config_command} set {key} \"$(cut -d' ' -f2- /tmp/hostkey)\""
            + (f" (or set {NAMESPACE}:requireHostKey true to refuse unpinned hosts)" if not s.require_host_key else "")
        )
    return out


def ssh_exposure_warnings(s: Settings) -> list[str]:
    """SSH reachable from anywhere through the Hetzner firewall (created servers only: it is their firewall)."""
    if not s.creates_server or not WORLD & set(s.ssh_allowed_cidrs):
        return []
    return [
        f"SSH (port 22) is open to the whole internet ({', '.join(sorted(WORLD & set(s.ssh_allowed_cidrs)))}). "
        f"Allow only your address: {s.config_command} rm {NAMESPACE}:sshAllowedCidrs && "
        f"{s.config_command} set --path '{NAMESPACE}:sshAllowedCidrs[0]' YOUR.IP.ADDRESS/32"
    ]


def _plain_leaves(value: Any, path: str) -> Iterator[str]:
    if isinstance(value, Mapping):
        if set(value) == {"secure"}:
            return
        if not value:
            return
        for key, item in value.items():
            yield from _plain_leaves(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _plain_leaves(item, f"{path}[{index}]")
    elif value is not None and value != "":
        yield path


def plain_secret_leaves(stack_config: Mapping[str, Any]) -> list[str]:
    """Paths under the secret keys of a stack file's `config:` whose value is not `{secure: ...}`."""
    out: list[str] = []
    for key in SECRET_KEYS:
        full = f"{NAMESPACE}:{key}"
        if full in stack_config:
            out.extend(_plain_leaves(stack_config[full], full))
    return out


def stack_file_warnings(path: Path) -> list[str]:
    """Clear-text leaves under the secret keys in a stack file (none when the file does not exist)."""
    if not path.is_file():
        return []
    data = yaml.safe_load(path.read_text()) or {}
    stack = path.name.removeprefix("Pulumi.").removesuffix(".yaml")
    return [
        f"{path.name} holds {leaf} in clear text: it is in git history and in every checkout. "
        f"Re-set it encrypted: {config_command(stack)} set --secret --path '{leaf}' (then rotate the value)"
        for leaf in plain_secret_leaves(data.get("config") or {})
    ]


def security_warnings(s: Settings, stack_file: Path) -> list[str]:
    return [*host_key_warnings(s), *ssh_exposure_warnings(s), *stack_file_warnings(stack_file)]
