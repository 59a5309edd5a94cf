"""The machine and the app's runtime files: everything a server (created or existing) needs before releases.

Each concern is one idempotent remote command whose script is a file here and whose data rides on
stdin; a change to the script, its arguments or the data updates the command in place, which
re-runs it (pulumi-command runs `create` again when no `update` is given): put-file.sh and
nginx-site.sh compare first and say "unchanged", so a re-run with nothing new changes nothing.
Provisioning is the exception: it takes seconds of package and account checks, so it is replaced
when its command or its stdin changes (their digest is its trigger) and does nothing when only its
connection changed (`update=NOTHING`). The release tool and its config are the ReleaseTool's
(components/tool), the releases the Release's (components/release/component.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pulumi
from pulumi_command import remote

from components import metadata_filter
from components.release.cognivern_release import facts
from components.remote import NOTHING, PUT_FILE, command, put_file, script_command
from components.render import (
    ENV_PRELOAD,
    env_preload_path,
    render_ecosystem,
    render_env,
    render_nginx_site,
    render_nginx_tls_site,
    render_upstream,
    site_name,
)
from components.settings import Settings
from components.tool import BUNDLE_MARKER, ReleaseTool, ReleaseToolArgs, bundle, release_tool_files

HERE = Path(__file__).resolve().parent
PROVISION = HERE / "provision.sh"
NGINX_SITE = HERE / "nginx-site.sh"
TLS = HERE / "tls.sh"
VERSIONS = HERE / "versions.env"
# What provision.sh installs from its stdin, each after its marker line: the metadata filter and its
# unit. (provision.sh also takes the release tool's files there, as test hosts give them in one go:
# release_tool_bundle; the program installs the tool with a command of its own, components/tool.)
BUNDLED = {
    metadata_filter.SCRIPT_NAME: metadata_filter.SCRIPT,
    metadata_filter.UNIT_NAME: metadata_filter.UNIT,
}
__all__ = [
    "BUNDLED",
    "BUNDLE_MARKER",
    "NGINX_SITE",
    "PROVISION",
    "PUT_FILE",
    "TLS",
    "Host",
    "HostArgs",
    "env_file",
    "host_bundle",
    "nginx_site_input",
    "pinned_versions",
    "provision_args",
    "release_tool_bundle",
    "release_tool_files",
]


def pinned_versions() -> dict[str, str]:
    """versions.env (KEY=VALUE lines): the PM2 and pnpm the server gets; .ci/run installs the same."""
    out: dict[str, str] = {}
    for line in VERSIONS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def host_bundle() -> str:
    """provision.sh's stdin as the program sends it: each BUNDLED file (the metadata filter and its
    unit) after a line `#--- PATH ---`, as source text in a fixed order."""
    return bundle([(name, path.read_text()) for name, path in BUNDLED.items()])


def release_tool_bundle(launcher: str | None = None) -> str:
    """provision.sh's stdin with the release tool's files in front (test hosts that prepare a host in
    one command); `launcher`: a stand-in text for the launcher alone, for tests."""
    return bundle(release_tool_files(launcher)) + host_bundle()


def nginx_site_input(s: Settings, site: str) -> str:
    """nginx-site.sh's stdin: the site, then the upstream file it creates when missing (blue live)."""
    return f"{site}#--- {site_name(s.app_name)}.upstream ---\n{render_upstream(s, s.port)}"


def env_file(s: Settings) -> tuple[str, str, str]:
    """shared/.env's path, mode and owner: root's, readable by the app's own group. The app cannot
    rewrite it, so it is root's copy of the secret values the release tool masks the app's output with
    (a copy the app owned let it choose what was masked); the tool reads it as data and hands it to PM2."""
    return f"{s.root}/shared/.env", "0640", f"root:{s.app_user}"


