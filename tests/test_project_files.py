"""Pulumi.yaml and Pulumi.prod.yaml follow the rules the Pulumi CLI enforces, and match settings.py.

The CLI cannot run here, so the rules it applies to the project file are checked directly:
typed config keys must be in the project's namespace (pulumi/pulumi sdk/go/common/workspace
project.go: "is not namespaced by the project and should not define a type"), arrays need
`items`, and defaults must have the declared type.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from components.settings import KEYS, NAMESPACE, SECRET_KEYS, Settings, parse_settings
from tools.config_table import README, with_table

REPO = Path(__file__).resolve().parents[1]
BASE = {"release": "v1", "host": "192.0.2.1"}
PROJECT = yaml.safe_load((REPO / "Pulumi.yaml").read_text())
PROD = yaml.safe_load((REPO / "Pulumi.prod.yaml").read_text())
TYPES: dict[str, type | tuple[type, ...]] = {"string": str, "integer": int, "boolean": bool, "array": list, "object": dict}


def keys_read_by_settings() -> set[str]:
    seen: set[str] = set()

    def get(key: str) -> str | None:
        seen.add(key)
        return {"release": "v1", "host": "192.0.2.1"}.get(key)

    parse_settings(get)
    return seen


def test_project_is_the_config_namespace_and_uses_a_pip_venv() -> None:
    assert PROJECT["name"] == NAMESPACE
    assert PROJECT["runtime"] == {"name": "python", "options": {"toolchain": "pip", "virtualenv": "venv"}}


def test_every_config_key_is_declared_with_type_description_and_default() -> None:
    config: dict[str, dict[str, Any]] = PROJECT["config"]
    for key, decl in config.items():
        assert ":" not in key, f"{key}: typed keys must be project-namespaced (write it unqualified)"
        assert decl["type"] in TYPES, key
        assert decl.get("description"), key
        if decl["type"] == "array":
            assert "items" in decl, f"{key}: arrays must declare items"
        if key == "release":
            assert "default" not in decl, "release is required: no default"
            continue
        assert "default" in decl, key
        default = decl["default"]
        if not (decl["type"] == "string" and default == ""):
            assert isinstance(default, TYPES[decl["type"]]) and not (decl["type"] == "integer" and isinstance(default, bool)), key


def test_declared_keys_are_exactly_the_keys_the_program_reads() -> None:
    """Pulumi.yaml declares each key of the settings table, with the type its reader reads, and each
    key fills one Settings field."""
    assert set(PROJECT["config"]) == keys_read_by_settings() == {key.name for key in KEYS}
    assert {key.name: PROJECT["config"][key.name]["type"] for key in KEYS} == {key.name: key.reader.kind for key in KEYS}
    fields = set(Settings.__dataclass_fields__) - {"warnings", "stack"}
    assert fields == {key.field for key in KEYS}


def test_project_defaults_are_the_program_defaults() -> None:
    """Running with every Pulumi.yaml default spelled out gives the same settings as leaving them unset."""

    def as_config(value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    declared = {k: as_config(d["default"]) for k, d in PROJECT["config"].items() if "default" in d}
    base = {"release": "v1", "host": "192.0.2.1"}
    with_defaults = parse_settings(lambda k: {**declared, **base}.get(k))
    without = parse_settings(base.get)
    assert with_defaults == without
    table = {
        key.name: None if key.default is None else as_config(list(key.default) if isinstance(key.default, tuple) else key.default)
        for key in KEYS
    }
    assert {k: declared.get(k) or None for k in table} == table, "Pulumi.yaml's defaults differ from components/settings.py KEYS"


def test_readme_configuration_table_is_generated_from_the_settings_table() -> None:
    text = README.read_text()
    assert with_table(text) == text, "README.md's configuration table is stale: python -m tools.config_table --write"


def test_prod_stack_holds_only_plain_non_secret_values_that_validate() -> None:
    config: dict[str, Any] = PROD["config"]
    for key, value in config.items():
        namespace, _, name = key.partition(":")
        assert namespace in (NAMESPACE, "hcloud"), key
        assert (name not in SECRET_KEYS and key != "hcloud:token") or (isinstance(value, dict) and "secure" in value), key
    values = {k.split(":", 1)[1]: v for k, v in config.items() if k.startswith(f"{NAMESPACE}:")}
    values["sshPublicKey"] = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ8b0pTBp5e8hGQHDgNnLrHHOHxg0VHzUXoTWlBXDk8S test"
    settings = parse_settings(lambda k: None if k not in values else values[k] if isinstance(values[k], str) else json.dumps(values[k]))
    assert settings.creates_server and settings.protect and settings.backups
