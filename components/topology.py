"""Where the stack deploys: servers the program creates (behind a balancer when several), or the
existing `host`/`hosts`.

`__main__` asks once and gets the addresses back, whichever it is; every per-server resource is
then wired the same way. Creating Server/Balancer here keeps their URNs: they are top-level
components, as they were when `__main__` built them inline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pulumi
from pulumi_command import remote

from components.settings import Settings


@dataclass(frozen=True)
class Topology:
    """The servers in deploy order, and what the stack exports about them."""

    addresses: list[pulumi.Input[str]]
    pins: list[pulumi.Input[str] | None]  # each server's host key pin (None: not checked; warned)
    server_ids: list[pulumi.Output[Any] | None]  # Hetzner ids of created servers (None: an existing host)
    public_address: pulumi.Input[str]  # where the web is reached without a domain: the balancer or server 1
    exports: dict[str, pulumi.Input[Any]] = field(default_factory=dict)


def topology(name: str, settings: Settings, labels: dict[str, str]) -> Topology:
    """Create the servers (and balancer) when the stack asks for them, else take the existing hosts."""
    if settings.creates_server:
        return _created(name, settings, labels)
    if settings.hosts:
        hosts: list[pulumi.Input[str]] = list(settings.hosts)
        pins = [settings.host_key_for(address) for address in settings.hosts]
        return Topology(hosts, list(pins), [None] * len(hosts), settings.hosts[0], {"hosts": list(settings.hosts)})
    assert settings.host is not None
    return Topology([settings.host], [settings.host_key], [None], settings.host, {"host": settings.host})


def _created(name: str, settings: Settings, labels: dict[str, str]) -> Topology:
    # Imported here: the Hetzner SDK and the host-key crypto cost every `pulumi up` ~0.09 s of
    # imports, which a stack on existing hosts never uses (README, "The engine's floor").
    from components.balancer import Balancer, BalancerArgs
    from components.server import Server, ServerArgs

    assert settings.ssh_public_key is not None
    server = Server(
        name,
        ServerArgs(
            ssh_public_key=settings.ssh_public_key,
            ssh_allowed_cidrs=settings.ssh_allowed_cidrs,
            server_type=settings.server_type,
            location=settings.location,
            image=settings.image,
            backups=settings.backups,
            protect=settings.protect,
            labels=labels,
            count=settings.servers,
        ),
    )
    # A server created before the program generated host keys ignores the new user data: its
    # operator pins its real key with cognivern:hostKey/hostKeys (README, "Host keys").
    pins: list[pulumi.Input[str] | None] = [
        pulumi.Output.all(address, generated).apply(lambda v: settings.created_server_pin(v[0]) or v[1])
        for address, generated in zip(server.ipv4_addresses, server.host_keys, strict=True)
    ]
    addresses: list[pulumi.Input[str]] = list(server.ipv4_addresses)
    server_ids: list[pulumi.Output[Any] | None] = list(server.server_ids)
    if settings.servers == 1:
        exports: dict[str, pulumi.Input[Any]] = {"ipv4Address": server.ipv4_address, "ipv6Address": server.ipv6_address}
        return Topology(addresses, pins, server_ids, server.ipv4_address, exports)
    balancer = Balancer(
        f"{name}-balancer",
        BalancerArgs(
            server_ids=server.server_ids,
            location=settings.location,
            network_zone=settings.network_zone,
            load_balancer_type=settings.load_balancer_type,
            health_path=settings.health_path,
            labels=labels,
            protect=settings.protect,
            domain=settings.named_server,
            tls_domain=settings.domain,
        ),
    )
    exports = {"loadBalancerIpv4Address": balancer.ipv4_address, "loadBalancerIpv6Address": balancer.ipv6_address}
    return Topology(addresses, pins, server_ids, balancer.ipv4_address, exports)


@dataclass(frozen=True)
class Nodes:
    """The per-server names: `{stack name}` for one server, `{stack name}-{i}` for several (or a `hosts` list)."""

    stack_name: str
    names: list[str]

    def aliases(self, component: str) -> list[pulumi.Alias]:
        """Server 1's components under the other spelling (`{name}-1-x` <-> `{name}-x`), so a stack that
        grows to several servers or shrinks to one keeps server 1's state; no alias for the others."""
        first = self.names[0]
        if not (component == first or component.startswith(first + "-")):
            return []
        other = f"{self.stack_name}-1" if first == self.stack_name else self.stack_name
        return [pulumi.Alias(name=other + component[len(first) :])]


def node_names(name: str, settings: Settings) -> Nodes:
    count = settings.node_count
    return Nodes(name, [f"{name}-{i}" for i in range(1, count + 1)] if settings.indexed else [name])


def connection_to(settings: Settings, address: pulumi.Input[str], host_key: pulumi.Input[str] | None) -> remote.ConnectionArgs:
    """The SSH connection every command to one server uses (the private key stays a secret)."""
    return remote.ConnectionArgs(
        host=address,
        port=settings.ssh_port,
        user=settings.ssh_user,
        private_key=pulumi.Output.secret(settings.ssh_private_key) if settings.ssh_private_key else None,
        host_key=host_key,
        dial_error_limit=30,
    )


def ssh_command(settings: Settings, address: pulumi.Input[str]) -> pulumi.Output[str]:
    """The `ssh` line the stack exports for a server (built here only)."""
    return pulumi.Output.concat("ssh -p ", str(settings.ssh_port), " ", settings.ssh_user, "@", address)


def known_hosts(settings: Settings, values: list[Any]) -> str:
    """known_hosts lines for the pinned servers (`pulumi stack output knownHosts >> ~/.ssh/known_hosts`):
    `values` is every address, then every pin, in server order."""
    count = len(values) // 2
    target = "{}" if settings.ssh_port == 22 else f"[{{}}]:{settings.ssh_port}"
    return "".join(f"{target.format(a)} {k}\n" for a, k in zip(values[:count], values[count:], strict=True) if k)
