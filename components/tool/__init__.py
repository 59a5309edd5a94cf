"""The server-side release tool and its config: what `cognivern-release` is and how it behaves here.

Two commands of their own, so an edit of the tool or of its settings runs only what it must:
- `install`: the tool and its PM2 helper (components/release), installed by install-tool.sh when
  they differ. Editing either reinstalls them and nothing else: no provisioning, no restart.
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
RELEASE_TOOL = RELEASE_DIR / "cognivern-release.sh"
PM2_HELPER = RELEASE_DIR / "cognivern-pm2.cjs"
HELPER_MARKER = "#--- cognivern-pm2.cjs ---"


def release_tool_bundle() -> str:
    """install-tool.sh's stdin: the release tool, then (after a marker line) its PM2 query helper."""
    return f"{RELEASE_TOOL.read_text().rstrip(chr(10))}\n{HELPER_MARKER}\n{PM2_HELPER.read_text()}"


@dataclass(frozen=True)
class ReleaseToolArgs:
    connection: remote.ConnectionArgs
    settings: Settings
    after: list[pulumi.Resource]  # provisioning: the bin directory, ROOT/config, node and PM2
    conf_was_under: pulumi.Resource  # the Host whose child `<node>-release-conf` the config file was


class ReleaseTool(pulumi.ComponentResource):
    """`<node>-tool`: the tool installed (`-install`) and configured (`-conf`); `ready` for releases."""

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
            stdin=release_tool_bundle(),
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
