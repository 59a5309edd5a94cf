"""TEST-ONLY engine stand-in: what `pulumi up` + the pulumi-command provider would do, over OpenSSH.

The Pulumi CLI and its provider plugins cannot be installed where these tests run, so this module
plays both parts for the resource types an existing-host stack uses (`command:remote:Command`,
`command:remote:CopyToRemote`). It runs the real `__main__.py` through
`tests.support.program.run_program` with a `Mocks` whose `new_resource` diffs each registration
against a JSON state file and creates, updates, replaces or leaves the resource as the engine
would, running the commands on a real host with the OpenSSH client (`ssh`, `sftp -b`).

What it reproduces, with the source that specifies each behaviour, and what it does not: ENGINE.md.
It is not a deployment tool: state holds secrets in plain text, hcloud resources are refused.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pulumi
from pulumi.runtime import mocks as pulumi_mocks

from tests.engine.project_config import check_secret_declarations, merge_project_defaults
from tests.support import dynamic
from tests.support import program as program_module
from tests.support.program import PROJECT, SECRET_SIG, run_program

SECRET_KEY = "4dabf18193072939515e22adb298388d"
COMMAND = "command:remote:Command"
COPY = "command:remote:CopyToRemote"
SUPPORTED = (COMMAND, COPY)
STATE_VERSION = 1
# ssh's own failures (exit 255) while dialling: the provider retries a dial up to dialErrorLimit times.
# The key exchanges pulumi-command's Go SSH client offers, in its order (golang.org/x/crypto/ssh
# defaultKexAlgos, v0.58.0). OpenSSH's own default puts sntrup761x25519 first, which the Go client
# never negotiates and which cost 0.1 s of client CPU per connection here against 0.015 s.
GO_CLIENT_KEX = (
    "mlkem768x25519-sha256",
    "curve25519-sha256",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "diffie-hellman-group14-sha256",
    "diffie-hellman-group14-sha1",
)


@functools.cache
def go_client_kex() -> str:
    """GO_CLIENT_KEX as this OpenSSH client's KexAlgorithms (an unknown name would be an error)."""
    known = set(subprocess.run(["ssh", "-Q", "kex"], capture_output=True, text=True, check=True).stdout.split())
    return ",".join(k for k in GO_CLIENT_KEX if k in known)


DIAL_ERRORS = ("Connection refused", "Connection reset", "Connection timed out", "kex_exchange_identification", "No route to host")
SETENV_WARNING = (
    "Unable to set '{key}'. This only works if your SSH server is configured to accept these variables via AcceptEnv. "
    "Alternatively, if a Bash-like shell runs the command on the remote host, you could prefix the command itself with the "
    "variables in the form 'VAR=value command'"
)


