"""Run the real `__main__.py` under the Pulumi SDK's mock monitor and record what it registers.

Each registration keeps what the engine would see: type, name, parent, inputs (secrets still
marked), dependencies and options. Used by the program tests (the first level of verification;
`pulumi up` itself runs on the real engine, tests/support/real_engine.py).
"""

from __future__ import annotations

import json
import runpy
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
from google.protobuf import json_format
from pulumi.runtime import mocks as pulumi_mocks

from tests.support import dynamic

REPO = Path(__file__).resolve().parents[2]
MAIN = REPO / "__main__.py"
PROJECT = "cognivern"  # the project name is the config namespace (typed project config must be project-namespaced)
SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"


@dataclass
class Registration:
    type: str
    name: str
    urn: str
    parent: str
    custom: bool
    inputs: dict[str, Any]  # plain JSON of the request, secrets as {"4dabf18193072939515e22adb298388d": SECRET_SIG, "value": ...}
    dependencies: list[str]
    delete_before_replace: bool
    ignore_changes: list[str]
    replace_on_changes: list[str]
    additional_secret_outputs: list[str]
    protect: bool
    aliases: list[Any] = field(default_factory=list)  # alias specs as dicts (name, parentUrn, ...) and alias URNs


@dataclass
class ProgramRun:
    registrations: list[Registration]
    outputs: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def by_type(self, typ: str) -> list[Registration]:
        return [r for r in self.registrations if r.type == typ]

    def get(self, name: str) -> Registration:
        found = [r for r in self.registrations if r.name == name]
        assert len(found) == 1, f"{name}: {[r.name for r in self.registrations]}"
        return found[0]

    def parent_name(self, reg: Registration) -> str:
        return next(r.name for r in self.registrations if r.urn == reg.parent)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.registrations]


def unsecret(value: Any) -> Any:
    """Strip secret markers (for assertions on the plain value)."""
    if isinstance(value, dict):
        if value.get("4dabf18193072939515e22adb298388d") == SECRET_SIG:
            return unsecret(value.get("value"))
        return {k: unsecret(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unsecret(v) for v in value]
    return value


def is_secret(value: Any) -> bool:
    return isinstance(value, dict) and value.get("4dabf18193072939515e22adb298388d") == SECRET_SIG


NewResource = Callable[[pulumi_mocks.MockResourceArgs], tuple[str | None, dict[str, Any]]]


class DefaultMocks(pulumi_mocks.Mocks):
    """Plausible provider outputs: server addresses, command stdout, ids."""

    def __init__(self, command_stdout: Callable[[str, dict[str, Any]], str] | None = None) -> None:
        self.command_stdout = command_stdout

    def new_resource(self, args: pulumi_mocks.MockResourceArgs) -> tuple[str | None, dict[str, Any]]:
        outputs = dict(args.inputs)
        if dynamic.is_dynamic(args.typ):
            return dynamic.create(args)
        if args.typ == "hcloud:index/server:Server":
            outputs.update(ipv4Address="203.0.113.10", ipv6Address="2001:db8::1", status="running")
        elif args.typ in ("hcloud:index/firewall:Firewall", "hcloud:index/sshKey:SshKey"):
            return "4711", outputs
        elif args.typ == "command:remote:Command":
            stdout = self.command_stdout(args.name, args.inputs) if self.command_stdout else ""
            outputs.update(stdout=stdout, stderr="")
        return f"{args.name}-id", outputs

    def call(self, args: pulumi_mocks.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
        return {}, None


class RecordingMonitor(pulumi_mocks.MockMonitor):
    def __init__(self, mocks: pulumi_mocks.Mocks) -> None:
        super().__init__(mocks)
        self.recorded: list[Registration] = []
        self._lock = threading.Lock()

    def RegisterResource(self, request: Any) -> Any:  # noqa: N802 (gRPC name)
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            with self._lock:
                self.recorded.append(
                    Registration(
                        type=request.type,
                        name=request.name,
                        urn=response.urn,
                        parent=request.parent,
                        custom=request.custom,
                        inputs=json_format.MessageToDict(request.object),
                        dependencies=list(request.dependencies),
                        delete_before_replace=request.deleteBeforeReplace,
                        ignore_changes=list(request.ignoreChanges),
                        replace_on_changes=list(request.replaceOnChanges),
                        additional_secret_outputs=list(request.additionalSecretOutputs),
                        protect=request.protect,
                        aliases=[json_format.MessageToDict(a) for a in request.aliases] + list(request.aliasURNs),
                    )
                )
        return response


def config_map(config: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in config.items():
        full = key if ":" in key else f"cognivern:{key}"
        out[full] = value if isinstance(value, str) else json.dumps(value)
    return out


class WarningCollector:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def debug(self, message: str) -> None:
        pass

    info = debug

    def warning(self, message: str) -> None:
        self.messages.append(message)

    error = warning


def run_program(
    config: Mapping[str, Any],
    *,
    secret_keys: tuple[str, ...] = (),
    stack: str = "prod",
    preview: bool = False,
    mocks: pulumi_mocks.Mocks | None = None,
    recorded: list[Registration] | None = None,
) -> ProgramRun:
    """Run `__main__.py` with this stack config; raises what the program raises (e.g. RunError)."""
    mocks = mocks or DefaultMocks()
    pulumi.runtime.settings.ROOT.set(None)  # a fresh Stack per run: exports must not leak between runs
    monitor = RecordingMonitor(mocks)
    if recorded is not None:
        monitor.recorded = recorded  # lets a caller see what registered even when the program raises
    log = WarningCollector()
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack=stack, preview=preview, monitor=monitor, logger=log)  # type: ignore[arg-type]
    pulumi.runtime.set_all_config(config_map(config), secret_keys=[k if ":" in k else f"cognivern:{k}" for k in secret_keys])
    result: dict[str, Any] = {}

    @pulumi.runtime.test
    def program() -> pulumi.Output[Any]:
        runpy.run_path(str(MAIN), run_name="__main__")
        stack_resource = pulumi.runtime.get_root_resource()
        exports = dict(getattr(stack_resource, "outputs", {}))
        return pulumi.Output.all(**exports).apply(result.update) if exports else pulumi.Output.from_input(None)

    program()
    return ProgramRun(registrations=list(monitor.recorded), outputs=result, warnings=log.messages)
