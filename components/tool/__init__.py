"""The server-side release tool and its config: what `cognivern-release` is and how it behaves here.

A component of its own (a child of the Host it is installed on), with two commands, so an edit of
the tool or of its settings runs only what it must:
- `install`: the tool (its launcher and its stdlib-only package, components/release/cognivern-release
  and cognivern_release/), installed by install-tool.sh (lib.sh's install_release_tool: a
  digest-named directory, switched by rename). Editing any file of the tool reinstalls it and
  nothing else: no provisioning, no restart; a running activation keeps the version it started with.
- `conf`: config/cognivern.conf (health, bake, slots, nginx; no secrets): rewritten when a setting
  changes, read by the tool at its next run, so no activation follows.
Neither is an input of the release's commands: a change here never re-runs an activation. The
config file was the Host's `<node>-release-conf` before; its alias keeps that state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pulumi
from pulumi_command import remote

from components.remote import command, put_file, script_command
from components.render import RELEASE_DIR, render_release_conf
from components.settings import Settings

HERE = Path(__file__).resolve().parent
INSTALL_TOOL = HERE / "install-tool.sh"
RELEASE_TOOL = RELEASE_DIR / "cognivern-release"
RELEASE_PACKAGE = RELEASE_DIR / "cognivern_release"
BUNDLE_MARKER = "#--- {} ---"


def release_tool_files(launcher: str | None = None) -> list[tuple[str, str]]:
    """The release tool as it is installed: its launcher and its package (standard library only).
    `launcher`: a stand-in text for the launcher alone, for tests."""
    if launcher is not None:
        return [(RELEASE_TOOL.name, launcher)]
    files = [(RELEASE_TOOL.name, RELEASE_TOOL.read_text())]
    return files + [(f"{RELEASE_PACKAGE.name}/{p.name}", p.read_text()) for p in sorted(RELEASE_PACKAGE.glob("*.py"))]


def bundle(files: list[tuple[str, str]]) -> str:
    """Files as one text for a script's stdin, each after a line `#--- PATH ---`, as source text (so
    `pulumi preview --diff` shows a change line by line) in a fixed order (the same text every run)."""
    return "".join(f"{BUNDLE_MARKER.format(name)}\n{text.rstrip(chr(10))}\n" for name, text in files)


@dataclass(frozen=True)
class ReleaseToolArgs:
    connection: remote.ConnectionArgs
    settings: Settings
    after: list[pulumi.Resource]  # provisioning: python3, ROOT/config
    conf_was_under: pulumi.Resource  # the Host whose child `<node>-release-conf` the config file was


class ReleaseTool(pulumi.ComponentResource):
    """`<node>-tool`: the tool installed (`-install`) and configured (`-conf`); `ready` for what runs it."""

    ready: list[pulumi.Resource]

    def __init__(self, name: str, args: ReleaseToolArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("cognivern:index:ReleaseTool", name, {}, opts)
        s = args.settings
        sudo = s.ssh_user != "root"
        install = command(
            f"{name}-install",
            parent=self,
            connection=args.connection,
            create=script_command(INSTALL_TOOL, [], sudo=sudo),
            stdin=bundle(release_tool_files()),
            depends_on=args.after,
        )
        node = name.removesuffix("-tool")
        conf = put_file(
            f"{name}-conf",
            parent=self,
            connection=args.connection,
            dest=f"{s.root}/config/cognivern.conf",
            mode="0644",
            owner="root:root",
            content=render_release_conf(s),
            sudo=sudo,
            depends_on=args.after,
            aliases=[pulumi.Alias(name=f"{node}-release-conf", parent=args.conf_was_under)],
        )
        self.ready = [install, conf]
        self.register_outputs({})
