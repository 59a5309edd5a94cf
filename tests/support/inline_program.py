"""Inline programs run by the real Pulumi CLI through the Automation API (see pulumi_cli.py).

    python -m tests.support.inline_program PROGRAM OP WORK_DIR STACK    (OP: up | preview)

Prints one JSON line: {"ok": bool, "outputs": {name: {"value": ..., "secret": bool}}, "error": str}.
The CLI connects to the language runtime this process serves, so no language plugin is needed.

- `settings`: reads the stack settings exactly as __main__.py does and exports what it read
  (secretEnv only as a secret Output), registering no resource.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pulumi
from pulumi import automation as auto
from pulumi.runtime.config import is_config_secret

from components.settings import NAMESPACE, ConfigError, parse_settings

REPO = Path(__file__).resolve().parents[2]


def settings_program() -> None:
    config = pulumi.Config(NAMESPACE)
    try:  # the same call as __main__.py (tests/test_real_cli.py checks it stays the same)
        settings = parse_settings(config.get, lambda key: is_config_secret(f"{NAMESPACE}:{key}"), stack=pulumi.get_stack())
    except ConfigError as err:
        raise pulumi.RunError(str(err)) from None
    pulumi.export("release", settings.release)
    pulumi.export("secretEnvNames", sorted(settings.secret_env))
    pulumi.export("secretEnv", pulumi.Output.secret(dict(settings.secret_env)))
    pulumi.export("hasPrivateKey", settings.ssh_private_key is not None)


PROGRAMS = {"settings": settings_program}


def main(program: str, op: str, work_dir: str, stack_name: str) -> int:
    workspace = auto.LocalWorkspace(
        work_dir=work_dir,
        program=PROGRAMS[program],
        pulumi_command=auto.PulumiCommand(root=str(REPO / ".tools")),
    )
    stack = auto.Stack.select(stack_name, workspace)
    try:
        if op == "up":
            result = stack.up(color="never")
            outputs = {k: {"value": v.value, "secret": v.secret} for k, v in result.outputs.items()}
        else:
            stack.preview(color="never")
            outputs = {}
    except auto.CommandError as err:
        print(json.dumps({"ok": False, "outputs": {}, "error": str(err)}))
        return 1
    print(json.dumps({"ok": True, "outputs": outputs, "error": ""}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
