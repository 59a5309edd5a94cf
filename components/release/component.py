"""A release: upload (when there is an artifact), then `cognivern-release deploy` on each server.

One server: `deploy ID SOURCE SHA256` is the whole release in one SSH command (install when it is not
installed yet, the health-gated activation, prune, then the state as JSON); a release that is
already installed (a rollback) needs nothing else. Several servers roll: every server's upload and
install run at once (they do not touch the running app), then the activations (the same `deploy`,
whose install is then a check) run one server at a time (`rolling_activation`): server 1's waits for
every install, server i's for server i-1's. A failed health gate stops the rollout at that server
(its tool has already switched it back); later servers keep the old release, earlier ones the new.

The release id and the artifact digest are the `triggers` of install and activate, so changing
`cognivern:release` replaces them: the new release's commands run, the old resources are dropped
(create-before-delete). Any other change to the activation (its connection, the wording of its
command) runs only its `update`, `list --json`: nothing switches; to an install, nothing.
`prune --keep N` is a command of its own, triggered by N, so keepReleases never touches the
activation (the tool remembers N for deploy's prune) and a new connection alone prunes nothing.
No command has a `delete`: destroying or replacing a release resource never removes a release
directory or undoes the newer activation.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi
from pulumi_command import remote

from components.remote import NOTHING, tool_command

TOOL = "cognivern-release"


class ArtifactError(Exception):
    """The artifact named by the stack cannot be used; raised before anything registers."""


@dataclass(frozen=True)
class Artifact:
    """Where the release comes from: a local file to upload, a URL the server fetches, or nothing."""

    kind: str  # "file", "url" or "none" (the release must already be on the server)
    location: str | None = None
    sha256: str | None = None

    @property
    def digest(self) -> str:
        return self.sha256 or "on-server"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_sha256_file(path: Path) -> str:
    """`<hex>  <name>` (sha256sum format) or a bare hex digest."""
    words = path.read_text().split()
    if not words or len(words[0]) != 64:
        raise ArtifactError(f"{path}: expected a sha256sum line, got {path.read_text()[:80]!r}")
    return words[0].lower()


def resolve_artifact(release: str, project_dir: Path, artifact: str | None, url: str | None, url_sha256: str | None) -> Artifact:
    """Pre-flight: a local artifact must exist and match its .sha256 before anything reaches a server."""
    if url is not None:
        return Artifact("url", url, url_sha256)
    explicit = artifact is not None
    path = Path(artifact) if artifact is not None else project_dir / ".artifacts" / f"cognivern-{release}.tar.gz"
    if not path.is_absolute():
        path = project_dir / path
    if not path.exists():
        if explicit:
            raise ArtifactError(f"cognivern:artifact: {path} does not exist")
        return Artifact("none")
    digest = sha256_file(path)
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.exists():
        expected = read_sha256_file(sidecar)
        if expected != digest:
            raise ArtifactError(f"{path}: sha256 {digest} does not match {sidecar.name} ({expected}); rebuild the artifact")
    elif not explicit:
        raise ArtifactError(f"{path}: {sidecar.name} is missing; scripts/build-artifact writes both")
    return Artifact("file", str(path), digest)


@dataclass(frozen=True)
class ReleaseArgs:
    connection: remote.ConnectionArgs
    release: str
    root: str
    keep_releases: int
    artifact: Artifact
    sudo: bool
    depends_on: list[pulumi.Resource]
    # id of the server the program creates for this release (None for an existing host): while a
    # preview does not know it, this run creates the server, so the release cannot be on it yet
    server_id: pulumi.Output[Any] | None = None
    # several servers: install here first (an `-install` command), so no server switches before
    # every server has the release; one server: the activation's deploy installs
    install_first: bool = False


NO_ARTIFACT_FOR_NEW_SERVER = (
    "cognivern:release {release}: this deploy creates the server, so the release cannot be on it yet, and there is no "
    "artifact for it (.artifacts/cognivern-{release}.tar.gz, cognivern:artifact or cognivern:artifactUrl). Build one: "
    "scripts/build-artifact ../cognivern, then scripts/pulumi-local STACK config set cognivern:release <the id it prints>"
)


def on_existing_server(server_id: pulumi.Output[Any], release: str, value: str) -> pulumi.Output[str]:
    """`value` unchanged, but a preview in which the server has no id yet (it is being created) fails.

    `apply` cannot do this: a preview skips it for unknown values. The check is not a dependency
    (resources are empty) and leaves the command text as it was, so existing stacks see no diff.
    """

    async def known() -> bool:
        if not await server_id.is_known():
            raise pulumi.RunError(NO_ARTIFACT_FOR_NEW_SERVER.format(release=release))
        return True

    async def result() -> str:
        await checked
        return value

    checked = asyncio.ensure_future(known())
    computed = asyncio.ensure_future(result())
    plain: asyncio.Future[bool] = asyncio.get_event_loop().create_future()
    plain.set_result(False)
    for future in (checked, computed):  # the error reaches the registration that awaits it; no "never retrieved" noise
        future.add_done_callback(lambda f: None if f.cancelled() else f.exception())
    return pulumi.Output(set(), computed, checked, plain)


def parse_state(stdout: str) -> dict[str, Any]:
    """The last line of the activate command is `cognivern-release list --json`."""
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        return {"current": None, "previous": None, "releases": []}
    parsed: dict[str, Any] = json.loads(lines[-1])
    return parsed


class Release(pulumi.ComponentResource):
    """Upload (and, with several servers, install) on construction; `activate(after=...)` adds the activation.

    Built with `defer_activation=True` the activation waits for `activate()`, so a rollout can
    make it depend on other servers' steps; otherwise it is added at once (one server).
    """

    install: remote.Command | None
    activation: remote.Command
    prune: remote.Command
    active_release: pulumi.Output[Any]
    previous_release: pulumi.Output[Any]
    releases: pulumi.Output[Any]

    def __init__(self, name: str, args: ReleaseArgs, opts: pulumi.ResourceOptions | None = None, *, defer_activation: bool = False) -> None:
        super().__init__("cognivern:index:Release", name, {}, opts)
        self._name = name
        self._args = args
        a = args.artifact
        self._triggers = [args.release, a.digest]
        self._before: list[pulumi.Resource] = list(args.depends_on)
        if a.kind == "file":
            assert a.location is not None
            remote_path = f"{args.root}/incoming/cognivern-{args.release}.tar.gz"
            upload = remote.CopyToRemote(
                f"{name}-upload",
                connection=args.connection,
                source=pulumi.FileAsset(a.location),
                remote_path=remote_path,
                triggers=self._triggers,
                opts=pulumi.ResourceOptions(parent=self, depends_on=self._before),
            )
            self._before = [upload]
            self._source = [args.release, remote_path, a.digest]
        elif a.kind == "url":
            assert a.location is not None and a.sha256 is not None
            self._source = [args.release, a.location, a.sha256]
        else:
            self._source = [args.release, "-", "-"]

        self.install = None
        if args.install_first:
            install = self._checked(self._tool("install", *self._source))
            self.install = self._command("install", install, self._before, triggers=self._triggers, update=NOTHING)
            self._before = [self.install]
        if not defer_activation:
            self.activate()

    def _tool(self, *argv: str) -> str:
        return tool_command(TOOL, ["--root", self._args.root, *argv], sudo=self._args.sudo)

    def _checked(self, command: str) -> pulumi.Input[str]:
        """The first command that names a release without an artifact fails a preview that creates its server."""
        if self._args.artifact.kind != "none" or self._args.server_id is None:
            return command
        return on_existing_server(self._args.server_id, self._args.release, command)

    def _command(
        self,
        role: str,
        create: pulumi.Input[str],
        after: list[pulumi.Resource],
        *,
        triggers: Sequence[str] | None = None,
        update: str | None = None,
    ) -> remote.Command:
        return remote.Command(
            f"{self._name}-{role}",
            connection=self._args.connection,
            create=create,
            update=update,
            triggers=list(triggers) if triggers is not None else None,
            add_previous_output_in_env=False,
            opts=pulumi.ResourceOptions(parent=self, depends_on=after),
        )

    def activate(self, after: Sequence[pulumi.Resource] = ()) -> remote.Command:
        """The release's `deploy` (install, health-gated switch, prune, the state as JSON), then the
        stack's own prune, after this server's upload/install and `after`."""
        if hasattr(self, "activation"):
            raise RuntimeError(f"{self._name}: activate() called twice")
        deploy = self._tool("deploy", *self._source)
        create = deploy if self.install is not None else self._checked(deploy)
        deps = [*self._before, *[r for r in after if r not in self._before]]
        self.activation = self._command("activate", create, deps, triggers=self._triggers, update=self._tool("list", "--json"))
        # keepReleases is its trigger: a new value replaces it (the prune runs, and the tool remembers
        # N for the next deploy's prune); a change of its connection alone (a host-key pin) runs nothing
        keep = str(self._args.keep_releases)
        self.prune = self._command("prune", self._tool("prune", "--keep", keep), [self.activation], triggers=[keep], update=NOTHING)
        state = self.activation.stdout.apply(parse_state)
        self.active_release = state.apply(lambda st: st.get("current"))
        self.previous_release = state.apply(lambda st: st.get("previous"))
        self.releases = state.apply(lambda st: st.get("releases", []))
        self.register_outputs({"activeRelease": self.active_release, "previousRelease": self.previous_release, "releases": self.releases})
        return self.activation


def rolling_activation(releases: Sequence[Release]) -> list[remote.Command]:
    """Activate deferred releases one server at a time, in list order.

    Server 1 waits for every server's install (no server switches before all have the release);
    server i waits for server i-1's activation, so a failed health gate stops the rollout there.
    """
    installs = [r.install for r in releases if r.install is not None]
    activations: list[remote.Command] = []
    for index, release in enumerate(releases):
        after: list[pulumi.Resource] = list(installs) if index == 0 else [activations[-1]]
        activations.append(release.activate(after=after))
    return activations
