"""Host preparation and runtime config: everything a server (created or existing) needs before releases.

Each concern is one idempotent remote command whose script is a file here and whose data rides on
stdin; a change to the script, its arguments or the data updates the command in place, which
re-runs it (pulumi-command runs `create` again when no `update` is given).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pulumi
from pulumi_command import remote

from components.release.cognivern_release import facts
from components.remote import script_command
from components.render import (
    RELEASE_DIR,
    render_ecosystem,
    render_env,
    render_nginx_site,
    render_nginx_tls_site,
    render_release_conf,
    render_upstream,
    site_name,
)
from components.server import metadata_filter
from components.settings import Settings

HERE = Path(__file__).resolve().parent
PROVISION = HERE / "provision.sh"
PUT_FILE = HERE / "put-file.sh"
NGINX_SITE = HERE / "nginx-site.sh"
TLS = HERE / "tls.sh"
RELEASE_TOOL = RELEASE_DIR / "cognivern-release"
RELEASE_PACKAGE = RELEASE_DIR / "cognivern_release"
VERSIONS = HERE / "versions.env"
BUNDLE_MARKER = "#--- {} ---"
# What provision.sh installs besides the release tool, each after its marker line on its stdin.
BUNDLED = {
    metadata_filter.SCRIPT_NAME: metadata_filter.SCRIPT,
    metadata_filter.UNIT_NAME: metadata_filter.UNIT,
}


def pinned_versions() -> dict[str, str]:
    """versions.env (KEY=VALUE lines): the PM2 and pnpm the server gets; .ci/run installs the same."""
    out: dict[str, str] = {}
    for line in VERSIONS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def release_tool_files(launcher: str | None = None) -> list[tuple[str, str]]:
    """The release tool as provisioning installs it: its launcher and its package (standard library
    only). `launcher`: a stand-in text for the launcher alone, for tests."""
    if launcher is not None:
        return [(RELEASE_TOOL.name, launcher)]
    files = [(RELEASE_TOOL.name, RELEASE_TOOL.read_text())]
    return files + [(f"{RELEASE_PACKAGE.name}/{p.name}", p.read_text()) for p in sorted(RELEASE_PACKAGE.glob("*.py"))]


def release_tool_bundle(launcher: str | None = None) -> str:
    """provision.sh's stdin: the release tool's files, then each BUNDLED file (the metadata filter
    and its unit), each after a line `#--- PATH ---`, as source text (so `pulumi preview --diff` shows
    a change line by line) in a fixed order (the same text every run)."""
    files = [*release_tool_files(launcher), *((name, path.read_text()) for name, path in BUNDLED.items())]
    return "".join(f"{BUNDLE_MARKER.format(name)}\n{text.rstrip(chr(10))}\n" for name, text in files)


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
    # the metadata filter (components/server/metadata_filter.py): servers the program created, or metadataFilter
    return [*account, *node, *versions, "--metadata-filter", "yes" if s.filters_metadata else "no"]


@dataclass(frozen=True)
class HostArgs:
    connection: remote.ConnectionArgs
    settings: Settings


class Host(pulumi.ComponentResource):
    """Prepares the host and writes its runtime config; `ready` lists what releases must wait for."""

    ready: list[pulumi.Resource]

    def __init__(self, name: str, args: HostArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("cognivern:index:Host", name, {}, opts)
        s = args.settings
        self._name, self._connection, self._sudo, self._root = name, args.connection, s.ssh_user != "root", s.root
        provision = self._command("provision", script_command(PROVISION, provision_args(s), sudo=self._sudo), release_tool_bundle(), [])
        release_conf = self._put(
            "release-conf", f"{s.root}/config/cognivern.conf", "0644", "root:root", render_release_conf(s), [provision]
        )
        # reload=True: the installed tool starts the apps again (`cognivern-release reload`), with the conf in place
        ecosystem = self._put(
            "ecosystem", f"{s.root}/config/ecosystem.config.cjs", "0644", "root:root", render_ecosystem(s), [release_conf], reload=True
        )
        env_text = pulumi.Output.secret(render_env(s.stack_env, s.secret_env))
        env = self._put("env", *env_file(s), env_text, [ecosystem], reload=True, secret=True)
        site = site_name(s.app_name)
        tls_domain = s.domain if s.certbot_tls else None
        nginx = self._command(
            "nginx-site",
            script_command(NGINX_SITE, ["--name", site], sudo=self._sudo),
            nginx_site_input(s, render_nginx_site(s, domain=tls_domain, hsts=s.balancer_tls)),
            [provision],
        )
        if tls_domain is not None:
            # After the HTTP site (its ACME challenge location must be live). Not part of `ready`: the
            # health gate uses 127.0.0.1, so a Let's Encrypt outage never holds back a release.
            assert s.acme_email is not None
            argv = ["--name", site, "--domain", tls_domain, "--email", s.acme_email, "--server", s.acme_server]
            self._command("tls", script_command(TLS, argv, sudo=self._sudo), render_nginx_tls_site(s, tls_domain), [nginx])

        self.ready = [provision, release_conf, ecosystem, env, nginx]
        self.register_outputs({})

    def _command(
        self, role: str, create: str, stdin: pulumi.Input[str], depends_on: list[pulumi.Resource], secret: bool = False
    ) -> remote.Command:
        """A child command; one that carries a secret logs nothing and keeps its output secret."""
        opts = pulumi.ResourceOptions(parent=self, depends_on=depends_on)
        if secret:
            opts = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(additional_secret_outputs=["stdout", "stderr"]))
        return remote.Command(
            f"{self._name}-{role}",
            connection=self._connection,
            create=create,
            stdin=stdin,
            logging=remote.Logging.NONE if secret else remote.Logging.STDOUT_AND_STDERR,
            add_previous_output_in_env=False,
            opts=opts,
        )

    def _put(
        self,
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
        """put-file.sh: the content travels on stdin, never in the command line."""
        argv = ["--dest", dest, "--mode", mode, "--owner", owner] + (["--reload-root", self._root] if reload else [])
        return self._command(role, script_command(PUT_FILE, argv, sudo=self._sudo), content, deps, secret)