class _DropEngineFutureNoise(logging.Filter):
    """The SDK leaves our raised errors in futures nobody awaits; asyncio logs each one when it is collected."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage().startswith("Future exception was never retrieved") and isinstance(exc, EngineError))


logging.getLogger("asyncio").addFilter(_DropEngineFutureNoise())


class EngineError(Exception):
    """A resource operation failed; the run stops here (like the engine's first failed step)."""


class CommandError(EngineError):
    def __init__(self, message: str, *, command: str, exit_code: int, stdout: str, stderr: str) -> None:
        super().__init__(message)
        self.command = command
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr


class UnsupportedError(EngineError):
    """A resource type or connection option the stand-in does not drive (e.g. hcloud)."""


class RunFailedError(Exception):
    """`Engine.up(check=True)` on a run that failed; `.report` says what ran and why it stopped."""

    def __init__(self, report: RunReport) -> None:
        super().__init__(f"run failed: {report.error}")
        self.report = report


# --------------------------------------------------------------------------- report


@dataclass
class Step:
    """One resource operation, in execution order. `op`: create, update, replace, delete, same, failed
    (its operation raised), skipped (registered after the run had failed: nothing ran)."""

    urn: str
    type: str
    name: str
    op: str
    index: int
    commands: list[str] = field(default_factory=list)
    duration: float = 0.0
    error: str | None = None
    changed: list[str] = field(default_factory=list)
    detail: str = ""  # e.g. "replacement: old deleted at the end" / "delete-before-replace"
    dependencies: list[str] = field(default_factory=list)


@dataclass
class RunReport:
    stack: str
    preview: bool
    steps: list[Step]
    outputs: dict[str, Any]
    error: BaseException | None
    warnings: list[str]
    dependency_violations: list[str]
    duration: float

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def commands(self) -> list[str]:
        """Every command string (or copy) executed, in order."""
        return [c for s in self.steps for c in s.commands]

    def ops(self, *, include_same: bool = True) -> dict[str, str]:
        """Resource name -> operation (the last one, for a URN that also had its old copy deleted)."""
        out: dict[str, str] = {}
        for s in self.steps:
            if s.op == "same" and not include_same:
                continue
            if s.op == "delete" and s.name in out:
                continue  # the deletion of a replaced resource's old copy
            out[s.name] = s.op
        return out

    def op(self, name_suffix: str) -> str:
        found = [op for name, op in self.ops().items() if name.endswith(name_suffix)]
        assert len(found) == 1, f"{name_suffix}: {self.ops()}"
        return found[0]

    def step(self, name_suffix: str, op: str | None = None) -> Step:
        found = [s for s in self.steps if s.name.endswith(name_suffix) and (op is None or s.op == op)]
        assert len(found) == 1, f"{name_suffix} ({op}): {[(s.name, s.op) for s in self.steps]}"
        return found[0]

    def summary(self) -> str:
        lines = [
            f"{'preview' if self.preview else 'up'} {self.stack}: {'ok' if self.ok else f'FAILED: {self.error}'} ({self.duration:.1f}s)"
        ]
        for s in self.steps:
            lines.append(f"  {s.index:3d} {s.op:8s} {s.name} {s.duration:.2f}s {s.detail}".rstrip())
        return "\n".join(lines)


# --------------------------------------------------------------------------- values


def _is_secret(value: Any) -> bool:
    return isinstance(value, dict) and value.get(SECRET_KEY) == SECRET_SIG


def _hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def normalize(value: Any) -> Any:
    """Mock inputs -> JSON: secrets as {"__secret": v}, assets as {"__asset": kind, "sha256": ...}, whole floats as ints."""
    if _is_secret(value):
        return {"__secret": normalize(value.get("value"))}
    if isinstance(value, pulumi.FileAsset):
        path = Path(str(value.path))
        return {"__asset": "file", "path": str(path), "sha256": _hash_bytes(path.read_bytes())}
    if isinstance(value, pulumi.StringAsset):
        text = str(value.text)
        return {"__asset": "string", "text": text, "sha256": _hash_bytes(text.encode())}
    if isinstance(value, (pulumi.Asset, pulumi.Archive)):
        raise UnsupportedError(f"{type(value).__name__} sources are not supported by the engine stand-in (FileAsset, StringAsset only)")
    if isinstance(value, dict):
        return {str(k): normalize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalize(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def plain(value: Any) -> Any:
    """Strip the secret wrappers of `normalize`d values (diffs ignore secretness, commands need the text)."""
    if isinstance(value, dict):
        if set(value) == {"__secret"}:
            return plain(value["__secret"])
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def masked(value: Any) -> Any:
    """For reports: secrets shown as "[secret]"."""
    if isinstance(value, dict):
        if set(value) == {"__secret"}:
            return "[secret]"
        return {k: masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


def _replace_roots(replace_on_changes: Sequence[str]) -> set[str]:
    """`triggers[*]`, `a.b`, `*` -> the top-level input names whose change forces replacement."""
    return {p.split("[", 1)[0].split(".", 1)[0] for p in replace_on_changes}


def diff(old_inputs: Mapping[str, Any], new_inputs: Mapping[str, Any], replace_on_changes: Sequence[str]) -> tuple[str, list[str]]:
    """("same" | "update" | "replace", changed top-level keys); values compared without secretness."""
    old, new = plain(dict(old_inputs)), plain(dict(new_inputs))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not changed:
        return "same", []
    roots = _replace_roots(replace_on_changes)
    if "*" in roots or roots & set(changed):
        return "replace", changed
    return "update", changed


# --------------------------------------------------------------------------- ssh


@dataclass(frozen=True)
class Connection:
    host: str
    port: int
    user: str
    private_key: str
    host_key: str | None
    per_dial_timeout: int
    dial_error_limit: int

    @classmethod
    def from_inputs(cls, raw: Any) -> Connection:
        conn = plain(raw)
        if not isinstance(conn, dict) or not conn.get("host"):
            raise UnsupportedError(f"connection without a host: {masked(raw)}")
        if conn.get("proxy"):
            raise UnsupportedError("connection.proxy (bastion) is not supported by the engine stand-in")
        if conn.get("password"):
            raise UnsupportedError("connection.password is not supported by the engine stand-in (BatchMode ssh); use privateKey")
        if not conn.get("privateKey"):
            raise UnsupportedError("connection.privateKey is required by the engine stand-in (no ssh-agent, no password)")
        return cls(
            host=str(conn["host"]),
            port=int(conn.get("port") or 22),
            user=str(conn.get("user") or "root"),
            private_key=str(conn["privateKey"]),
            host_key=str(conn["hostKey"]) if conn.get("hostKey") else None,
            per_dial_timeout=int(conn.get("perDialTimeout") or 15),
            dial_error_limit=int(conn.get("dialErrorLimit") or 10),
        )

    @contextlib.contextmanager
    def options(self) -> Iterator[list[str]]:
        """OpenSSH client options: key in a 0600 temp file; host key pinned in a temp known_hosts when given."""
        with tempfile.TemporaryDirectory(prefix="engine-ssh-") as tmp:
            key = Path(tmp) / "id"
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.private_key if self.private_key.endswith("\n") else self.private_key + "\n")
            opts = ["-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes"]
            opts += ["-o", f"ConnectTimeout={self.per_dial_timeout}", "-o", "LogLevel=ERROR", "-o", f"KexAlgorithms={go_client_kex()}"]
            if self.host_key:
                known = Path(tmp) / "known_hosts"
                pattern = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
                known.write_text(f"{pattern} {self.host_key}\n")
                opts += ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}", "-o", "GlobalKnownHostsFile=/dev/null"]
                algorithm = self.host_key.split()[0]
                if not algorithm.startswith("ssh-rsa"):
                    opts += ["-o", f"HostKeyAlgorithms={algorithm}"]
            else:
                # pulumi-command without hostKey does not check the host key at all.
                opts += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "GlobalKnownHostsFile=/dev/null"]
            yield opts

    def run(self, argv: list[str], stdin: bytes, timeout: float) -> subprocess.CompletedProcess[bytes]:
        """Run an ssh/sftp argv, retrying only dial failures (exit 255 + a connect error) up to dialErrorLimit."""
        for attempt in range(max(self.dial_error_limit, 1)):
            proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout)
            err = proc.stderr.decode(errors="replace")
            if proc.returncode == 255 and attempt + 1 < self.dial_error_limit and any(e in err for e in DIAL_ERRORS):
                time.sleep(min(0.1 * (attempt + 1), 1.0))
                continue
            return proc
        return proc


