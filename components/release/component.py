"""A release: upload (when there is an artifact), install, then health-gated activation.

Several servers roll: every server's upload and install run at once (they do not touch the
running app), then the activations run one server at a time (`rolling_activation`): server 1's
activate waits for every install, server i's for server i-1's activate. A failed health gate
stops the rollout at that server (its tool has already switched it back); later servers keep the
old release, earlier ones the new one.

The release id and the artifact digest are the `triggers` of install and activate, so changing
`cognivern:release` replaces them: the new release's commands run, the old resources are dropped
(create-before-delete). No command has a `delete`: destroying or replacing a release resource never
removes a release directory or undoes the newer activation.
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

from components.remote import tool_command

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
    """Upload and install on construction; `activate(after=...)` adds the activation.

    Built with `defer_activation=True` the activation waits for `activate()`, so a rollout can
    make it depend on other servers' steps; otherwise it is added at once (one server).
    """

    install: remote.Command
    activation: remote.Command
    active_release: pulumi.Output[Any]
    previous_release: pulumi.Output[Any]
    releases: pulumi.Output[Any]

    def __init__(self, name: str, args: ReleaseArgs, opts: pulumi.ResourceOptions | None = None, *, defer_activation: bool = False) -> None:
        super().__init__("cognivern:index:Release", name, {}, opts)
        self._name = name
        self._args = args
        a = args.artifact
        triggers = [args.release, a.digest]
        tool = self._tool

        deps = list(args.depends_on)
        install_cmd: pulumi.Input[str]
        if a.kind == "file":
            assert a.location is not None
            remote_path = f"{args.root}/incoming/cognivern-{args.release}.tar.gz"
            upload = remote.CopyToRemote(
                f"{name}-upload",
                connection=args.connection,
                source=pulumi.FileAsset(a.location),
                remote_path=remote_path,
                triggers=triggers,
                opts=pulumi.ResourceOptions(parent=self, depends_on=deps),
            )
            deps = [upload]
            install_cmd = tool("install", args.release, remote_path, a.digest)
        elif a.kind == "url":
            assert a.location is not None and a.sha256 is not None
            install_cmd = tool("install", args.release, a.location, a.sha256)
        else:
            install_cmd = tool("install", args.release, "-", "-")
            if args.server_id is not None:
                install_cmd = on_existing_server(args.server_id, args.release, install_cmd)

        self.install = remote.Command(
            f"{name}-install",
            connection=args.connection,
            create=install_cmd,
            triggers=triggers,
            add_previous_output_in_env=False,
            opts=pulumi.ResourceOptions(parent=self, depends_on=deps),
        )
        if not defer_activation:
            self.activate()

    def _tool(self, *argv: str) -> str:
        return tool_command(TOOL, ["--root", self._args.root, *argv], sudo=self._args.sudo)

    def activate(self, after: Sequence[pulumi.Resource] = ()) -> remote.Command:
        """The health-gated switch (then prune, then the state as JSON), after this install and `after`."""
        args, tool = self._args, self._tool
        if hasattr(self, "activation"):
            raise RuntimeError(f"{self._name}: activate() called twice")
        activate = remote.Command(
            f"{self._name}-activate",
            connection=args.connection,
            create=" && ".join([tool("activate", args.release), tool("prune", "--keep", str(args.keep_releases)), tool("list", "--json")]),
            triggers=[args.release, args.artifact.digest],
            add_previous_output_in_env=False,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.install, *[r for r in after if r is not self.install]]),
        )
        self.activation = activate
        state = activate.stdout.apply(parse_state)
        self.active_release = state.apply(lambda st: st.get("current"))
        self.previous_release = state.apply(lambda st: st.get("previous"))
        self.releases = state.apply(lambda st: st.get("releases", []))
        self.register_outputs({"activeRelease": self.active_release, "previousRelease": self.previous_release, "releases": self.releases})
        return activate


def rolling_activation(releases: Sequence[Release]) -> list[remote.Command]:
    """Activate deferred releases one server at a time, in list order.

    Server 1 waits for every server's install (no server switches before all have the release);
    server i waits for server i-1's activation, so a failed health gate stops the rollout there.
    """
    installs = [r.install for r in releases]
    activations: list[remote.Command] = []
    for index, release in enumerate(releases):
        after: list[pulumi.Resource] = list(installs) if index == 0 else [activations[-1]]
        activations.append(release.activate(after=after))
    return activations
