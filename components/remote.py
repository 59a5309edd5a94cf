"""How the program turns a script file plus arguments into a remote command string.

A script travels inside the command (`bash -c '<script>' name args...`), so stdin stays free for
data (a secret .env, a rendered site) and a change to the script file is a change to the
command's input: pulumi-command re-runs it in place and `pulumi preview` shows the diff.
The host scripts' shared functions (components/host/lib.sh), then the rules they check (generated
from the fact module, `facts.shell_prelude`), go in front of every script, inside the same string:
nothing is installed on the server first, and an edit to either shows as a change to each command
that carries it.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

import pulumi
from pulumi_command import remote

from components.release.cognivern_release.facts import shell_prelude

LIB = Path(__file__).resolve().parent / "host" / "lib.sh"
PUT_FILE = Path(__file__).resolve().parent / "host" / "put-file.sh"


def script_command(script: Path, args: Sequence[str], *, sudo: bool = False) -> str:
    """`bash -c <lib.sh + script> <name> <args>` with every piece shell-quoted; sudo for non-root users."""
    prefix = "sudo -n " if sudo else ""
    quoted = " ".join(shlex.quote(a) for a in args)
    text = LIB.read_text() + "\n" + shell_prelude() + script.read_text()
    return f"{prefix}bash -c {shlex.quote(text)} {shlex.quote(script.stem)} {quoted}".rstrip()


def tool_command(tool: str, args: Sequence[str], *, sudo: bool = False) -> str:
    """An installed server-side tool called with quoted arguments."""
    prefix = "sudo -n " if sudo else ""
    return prefix + " ".join(shlex.quote(a) for a in [tool, *args])


# pulumi-command runs a Command's `update` (else `create` again) on any change of an input that is not
# one of its `triggers`. For a command given `update=NOTHING`, that is a change of its connection
# alone (a host-key pin, the port): its work is described by `triggers`, and there is nothing to redo.
NOTHING = "true"


def command(
    name: str,
    *,
    parent: pulumi.Resource,
    connection: remote.ConnectionArgs,
    create: pulumi.Input[str],
    stdin: pulumi.Input[str] | None = None,
    depends_on: Sequence[pulumi.Resource] = (),
    secret: bool = False,
    update: str | None = None,
    triggers: Sequence[pulumi.Input[str]] | None = None,
    aliases: Sequence[pulumi.Alias] = (),
) -> remote.Command:
    """A child command of `parent`; one that carries a secret logs nothing and keeps its output secret.

    No `delete`: destroying or replacing a command never undoes anything on the server.
    """
    opts = pulumi.ResourceOptions(parent=parent, depends_on=list(depends_on), aliases=list(aliases) or None)
    if secret:
        opts = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(additional_secret_outputs=["stdout", "stderr"]))
    return remote.Command(
        name,
        connection=connection,
        create=create,
        update=update,
        stdin=stdin,
        triggers=list(triggers) if triggers is not None else None,
        logging=remote.Logging.NONE if secret else remote.Logging.STDOUT_AND_STDERR,
        add_previous_output_in_env=False,
        opts=opts,
    )


def put_file(
    name: str,
    *,
    parent: pulumi.Resource,
    connection: remote.ConnectionArgs,
    dest: str,
    mode: str,
    owner: str,
    content: pulumi.Input[str],
    sudo: bool,
    depends_on: Sequence[pulumi.Resource] = (),
    reload_root: str | None = None,
    secret: bool = False,
    aliases: Sequence[pulumi.Alias] = (),
) -> remote.Command:
    """put-file.sh: the content travels on stdin, never in the command line; `reload_root`: reload
    the app under that root when the file changed."""
    argv = ["--dest", dest, "--mode", mode, "--owner", owner] + (["--reload-root", reload_root] if reload_root else [])
    create = script_command(PUT_FILE, argv, sudo=sudo)
    return command(
        name, parent=parent, connection=connection, create=create, stdin=content, depends_on=depends_on, secret=secret, aliases=aliases
    )
