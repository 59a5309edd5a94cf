"""An SSH host key the program generates for a server it creates, kept in state as a secret.

The key reaches the server through cloud-init's `ssh_keys` (the server never generates its own),
and its public half pins every connection to that server, so even the first connection is
checked. A Python dynamic provider using `cryptography` needs no extra plugin (pulumi-tls's
`PrivateKey` would be the idiomatic resource, but its provider is one more binary to build and
ship). The key is created once and never changes: `diff` reports no change whatever the inputs,
because a new key would no longer match the server (user data is ignored after creation).
"""

from __future__ import annotations

import uuid
from typing import Any

import pulumi
import pulumi.dynamic
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


def generate_ed25519() -> tuple[str, str]:
    """(private key in OpenSSH PEM form, public key line 'ssh-ed25519 AAAA...')."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return private, public


class HostKeyProvider(pulumi.dynamic.ResourceProvider):
    """Creates an ed25519 key pair once; never updates or replaces it."""

    def create(self, props: dict[str, Any]) -> pulumi.dynamic.CreateResult:
        private, public = generate_ed25519()
        return pulumi.dynamic.CreateResult(id_=uuid.uuid4().hex, outs={"private_key": private, "public_key": public})

    def diff(self, _id: str, _olds: dict[str, Any], _news: dict[str, Any]) -> pulumi.dynamic.DiffResult:
        return pulumi.dynamic.DiffResult(changes=False)


class HostKey(pulumi.dynamic.Resource, module="cognivern", name="HostKey"):
    """`private_key` (secret, for cloud-init) and `public_key` (the pin)."""

    private_key: pulumi.Output[str]
    public_key: pulumi.Output[str]

    def __init__(self, name: str, opts: pulumi.ResourceOptions | None = None) -> None:
        secret = pulumi.ResourceOptions(additional_secret_outputs=["private_key"])
        super().__init__(HostKeyProvider(), name, {"private_key": None, "public_key": None}, pulumi.ResourceOptions.merge(opts, secret))


def user_data_with_host_key(base: str, private_key: str, public_key: str) -> str:
    """The cloud-config `base` plus `ssh_keys`: cloud-init removes the image's host keys and
    installs only this one (cc_ssh: with `ssh_keys` set it generates no other type)."""
    block = yaml.safe_dump({"ssh_keys": {"ed25519_private": private_key, "ed25519_public": public_key}}, default_style=None, width=4096)
    return base.rstrip("\n") + "\n" + block
