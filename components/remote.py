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

from components.release.cognivern_release.facts import shell_prelude

LIB = Path(__file__).resolve().parent / "host" / "lib.sh"


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
