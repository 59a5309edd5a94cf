"""cognivern-infra: Hetzner servers (or existing hosts) prepared for Cognivern, and their release.

Thin on purpose: read and validate the stack settings once, wire the components, export.
One server keeps the names it always had; several are indexed (`-1`, `-2`, ...), sit behind a
load balancer (created servers) and take a release one activation at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pulumi
from pulumi.runtime.config import is_config_secret
from pulumi_command import remote

from components.balancer import Balancer, BalancerArgs
from components.envfile import drift_warnings, load_env_example
from components.host import Host, HostArgs
from components.release import ArtifactError, Release, ReleaseArgs, resolve_artifact, rolling_activation
from components.security import security_warnings
from components.server import Server, ServerArgs
from components.settings import NAMESPACE, ConfigError, parse_settings

PROJECT_DIR = Path(__file__).resolve().parent
config = pulumi.Config(NAMESPACE)
try:
    settings = parse_settings(config.get, lambda key: is_config_secret(f"{NAMESPACE}:{key}"), stack=pulumi.get_stack())
    artifact = resolve_artifact(settings.release, PROJECT_DIR, settings.artifact, settings.artifact_url, settings.artifact_sha256)
except (ConfigError, ArtifactError) as err:
    raise pulumi.RunError(str(err)) from None
stack_file = PROJECT_DIR / f"Pulumi.{pulumi.get_stack()}.yaml"
for warning in [
    *settings.warnings,
    *drift_warnings(load_env_example(PROJECT_DIR / ".env.example"), settings),
    *security_warnings(settings, stack_file),
]:
    pulumi.log.warn(warning)

name = f"cognivern-{pulumi.get_stack()}"
labels = {"app": "cognivern", "stack": pulumi.get_stack(), "managed-by": "pulumi"}
addresses: list[pulumi.Input[str]]
# The pin of each server's host key, in server order (None: not checked; warned above).
pins: list[pulumi.Input[str] | None]
public_address: pulumi.Input[str]
server_ids: list[pulumi.Output[Any] | None]
if settings.creates_server:
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
    addresses = list(server.ipv4_addresses)
    server_ids = list(server.server_ids)
    # A server created before the program generated host keys ignores the new user data: its
    # operator pins its real key with cognivern:hostKey/hostKeys (README, "Host keys").
    pins = [
        pulumi.Output.all(address, generated).apply(lambda v: settings.created_server_pin(v[0]) or v[1])
        for address, generated in zip(server.ipv4_addresses, server.host_keys, strict=True)
    ]
    public_address = server.ipv4_address
    if settings.servers > 1:
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
                domain=settings.server_name if settings.server_name != "_" else None,
                tls_domain=settings.domain,
            ),
        )
        public_address = balancer.ipv4_address
        pulumi.export("loadBalancerIpv4Address", balancer.ipv4_address)
        pulumi.export("loadBalancerIpv6Address", balancer.ipv6_address)
    else:
        pulumi.export("ipv4Address", server.ipv4_address)
        pulumi.export("ipv6Address", server.ipv6_address)
elif settings.hosts:
    addresses = list(settings.hosts)
    server_ids = [None] * len(addresses)
    pins = [settings.host_key_for(address) for address in settings.hosts]
    public_address = settings.hosts[0]
    pulumi.export("hosts", list(settings.hosts))
else:
    assert settings.host is not None
    addresses = [settings.host]
    server_ids = [None]
    pins = [settings.host_key]
    public_address = settings.host
    pulumi.export("host", settings.host)


def connection_to(address: pulumi.Input[str], host_key: pulumi.Input[str] | None) -> remote.ConnectionArgs:
    return remote.ConnectionArgs(
        host=address,
        port=settings.ssh_port,
        user=settings.ssh_user,
        private_key=pulumi.Output.secret(settings.ssh_private_key) if settings.ssh_private_key else None,
        host_key=host_key,
        dial_error_limit=30,
    )


def known_hosts(values: list[Any]) -> str:
    """known_hosts lines for the pinned servers (`pulumi stack output knownHosts >> ~/.ssh/known_hosts`)."""
    count = len(values) // 2
    target = "{}" if settings.ssh_port == 22 else f"[{{}}]:{settings.ssh_port}"
    return "".join(f"{target.format(a)} {k}\n" for a, k in zip(values[:count], values[count:], strict=True) if k)


# One Host and one Release per server. Server 1 of a one-server stack keeps today's names
# (`{name}`, `{name}-release`); otherwise server i is `{name}-{i}` and `{name}-{i}-release`.
nodes = [f"{name}-{index}" if settings.indexed else name for index in range(1, len(addresses) + 1)]
releases: list[Release] = []
for node, address, pin, server_id in zip(nodes, addresses, pins, server_ids, strict=True):
    connection = connection_to(address, pin)
    host = Host(node, HostArgs(connection=connection, settings=settings))
    releases.append(
        Release(
            f"{node}-release",
            ReleaseArgs(
                connection=connection,
                release=settings.release,
                root=settings.root,
                keep_releases=settings.keep_releases,
                artifact=artifact,
                sudo=settings.ssh_user != "root",
                depends_on=host.ready,
                server_id=server_id,
            ),
            defer_activation=True,
        )
    )
# uploads and installs everywhere at once; activations one server at a time, in this order
rolling_activation(releases)

first = releases[0]
if settings.domain is not None:
    pulumi.export("url", f"https://{settings.domain}/")
else:
    web_host = settings.server_name if settings.server_name != "_" else public_address
    pulumi.export("url", pulumi.Output.concat("http://", web_host, "/"))
pulumi.export("sshCommand", pulumi.Output.concat("ssh -p ", str(settings.ssh_port), " ", settings.ssh_user, "@", addresses[0]))
pulumi.export("knownHosts", pulumi.Output.all(*addresses, *pins).apply(known_hosts))
pulumi.export("activeRelease", first.active_release)
pulumi.export("previousRelease", first.previous_release)
pulumi.export("releases", first.releases)


def server_entry(node: str, address: pulumi.Input[str], release: Release) -> pulumi.Output[dict[str, Any]]:
    def entry(values: list[Any]) -> dict[str, Any]:
        ssh = f"ssh -p {settings.ssh_port} {settings.ssh_user}@{values[0]}"
        return {"name": node, "address": values[0], "activeRelease": values[1], "sshCommand": ssh}

    return pulumi.Output.all(address, release.active_release).apply(entry)


pulumi.export("servers", [server_entry(node, address, release) for node, address, release in zip(nodes, addresses, releases, strict=True)])
