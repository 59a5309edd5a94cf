"""The machine and the app's runtime files: everything a server (created or existing) needs before releases.

Each concern is one idempotent remote command whose script is a file here and whose data rides on
stdin; a change to the script, its arguments or the data updates the command in place, which
re-runs it (pulumi-command runs `create` again when no `update` is given): put-file.sh and
nginx-site.sh compare first and say "unchanged", so a re-run with nothing new changes nothing.
Provisioning is the exception: it takes seconds of package and account checks, so it is replaced
when its command changes (its digest is its trigger) and does nothing when only its connection
changed (`update=NOTHING`). The release tool and its config are the ReleaseTool's
(components/tool), the releases the Release's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pulumi
from pulumi_command import remote

from components.remote import NOTHING, PUT_FILE, command, put_file, script_command
from components.render import (
    ENV_PRELOAD,
    env_preload_path,
    render_ecosystem,
    render_env,
    render_nginx_site,
    render_nginx_tls_site,
    site_name,
)
from components.settings import Settings

HERE = Path(__file__).resolve().parent
PROVISION = HERE / "provision.sh"
NGINX_SITE = HERE / "nginx-site.sh"
TLS = HERE / "tls.sh"
RUN_SH = HERE / "run.sh"
VERSIONS = HERE / "versions.env"
__all__ = ["NGINX_SITE", "PROVISION", "PUT_FILE", "RUN_SH", "TLS", "Host", "HostArgs", "pinned_versions", "provision_args"]


def pinned_versions() -> dict[str, str]:
    """versions.env (KEY=VALUE lines): the PM2 and pnpm the server gets; .ci/run installs the same."""
    out: dict[str, str] = {}
    for line in VERSIONS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def provision_args(s: Settings) -> list[str]:
    """provision.sh's arguments for these settings."""
    pins = pinned_versions()
    account = ["--root", s.root, "--app-user", s.app_user, "--node-major", str(s.node_major), "--ssh-user", s.ssh_user]
    return [*account, "--pm2-version", pins["PM2_VERSION"], "--pnpm-version", pins["PNPM_VERSION"]]


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


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
            """put-file.sh; `reload`: a changed file reloads the app (the tool's `reload`)."""
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

        provision_cmd = script_command(PROVISION, provision_args(s), sudo=sudo)
        provision = command(
            f"{name}-provision", parent=self, connection=connection, create=provision_cmd, update=NOTHING, triggers=[digest(provision_cmd)]
        )
        run_script = put("run-script", f"{s.root}/shared/run.sh", "0755", "root:root", RUN_SH.read_text(), [provision], reload=True)
        preload = put("env-preload", env_preload_path(s.root), "0644", "root:root", ENV_PRELOAD.read_text(), [provision])
        ecosystem = put(
            "ecosystem",
            f"{s.root}/config/ecosystem.config.cjs",
            "0644",
            "root:root",
            render_ecosystem(s),
            [run_script, preload],
            reload=True,
        )
        env_text = pulumi.Output.secret(render_env(s.stack_env, s.secret_env))
        owner = f"{s.app_user}:{s.app_user}"
        env = put("env", f"{s.root}/shared/.env", "0600", owner, env_text, [run_script, ecosystem], reload=True, secret=True)
        site = site_name(s.app_name)
        tls_domain = s.domain if s.certbot_tls else None
        nginx = command(
            f"{name}-nginx-site",
            parent=self,
            connection=connection,
            create=script_command(NGINX_SITE, ["--name", site, "--upstream-port", str(s.port)], sudo=sudo),
            stdin=render_nginx_site(s, domain=tls_domain, hsts=s.balancer_tls),
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
        self.ready = [provision, run_script, preload, ecosystem, env, nginx]
        self.register_outputs({})
