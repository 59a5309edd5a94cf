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

from components.envfile import drift_warnings, load_env_example
from components.host import Host, HostArgs
from components.release.component import ArtifactError, Release, ReleaseArgs, resolve_artifact, rolling_activation
from components.security import security_warnings
from components.settings import NAMESPACE, ConfigError, parse_settings
from components.shutdown import exit_quietly_on_interrupt
from components.topology import connection_to, known_hosts, node_names, ssh_command, topology

exit_quietly_on_interrupt()  # a failed step reads as its own error, not as a traceback (components/shutdown.py)
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
servers = topology(name, settings, labels)
addresses = servers.addresses


# Per server: its Host (the machine, the release tool and its config, the app's runtime files) and
# its Release. Server 1 of a one-server stack keeps today's names (`{name}`, `{name}-release`);
# otherwise server i is `{name}-{i}`, `{name}-{i}-release`. Server 1's components carry the other
# spelling as an alias (children follow their parent's), so a stack that grows to several servers,
# or shrinks back to one, keeps server 1's state: nothing runs there again.
nodes = node_names(name, settings)
releases: list[Release] = []
for node, address, pin, server_id in zip(nodes.names, addresses, servers.pins, servers.server_ids, strict=True):
    connection = connection_to(settings, address, pin)
    host = Host(node, HostArgs(connection=connection, settings=settings), pulumi.ResourceOptions(aliases=nodes.aliases(node)))
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
                install_first=len(nodes.names) > 1,
            ),
            pulumi.ResourceOptions(aliases=nodes.aliases(f"{node}-release")),
            defer_activation=True,
        )
    )
# uploads and installs everywhere at once; activations one server at a time, in this order
rolling_activation(releases)


def server_entry(node: str, address: pulumi.Input[str], release: Release) -> pulumi.Output[dict[str, Any]]:
    def entry(values: list[Any]) -> dict[str, Any]:
        return {"name": node, "address": values[0], "activeRelease": values[1], "sshCommand": values[2]}

    return pulumi.Output.all(address, release.active_release, ssh_command(settings, address)).apply(entry)


for key, value in servers.exports.items():
    pulumi.export(key, value)
first = releases[0]
if settings.domain is not None:
    pulumi.export("url", f"https://{settings.domain}/")
else:
    pulumi.export("url", pulumi.Output.concat("http://", settings.named_server or servers.public_address, "/"))
pulumi.export("sshCommand", ssh_command(settings, addresses[0]))
pulumi.export("knownHosts", pulumi.Output.all(*addresses, *servers.pins).apply(lambda values: known_hosts(settings, values)))
pulumi.export("activeRelease", first.active_release)
pulumi.export("previousRelease", first.previous_release)
pulumi.export("releases", first.releases)
pulumi.export(
    "servers", [server_entry(node, address, release) for node, address, release in zip(nodes.names, addresses, releases, strict=True)]
)
