"""Pulumi.yaml's config defaults applied to a stack's config the way the Pulumi CLI does.

Before the program runs, the CLI fills every key that Pulumi.yaml declares with a `default` (or a
`value`) and that the stack does not set, as a PLAIN value: primitives (string, integer, boolean)
formatted with Go's `%v`, anything else JSON-encoded (pulumi/pulumi pkg/workspace/config.go,
`mergeConfig` and `createConfigValue`, v3.274.1). The stand-in applies the same merge so that a
stack which leaves a key unset reaches the program exactly as it does under the real CLI.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
PROJECT_FILE = REPO / "Pulumi.yaml"


def _as_config_value(value: Any) -> str:
    """createConfigValue: `fmt.Sprintf("%v")` for string/int/bool, `json.Marshal` for the rest."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int)):
        return str(value)
    # Go's json.Marshal: compact, map keys sorted, <, > and & escaped.
    text = json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def project_defaults(project_file: Path = PROJECT_FILE) -> dict[str, str]:
    """`namespace:key` -> the plain value the CLI would set for an unset key."""
    project = yaml.safe_load(project_file.read_text())
    name = project["name"]
    out: dict[str, str] = {}
    for key, decl in (project.get("config") or {}).items():
        if not isinstance(decl, dict):  # `key: value` shorthand is a default too
            decl = {"default": decl}
        if "default" in decl and decl["default"] is not None:
            value = decl["default"]
        elif "value" in decl and decl["value"] is not None:
            value = decl["value"]
        else:
            continue
        out[key if ":" in key else f"{name}:{key}"] = _as_config_value(value)
    return out


def merge_project_defaults(config: Mapping[str, Any], project_file: Path = PROJECT_FILE) -> dict[str, Any]:
    """The stack's config plus every declared default it does not set (keys as `ns:key`).

    Keys of `config` may be unqualified (`release`); they are in the project's namespace.
    """
    project_name = yaml.safe_load(project_file.read_text())["name"]
    merged = {key if ":" in key else f"{project_name}:{key}": value for key, value in config.items()}
    for key, value in project_defaults(project_file).items():
        merged.setdefault(key, value)
    return merged


class ConfigValidationError(Exception):
    """The CLI refuses the stack config before the program runs ("validating stack config: ...")."""


def check_secret_declarations(stack: str, merged: Mapping[str, Any], secret_keys: set[str], project_file: Path = PROJECT_FILE) -> None:
    """validateStackConfigValue: a key declared `secret: true` must hold an encrypted value.

    It runs after the merge, so a `secret: true` key with a `default` fails every stack that leaves
    it unset (the default is plain); without a default an unset key is "missing" (checked with the
    real CLI 3.274.1, tests/test_real_cli.py).
    """
    project = yaml.safe_load(project_file.read_text())
    for key, decl in (project.get("config") or {}).items():
        if not isinstance(decl, dict) or not decl.get("secret"):
            continue
        full = key if ":" in key else f"{project['name']}:{key}"
        if full not in merged:
            raise ConfigValidationError(f"validating stack config: Stack '{stack}' is missing configuration value '{key}'")
        if full not in secret_keys:
            raise ConfigValidationError(
                f"validating stack config: Stack '{stack}' with configuration key '{key}' must be encrypted as it's secret"
            )
