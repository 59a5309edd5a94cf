"""A stand-in `pulumi` CLI for the set-up and documentation tests: it records every call and keeps state like the real one.

Each call appends one JSON line to $FAKE_PULUMI_LOG: argv, cwd, the stack it acted on, the
backend (PULUMI_BACKEND_URL) and the passphrase's identity (a hash of PULUMI_CONFIG_PASSPHRASE or
of the PULUMI_CONFIG_PASSPHRASE_FILE contents). Like the real CLI it keeps stacks on the backend
(`<dir>/.pulumi/stacks/cognivern/<stack>.json` for file:// URLs), writes config into
`Pulumi.<stack>.yaml` in the project folder (secrets as ciphertext, `encryptionsalt` on stack
creation), answers `config get` with Pulumi.yaml's declared defaults for keys the stack lacks,
refuses a secret under another passphrase, and reads a missing `config set` value from stdin.
`config --json [--show-secrets]` prints every key like Pulumi v3 (checked against the real CLI):
{"value": str, "secret": bool} plus "objectValue" for a structured value, the project defaults
included; without --show-secrets a secret, or a structured value holding one, is only
{"secret": true}. So a command that would change a tracked file does change it here.

Usage: `python fake_pulumi.py ARGS...`; tests put a `pulumi` wrapper that runs it on PATH.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any


def yaml() -> Any:
    """PyYAML, imported only by the calls that read or write YAML (35 ms: `version` and `stack
    select`, most of the suite's calls, need none)."""
    import yaml as module

    return module


VERSION = os.environ.get("FAKE_PULUMI_VERSION", "3.274.1")
PROJECT = "cognivern"


class CliError(Exception):
    pass


def passphrase() -> str | None:
    if os.environ.get("PULUMI_CONFIG_PASSPHRASE"):
        return os.environ["PULUMI_CONFIG_PASSPHRASE"]
    path = os.environ.get("PULUMI_CONFIG_PASSPHRASE_FILE")
    if path:
        try:
            return Path(path).read_text()
        except OSError as err:
            raise CliError(f"unable to read PULUMI_CONFIG_PASSPHRASE_FILE: {err}") from None
    return None


def passphrase_id() -> str | None:
    value = passphrase()
    return hashlib.sha256(value.encode()).hexdigest()[:16] if value is not None else None


def stacks_dir() -> Path:
    url = os.environ.get("PULUMI_BACKEND_URL", "")
    if not url:
        raise CliError(
            "no backend: PULUMI_BACKEND_URL is unset and nobody ran `pulumi login` (the real CLI would ask you to log in to Pulumi Cloud)"
        )
    if not url.startswith("file://"):
        raise CliError(f"stand-in pulumi only knows file:// backends, got {url}")
    root = Path(url.removeprefix("file://"))
    if not root.is_dir():
        raise CliError(f"unable to open bucket {url}: stat {root}: no such file or directory")
    return root / ".pulumi" / "stacks" / PROJECT


def stack_file(stack: str) -> Path:
    return Path.cwd() / f"Pulumi.{stack}.yaml"


def load_stack_config(stack: str) -> dict[str, Any]:
    path = stack_file(stack)
    data = yaml().safe_load(path.read_text()) if path.exists() else None
    return data if isinstance(data, dict) else {}


def save_stack_config(stack: str, data: dict[str, Any]) -> None:
    stack_file(stack).write_text(yaml().safe_dump(data, sort_keys=False))


def require_stack(stack: str | None) -> str:
    if not stack:
        raise CliError("no stack selected; please use `pulumi stack select`")
    if not (stacks_dir() / f"{stack}.json").exists():
        raise CliError(f"no stack named '{stack}' found")
    return stack


def salt() -> str:
    pid = passphrase_id()
    if pid is None:
        raise CliError("passphrase must be set with PULUMI_CONFIG_PASSPHRASE or PULUMI_CONFIG_PASSPHRASE_FILE environment variables")
    return f"fake:{pid}"


def check_passphrase(stack: str, data: dict[str, Any]) -> None:
    if data.get("encryptionsalt") != salt():
        raise CliError(f"incorrect passphrase for stack {stack}")


def parse(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Positional words and the flags this stand-in understands."""
    words: list[str] = []
    flags: dict[str, Any] = {"secret": False, "path": False, "stack": None, "json": False, "show-secrets": False}
    it = iter(argv)
    for arg in it:
        if arg in ("--stack", "-s"):
            flags["stack"] = next(it)
        elif arg.startswith("--stack="):
            flags["stack"] = arg.split("=", 1)[1]
        elif arg in ("--secret", "--path", "--json", "--show-secrets"):
            flags[arg[2:]] = True
        elif arg in ("--plaintext", "--non-interactive", "--yes", "-y", "--diff", "--skip-preview"):
            pass
        elif arg == "--file":
            flags["file"] = next(it)
        elif arg.startswith("-"):
            raise CliError(f"unknown flag {arg}")
        else:
            words.append(arg)
    return words, flags


def project_defaults() -> dict[str, Any]:
    """Declared defaults of Pulumi.yaml, merged under the stack's values like the CLI does (pkg/workspace mergeConfig)."""
    path = Path.cwd() / "Pulumi.yaml"
    declared = (yaml().safe_load(path.read_text()) or {}).get("config", {}) if path.exists() else {}
    return {f"{PROJECT}:{k}": v["default"] for k, v in declared.items() if isinstance(v, dict) and "default" in v}


def merged(data: dict[str, Any]) -> dict[str, Any]:
    return {**project_defaults(), **data.get("config", {})}


def get_path(data: dict[str, Any], key: str, path: bool) -> Any:
    config = merged(data)
    if not path:
        return config.get(key)
    namespace_key, _, rest = key.partition(".")
    node: Any = config.get(namespace_key)
    for part in rest.split(".") if rest else []:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def set_path(data: dict[str, Any], key: str, value: Any, path: bool) -> None:
    config = data.setdefault("config", {})
    if not path:
        config[key] = value
        return
    namespace_key, _, rest = key.partition(".")
    node = config.setdefault(namespace_key, {})
    parts = rest.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def is_secure(value: Any) -> bool:
    return isinstance(value, dict) and "secure" in value


def holds_secret(value: Any) -> bool:
    if is_secure(value):
        return True
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return any(holds_secret(v) for v in children)


def decrypt(value: Any) -> Any:
    if is_secure(value):
        return base64.b64decode(value["secure"].removeprefix("v1:")).decode()
    if isinstance(value, dict):
        return {k: decrypt(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decrypt(v) for v in value]
    return value


def reveal(value: Any) -> str:
    """A value as the CLI prints it: strings as they are, anything else (secrets decrypted) as compact JSON like Go's."""
    plain = decrypt(value)
    return plain if isinstance(plain, str) else json.dumps(plain, separators=(",", ":"), sort_keys=True)


def config_json(name: str, data: dict[str, Any], show_secrets: bool) -> dict[str, Any]:
    """`config --json [--show-secrets]`: every key, sorted, stack values over Pulumi.yaml's defaults."""
    entries: dict[str, Any] = {}
    for key, value in sorted(merged(data).items()):
        secret = holds_secret(value)
        if secret and not show_secrets:
            entries[key] = {"secret": True}
            continue
        if secret:
            check_passphrase(name, data)
        entry: dict[str, Any] = {"value": reveal(value)}
        if isinstance(value, (dict, list)) and not is_secure(value):
            entry["objectValue"] = decrypt(value)
        entries[key] = {**entry, "secret": secret}
    return entries


def run(argv: list[str]) -> tuple[int, str | None]:
    words, flags = parse(argv)
    stack = flags["stack"]
    if words[:1] == ["version"]:
        print(f"v{VERSION}")
        return 0, None
    if words[:2] == ["stack", "init"]:
        name = words[2] if len(words) > 2 else stack
        folder = stacks_dir()
        if (folder / f"{name}.json").exists():
            raise CliError(f"stack '{name}' already exists")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text("{}\n")
        data = load_stack_config(name)
        data = {"encryptionsalt": salt(), **{k: v for k, v in data.items() if k != "encryptionsalt"}}
        save_stack_config(name, data)
        return 0, name
    if words[:2] == ["stack", "select"]:
        name = words[2] if len(words) > 2 else stack
        return 0, require_stack(name)
    if words == ["config"] and flags["json"]:
        name = require_stack(stack)
        print(json.dumps(config_json(name, load_stack_config(name), flags["show-secrets"]), indent=2))
        return 0, name
    if words[:1] == ["config"] and len(words) >= 2:
        name = require_stack(stack)
        data = load_stack_config(name)
        action, key = words[1], words[2] if len(words) > 2 else None
        if key is None:
            raise CliError(f"config {action}: a key is required")
        if action == "get":
            value = get_path(data, key, flags["path"])
            if value is None:
                raise CliError(f"configuration key '{key}' not found for stack '{name}'")
            if holds_secret(value):
                check_passphrase(name, data)
            print(reveal(value))
            return 0, name
        if action == "set":
            # like the CLI (pkg/cmd/pulumi/config): piped stdin is read whole, one trailing newline dropped
            value = words[3] if len(words) > 3 else sys.stdin.read().removesuffix("\n")
            if flags["secret"]:
                check_passphrase(name, data)
                set_path(data, key, {"secure": "v1:" + base64.b64encode(value.encode()).decode()}, flags["path"])
            else:
                set_path(data, key, value, flags["path"])
            save_stack_config(name, data)
            return 0, name
        if action == "rm":
            data.get("config", {}).pop(key, None)
            save_stack_config(name, data)
            return 0, name
        raise CliError(f"stand-in pulumi: config {action} is not implemented")
    # preview, up, destroy, stack output, ...: recorded, nothing else
    name = require_stack(stack)
    print(f"stand-in pulumi: {' '.join(argv)}")
    return 0, name


def main() -> int:
    argv = sys.argv[1:]
    entry: dict[str, Any] = {
        "argv": argv,
        "cwd": os.getcwd(),
        "backend": os.environ.get("PULUMI_BACKEND_URL"),
        "passphrase": None,
        "stack": None,
    }
    try:
        entry["passphrase"] = passphrase_id()
        code, entry["stack"] = run(argv)
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 255
    entry["exit"] = code
    log = os.environ.get("FAKE_PULUMI_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps(entry) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