def _short(command: str, limit: int = 160) -> str:
    one = " ".join(command.split())
    return one if len(one) <= limit else one[: limit - 3] + "..."


def _trim_newline(text: str) -> str:
    # commandOutputs.go: strings.TrimSuffix(stdoutbuf.String(), "\n")
    return text[:-1] if text.endswith("\n") else text


# --------------------------------------------------------------------------- state


def _new_state(stack: str) -> dict[str, Any]:
    return {"version": STATE_VERSION, "stack": stack, "resources": {}, "pendingDeletes": [], "seq": 0}


class StateFile:
    """JSON state per stack: {"resources": {urn: {...}}, "pendingDeletes": [...]} written after every step."""

    def __init__(self, path: Path, stack: str) -> None:
        self.path = path
        self.stack = stack

    def load(self) -> dict[str, Any]:
        if not self.path.exists():
            return _new_state(self.stack)
        data: dict[str, Any] = json.loads(self.path.read_text())
        if data.get("version") != STATE_VERSION:
            raise EngineError(f"{self.path}: unknown state version {data.get('version')}")
        return data

    def save(self, data: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds secrets in plain text (test-only)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------- one run


class _Run(pulumi_mocks.Mocks):
    """The mocks of one `up`/`preview`: every registration goes through `new_resource` under one lock."""

    def __init__(self, engine: Engine, stack: str, preview: bool) -> None:
        self.engine = engine
        self.stack = stack
        self.preview = preview
        self.file = engine.state_file(stack)
        self.old = self.file.load()
        # The new state starts as the old one: what is not reached this run stays as it was (engine checkpoints).
        self.state: dict[str, Any] = json.loads(json.dumps(self.old))
        self.lock = threading.Lock()
        self.tls = threading.local()
        self.steps: list[Step] = []
        self.registered: set[str] = set()
        self.completed: set[str] = set()
        self.components: set[str] = set()
        self.warnings: list[str] = []
        self.violations: list[str] = []
        self.failure: BaseException | None = None
        self.closed = False

    # -- the monitor hands us each request (MockResourceArgs lacks dependencies and options)
    def monitor_class(self) -> type[program_module.RecordingMonitor]:
        run = self

        class EngineMonitor(program_module.RecordingMonitor):
            def RegisterResource(self, request: Any) -> Any:  # noqa: N802 (gRPC name)
                run.tls.request = request
                run.tls.urn = self.make_urn(request.parent, request.type, request.name)
                try:
                    return super().RegisterResource(request)
                finally:
                    run.tls.request = None
                    run.tls.urn = None

        return EngineMonitor

    def call(self, args: pulumi_mocks.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
        raise UnsupportedError(f"invoke {args.token} is not supported by the engine stand-in")

    def new_resource(self, args: pulumi_mocks.MockResourceArgs) -> tuple[str | None, dict[str, Any]]:
        request = getattr(self.tls, "request", None)
        urn = getattr(self.tls, "urn", None)
        if request is None or urn is None:
            raise EngineError("registration without its request: run through Engine.up/preview")
        with self.lock:
            if self.closed:
                raise EngineError(f"{urn}: registered after the run had ended; nothing ran")
            index = len(self.steps)
            deps = list(request.dependencies)
            if not args.custom:
                self.components.add(urn)
                self.completed.add(urn)
                return None, {}
            if self.failure is not None:
                self.steps.append(Step(urn, args.typ, args.name, "skipped", index, dependencies=deps, detail="the run had already failed"))
                raise EngineError(f"{args.name}: not run, an earlier resource failed")
            missing = [d for d in deps if d not in self.completed]
            if missing:
                self.violations.append(f"{args.name} ran before its dependencies completed: {missing}")
            try:
                return self._register(args, request, urn, index, deps)
            except BaseException as err:
                self.failure = err
                raise

    # -- one registration
    def _register(
        self, args: pulumi_mocks.MockResourceArgs, request: Any, urn: str, index: int, deps: list[str]
    ) -> tuple[str, dict[str, Any]]:
        if args.typ not in SUPPORTED and not dynamic.is_dynamic(args.typ):
            self.steps.append(Step(urn, args.typ, args.name, "failed", index, dependencies=deps, error="unsupported type"))
            raise UnsupportedError(
                f"{args.name}: {args.typ} is not supported by the engine stand-in; it drives existing-host stacks only "
                "(command:remote:Command, command:remote:CopyToRemote). Set cognivern:host."
            )
        self.registered.add(urn)
        inputs = normalize(dict(args.inputs))
        old = self.state["resources"].get(urn)
        if old is None:
            op, changed = "create", []
        elif old["type"] != args.typ:
            op, changed = "replace", ["type"]
        elif dynamic.is_dynamic(args.typ):
            op, changed = self._dynamic_diff(old, args.inputs)
        else:
            op, changed = diff(old["inputs"], inputs, list(request.replaceOnChanges))
        dbr = bool(request.deleteBeforeReplace)
        step = Step(urn, args.typ, args.name, op, index, changed=changed, dependencies=deps)
        self.steps.append(step)
        record = {
            "type": args.typ,
            "name": args.name,
            "parent": request.parent,
            "inputs": inputs,
            "outputs": {},
            "dependencies": deps,
            "deleteBeforeReplace": dbr,
            "additionalSecretOutputs": list(request.additionalSecretOutputs),
            "id": old["id"] if old and op in ("same", "update") else f"{args.name}-{os.urandom(4).hex()}",
        }
        if self.preview:
            self.completed.add(urn)
            if op == "same":
                assert old is not None
                return old["id"], self._mock_outputs(args, old["outputs"])
            return record["id"], dict(args.inputs)  # stdout/stderr unknown in a preview (the provider returns no output)

        started = time.monotonic()
        try:
            if op == "same":
                assert old is not None
                record["outputs"] = old["outputs"]
            elif dynamic.is_dynamic(args.typ):
                record["outputs"] = self._dynamic_apply(step, op, old, args.inputs, str(record["id"]))
            elif op == "create":
                record["outputs"] = self._create(step, args.typ, inputs)
            elif op == "update":
                assert old is not None
                record["outputs"] = self._update(step, args.typ, old, inputs)
            else:  # replace
                assert old is not None
                if dbr or old.get("deleteBeforeReplace"):
                    step.detail = "delete-before-replace: old deleted first"
                    self._delete(step, old)
                    del self.state["resources"][urn]
                    self._checkpoint()
                    record["outputs"] = self._create(step, args.typ, inputs)
                else:
                    step.detail = "create-before-delete: old deleted at the end"
                    record["outputs"] = self._create(step, args.typ, inputs)
                    self.state["pendingDeletes"].append({**old, "urn": urn})
        except BaseException as err:
            step.op = "failed" if op != "same" else op
            step.error = str(err)
            step.detail = f"{op} failed" + (f"; {step.detail}" if step.detail else "")
            raise
        finally:
            step.duration = time.monotonic() - started
        self.state["seq"] += 1
        record["seq"] = self.state["seq"]
        self.state["resources"][urn] = record
        self.completed.add(urn)
        self._checkpoint()
        return record["id"], self._mock_outputs(args, record["outputs"])

    # -- Python dynamic resources (pulumi/dynamic/__main__.py: the host unpickles `__provider` and calls it)
    def _dynamic_diff(self, old: Mapping[str, Any], inputs: Mapping[str, Any]) -> tuple[str, list[str]]:
        """The provider's own `diff` decides: no changes -> same; `replaces` -> replace; else update."""
        result = dynamic.load_provider(inputs).diff(old["id"], old["outputs"], dynamic.props(inputs))
        if result.changes is False:
            return "same", []
        return ("replace" if result.replaces else "update"), list(result.replaces or [])

    def _dynamic_apply(self, step: Step, op: str, old: Mapping[str, Any] | None, inputs: Mapping[str, Any], rid: str) -> dict[str, Any]:
        provider, news = dynamic.load_provider(inputs), dynamic.props(inputs)
        if op == "update":
            assert old is not None
            result = provider.update(rid, old["outputs"], news)
            return {**old["outputs"], **(result.outs or {})}
        if op == "replace":
            step.detail = "dynamic resource replaced (the old one's delete is not run by the stand-in)"
        created = provider.create(news)
        return {**news, **(created.outs or {})}

    def _mock_outputs(self, args: pulumi_mocks.MockResourceArgs, outputs: Mapping[str, Any]) -> dict[str, Any]:
        """The provider's state: its inputs plus stdout/stderr (Command) as the SDK should see them;
        a dynamic resource's outputs are whatever its provider returned."""
        if dynamic.is_dynamic(args.typ):
            return {**dict(args.inputs), **outputs}
        out = dict(args.inputs)
        for key in ("stdout", "stderr"):
            if key in outputs:
                out[key] = outputs[key]
        return out

    def _checkpoint(self) -> None:
        if not self.preview:
            self.file.save(self.state)

    # -- provider operations
    def _create(self, step: Step, typ: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
        if typ == COPY:
            self._copy(step, inputs)
            return {}
        create = plain(inputs.get("create"))
        if create is None:
            return {"stdout": "", "stderr": ""}
        return self._command(step, inputs, str(create), previous=None)

    def _update(self, step: Step, typ: str, old: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
        if typ == COPY:
            o, n = plain(old["inputs"]), plain(inputs)
            if o.get("source", {}).get("sha256") != n.get("source", {}).get("sha256") or o.get("remotePath") != n.get("remotePath"):
                self._copy(step, inputs)
            else:
                step.detail = "no copy: asset hash and remotePath unchanged"
            return {}
        command = plain(inputs.get("update")) or plain(inputs.get("create"))
        if command is None:
            return {"stdout": old["outputs"].get("stdout", ""), "stderr": old["outputs"].get("stderr", "")}
        return self._command(step, inputs, str(command), previous=old["outputs"])

    def _delete(self, step: Step, old: Mapping[str, Any]) -> None:
        if old["type"] != COMMAND:
            return  # CopyToRemote has no delete: the file stays
        command = plain(old["inputs"].get("delete"))
        if command is None:
            return
        self._command(step, old["inputs"], str(command), previous=old["outputs"])

    def _command(self, step: Step, inputs: Mapping[str, Any], command: str, previous: Mapping[str, Any] | None) -> dict[str, Any]:
        conn = Connection.from_inputs(inputs["connection"])
        env: dict[str, str] = {str(k): str(v) for k, v in (plain(inputs.get("environment")) or {}).items()}
        refused = sorted(k for k in env if k not in self.engine.accept_env)
        if refused:
            # command.go: a Setenv the server refuses fails the command ("could not set environment variable").
            self.warnings.append(SETENV_WARNING.format(key=refused[0]))
            raise EngineError(f'could not set environment variable "{refused[0]}": ssh: setenv failed')
        if previous is not None and plain(inputs.get("addPreviousOutputInEnv")) is not False:
            for key, out in (("PULUMI_COMMAND_STDOUT", "stdout"), ("PULUMI_COMMAND_STDERR", "stderr")):
                if previous.get(out):
                    if key in self.engine.accept_env:
                        env[key] = str(previous[out])
                    else:  # the provider warns and goes on without it
                        self.warnings.append(f"{step.name}: " + SETENV_WARNING.format(key=key))
        stdin_text = plain(inputs.get("stdin"))
        stdin = str(stdin_text).encode() if stdin_text else b""
        step.commands.append(command)
        with conn.options() as opts:
            for k, v in env.items():
                opts += ["-o", f"SetEnv={k}={v}"]
            argv = ["ssh", *opts, "-p", str(conn.port), f"{conn.user}@{conn.host}", "--", command]
            proc = conn.run(argv, stdin, self.engine.command_timeout)
        stdout, stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        if proc.returncode != 0:
            tail = (stdout + stderr)[-4000:]
            raise CommandError(
                f"{step.name}: Process exited with status {proc.returncode}: running {_short(command)!r}:\n{tail}",
                command=command,
                exit_code=proc.returncode,
                stdout=stdout,
                stderr=stderr,
            )
        return {"stdout": _trim_newline(stdout), "stderr": _trim_newline(stderr)}

    def _copy(self, step: Step, inputs: Mapping[str, Any]) -> None:
        conn = Connection.from_inputs(inputs["connection"])
        source = plain(inputs.get("source"))
        remote_path = str(plain(inputs["remotePath"]))
        if not isinstance(source, dict) or "__asset" not in source:
            raise UnsupportedError(f"{step.name}: source must be a FileAsset or StringAsset")
        with tempfile.TemporaryDirectory(prefix="engine-sftp-") as tmp:
            if source["__asset"] == "file":
                local = Path(source["path"])
                if _hash_bytes(local.read_bytes()) != source["sha256"]:
                    raise EngineError(f"{step.name}: {local} changed during the run")
            else:
                local = Path(tmp) / "text-asset"
                local.write_text(source["text"])
            parents: list[str] = []
            parent = os.path.dirname(remote_path)
            while parent not in ("", "/"):
                parents.insert(0, parent)
                parent = os.path.dirname(parent)
            batch = [f"-mkdir {_sftp_quote(p)}" for p in parents] + [f"put {_sftp_quote(str(local))} {_sftp_quote(remote_path)}"]
            batch_file = Path(tmp) / "batch"
            batch_file.write_text("\n".join(batch) + "\n")
            step.commands.append(f"sftp put {source.get('path', '<text asset>')} {remote_path}")
            with conn.options() as opts:
                argv = ["sftp", "-b", str(batch_file), *opts, "-P", str(conn.port), f"{conn.user}@{conn.host}"]
                proc = conn.run(argv, b"", self.engine.command_timeout)
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).decode(errors="replace")[-4000:]
            raise CommandError(
                f"{step.name}: copy to {remote_path} failed (sftp exit {proc.returncode}):\n{out}",
                command=step.commands[-1],
                exit_code=proc.returncode,
                stdout=proc.stdout.decode(errors="replace"),
                stderr=proc.stderr.decode(errors="replace"),
            )

    # -- the end of a run: deletions
    def finish(self) -> None:
        """Delete what was not registered (and replaced resources' old copies), dependents first."""
        with self.lock:
            self.closed = True
            if self.failure is not None:
                return
            doomed: list[dict[str, Any]] = [dict(r, urn=u) for u, r in self.state["resources"].items() if u not in self.registered]
            doomed += [dict(r) for r in self.state["pendingDeletes"]]
            for record in _dependents_first(doomed):
                urn = record["urn"]
                step = Step(urn, record["type"], record["name"], "delete", len(self.steps), dependencies=record.get("dependencies", []))
                pending = record in self.state["pendingDeletes"]
                step.detail = "old copy of a replaced resource" if pending else "no longer in the program"
                self.steps.append(step)
                if self.preview:
                    continue
                started = time.monotonic()
                try:
                    self._delete(step, record)
                except BaseException as err:
                    step.op, step.error = "failed", str(err)
                    self.failure = err
                    raise
                finally:
                    step.duration = time.monotonic() - started
                if pending:
                    self.state["pendingDeletes"].remove(record)
                else:
                    del self.state["resources"][urn]
                self._checkpoint()


def _sftp_quote(path: str) -> str:
    if any(c in path for c in '"\\\n'):
        raise UnsupportedError(f"path {path!r} cannot be quoted for sftp -b")
    return f'"{path}"'


def _dependents_first(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Order deletions so a resource goes before anything it depends on (or is parented to); newest first otherwise."""
    by_urn: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_urn.setdefault(r["urn"], []).append(r)
    remaining = sorted(records, key=lambda r: -int(r.get("seq", 0)))
    ordered: list[dict[str, Any]] = []
    while remaining:
        for r in remaining:
            # r may go now if no other remaining record depends on it
            if not any(r["urn"] in [*o.get("dependencies", []), o.get("parent")] for o in remaining if o is not r):
                ordered.append(r)
                remaining.remove(r)
                break
        else:  # a cycle cannot happen in real state; fall back to newest first
            ordered.extend(remaining)
            break
    return ordered


# --------------------------------------------------------------------------- the engine


def _with_project_defaults(config: Mapping[str, Any], secret_keys: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """The CLI's mergeConfig: unset declared keys get their Pulumi.yaml default as a PLAIN value.

    Only keys the stack itself sets can be secret (a default never is), so `secret_keys` naming a
    key the stack leaves unset does not hide what the real CLI hands the program.
    """
    qualified = {key if ":" in key else f"{PROJECT}:{key}" for key in config}
    kept = [key for key in secret_keys if (key if ":" in key else f"{PROJECT}:{key}") in qualified]
    return merge_project_defaults(config), kept


class Engine:
    """Runs the program against real hosts and keeps per-stack state in `state_dir/<stack>.json`.

    accept_env: variable names the target's sshd accepts (AcceptEnv); others make `environment`
    fail and PULUMI_COMMAND_STDOUT/STDERR be dropped with a warning, as with the provider.
    """

    _global_lock = threading.Lock()  # pulumi mocks are process-global: one run at a time

    def __init__(
        self, state_dir: Path, *, command_timeout: float = 900, accept_env: Sequence[str] = (), program: Path | None = None
    ) -> None:
        self.state_dir = Path(state_dir)
        self.program = program  # another Pulumi program instead of the repo's __main__.py (the engine's own tests)
        self.command_timeout = command_timeout
        self.accept_env = frozenset(accept_env)

    def state_file(self, stack: str) -> StateFile:
        return StateFile(self.state_dir / f"{stack}.json", stack)

    def state(self, stack: str = "test") -> dict[str, Any]:
        return self.state_file(stack).load()

    def up(
        self,
        config: Mapping[str, Any],
        *,
        secret_keys: Sequence[str] = (),
        stack: str = "test",
        check: bool = True,
    ) -> RunReport:
        return self._run(config, secret_keys=secret_keys, stack=stack, preview=False, check=check)

    def preview(self, config: Mapping[str, Any], *, secret_keys: Sequence[str] = (), stack: str = "test", check: bool = True) -> RunReport:
        return self._run(config, secret_keys=secret_keys, stack=stack, preview=True, check=check)

    def _run(self, config: Mapping[str, Any], *, secret_keys: Sequence[str], stack: str, preview: bool, check: bool) -> RunReport:
        with self._global_lock:
            run = _Run(self, stack, preview)
            started = time.monotonic()
            outputs: dict[str, Any] = {}
            error: BaseException | None = None
            try:
                with contextlib.ExitStack() as patches:
                    patches.enter_context(mock.patch.object(program_module, "RecordingMonitor", run.monitor_class()))
                    if self.program is not None:
                        patches.enter_context(mock.patch.object(program_module, "MAIN", self.program))
                    if self.program is None:  # the repo's program: its Pulumi.yaml defaults, merged as the CLI does
                        config, secret_keys = _with_project_defaults(config, secret_keys)
                        check_secret_declarations(stack, config, {k if ":" in k else f"{PROJECT}:{k}" for k in secret_keys})
                    result = run_program(config, secret_keys=tuple(secret_keys), stack=stack, preview=preview, mocks=run)
                outputs = result.outputs
            except BaseException as err:  # the program's own error (RunError) or the first failed resource
                if isinstance(err, KeyboardInterrupt):
                    raise
                error = run.failure or err
            if error is None:  # like the engine: deletions only after the program completed without error
                try:
                    run.finish()
                except BaseException as err:
                    error = err
            with run.lock:
                run.closed = True
                if error is None and run.failure is not None:
                    error = run.failure
            report = RunReport(
                stack=stack,
                preview=preview,
                steps=list(run.steps),
                outputs=outputs if error is None else {},
                error=error,
                warnings=list(run.warnings),
                dependency_violations=list(run.violations),
                duration=time.monotonic() - started,
            )
        if check and error is not None:
            raise RunFailedError(report) from error
        return report
