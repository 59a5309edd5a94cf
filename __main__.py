"""cognivern-infra: a Hetzner server (or an existing host) prepared for Cognivern, and its release.

Thin on purpose: read and validate the stack settings once, wire the components, export.
"""

from __future__ import annotations

from pathlib import Path

import pulumi
from pulumi.runtime.config import is_config_secret
from pulumi_command import remote

from components.envfile import drift_warnings, load_env_example
from components.host import Host, HostArgs
from components.release import ArtifactError, Release, ReleaseArgs, resolve_artifact
from components.server import Server, ServerArgs
from components.settings import NAMESPACE, ConfigError, parse_settings

PROJECT_DIR = Path(__file__).resolve().parent
config = pulumi.Config(NAMESPACE)
try:
    settings = parse_settings(config.get, lambda key: is_config_secret(f"{NAMESPACE}:{key}"))
    artifact = resolve_artifact(settings.release, PROJECT_DIR, settings.artifact, settings.artifact_url, settings.artifact_sha256)
except (ConfigError, ArtifactError) as err:
    raise pulumi.RunError(str(err)) from None
for warning in [*settings.warnings, *drift_warnings(load_env_example(PROJECT_DIR / ".env.example"), settings)]:
    pulumi.log.warn(warning)

name = f"cognivern-{pulumi.get_stack()}"
address: pulumi.Input[str]
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
            labels={"app": "cognivern", "stack": pulumi.get_stack(), "managed-by": "pulumi"},
        ),
    )
    address = server.ipv4_address
    pulumi.export("ipv4Address", server.ipv4_address)
    pulumi.export("ipv6Address", server.ipv6_address)
else:
    assert settings.host is not None
    address = settings.host
    pulumi.export("host", settings.host)

connection = remote.ConnectionArgs(
    host=address,
    port=settings.ssh_port,
    user=settings.ssh_user,
    private_key=pulumi.Output.secret(settings.ssh_private_key) if settings.ssh_private_key else None,
    host_key=settings.host_key,
    dial_error_limit=30,
)
host = Host(name, HostArgs(connection=connection, settings=settings))
release = Release(
    f"{name}-release",
    ReleaseArgs(
        connection=connection,
        release=settings.release,
        root=settings.root,
        keep_releases=settings.keep_releases,
        artifact=artifact,
        sudo=settings.ssh_user != "root",
        depends_on=host.ready,
    ),
)

web_host = settings.server_name if settings.server_name != "_" else address
pulumi.export("url", pulumi.Output.concat("http://", web_host, "/"))
pulumi.export("sshCommand", pulumi.Output.concat("ssh -p ", str(settings.ssh_port), " ", settings.ssh_user, "@", address))
pulumi.export("activeRelease", release.active_release)
pulumi.export("previousRelease", release.previous_release)
pulumi.export("releases", release.releases)