def provision_args(s: Settings) -> list[str]:
    """provision.sh's arguments for these settings."""
    pins = pinned_versions()
    account = ["--root", s.root, "--app-user", s.app_user, "--build-user", facts.build_user(s.app_user), "--ssh-user", s.ssh_user]
    node = ["--node-major", str(s.node_major), "--node-source", s.node_source]
    versions = ["--pm2-version", pins["PM2_VERSION"], "--pnpm-version", pins["PNPM_VERSION"]]
    # the metadata filter (components/metadata_filter): servers the program created, or metadataFilter
    return [*account, *node, *versions, "--metadata-filter", "yes" if s.filters_metadata else "no"]


def digest(*texts: str) -> str:
    """A command's work as one trigger value (sha256 of its texts)."""
    h = hashlib.sha256()
    for text in texts:
        h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()


@dataclass(frozen=True)
class HostArgs:
    connection: remote.ConnectionArgs
    settings: Settings


class Host(pulumi.ComponentResource):
    """Prepares the host and writes the app's runtime files; `ready` lists what releases wait for."""

    provision: remote.Command
    ready: list[pulumi.Resource]

    def __init__(self, name: str, args: HostArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("cognivern:index:Host", name, {}, opts)
        s = args.settings
        sudo, connection = s.ssh_user != "root", args.connection

        def put(
            role: str,
            dest: str,
            mode: str,
            owner: str,
            content: pulumi.Input[str],
            deps: list[pulumi.Resource],
            *,
            reload: bool = False,
            secret: bool = False,
        ) -> remote.Command:
            """put-file.sh; `reload`: a changed file reloads the app (the installed tool's `reload`)."""
            return put_file(
                f"{name}-{role}",
                parent=self,
                connection=connection,
                dest=dest,
                mode=mode,
                owner=owner,
                content=content,
                sudo=sudo,
                depends_on=deps,
                reload_root=s.root if reload else None,
                secret=secret,
            )

        provision_cmd, provision_stdin = script_command(PROVISION, provision_args(s), sudo=sudo), host_bundle()
        provision = command(
            f"{name}-provision",
            parent=self,
            connection=connection,
            create=provision_cmd,
            stdin=provision_stdin,
            update=NOTHING,
            triggers=[digest(provision_cmd, provision_stdin)],
        )
        # the tool and its config: a component of their own, so editing either runs only its command
        tool = ReleaseTool(
            f"{name}-tool",
            ReleaseToolArgs(connection=connection, settings=s, after=[provision], conf_was_under=self),
            pulumi.ResourceOptions(parent=self),
        )
        preload = put("env-preload", env_preload_path(s.root), "0644", "root:root", ENV_PRELOAD.read_text(), [provision])
        # reload=True: the installed tool starts the apps again (`cognivern-release reload`), with its conf in place
        ecosystem = put(
            "ecosystem",
            f"{s.root}/config/ecosystem.config.cjs",
            "0644",
            "root:root",
            render_ecosystem(s),
            [preload, *tool.ready],
            reload=True,
        )
        env_text = pulumi.Output.secret(render_env(s.stack_env, s.secret_env))
        env = put("env", *env_file(s), env_text, [ecosystem], reload=True, secret=True)
        site = site_name(s.app_name)
        tls_domain = s.domain if s.certbot_tls else None
        nginx = command(
            f"{name}-nginx-site",
            parent=self,
            connection=connection,
            create=script_command(NGINX_SITE, ["--name", site], sudo=sudo),
            stdin=nginx_site_input(s, render_nginx_site(s, domain=tls_domain, hsts=s.balancer_tls)),
            depends_on=[provision],
        )
        if tls_domain is not None:
            # After the HTTP site (its ACME challenge location must be live). Not part of `ready`: the
            # health gate uses 127.0.0.1, so a Let's Encrypt outage never holds back a release.
            assert s.acme_email is not None
            argv = ["--name", site, "--domain", tls_domain, "--email", s.acme_email, "--server", s.acme_server]
            command(
                f"{name}-tls",
                parent=self,
                connection=connection,
                create=script_command(TLS, argv, sudo=sudo),
                stdin=render_nginx_tls_site(s, tls_domain),
                depends_on=[nginx],
            )

        self.provision = provision
        self.ready = [provision, *tool.ready, preload, ecosystem, env, nginx]
        self.register_outputs({})
