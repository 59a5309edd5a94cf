"""The real `pulumi up`: this repository's program, the Pulumi CLI and its plugins, on a private project.

    engine = RealEngine(tmp)                       # tmp/project (the program), tmp/state (file:// backend)
    report = engine.up(config, secret_keys=SECRET_KEYS)   # raises RunFailedError(report) unless check=False
    report.ops(), report.steps, report.commands, report.outputs, report.warnings, report.output
    engine.preview(config).text                    # `pulumi preview --diff` as a reviewer reads it

Everything runs as a user runs it: `scripts/pulumi-local STACK ...` (the README's one entry point) in
a project directory that holds copies of Pulumi.yaml, __main__.py and .env.example (so the stack file
`Pulumi.<stack>.yaml` and `.artifacts/` are private to the test) and links to the rest of the
checkout (components/, scripts/, tools/, .tools/, venv/). The CLI, the Python language host and
pulumi-resource-command come from .tools/bin (`make pulumi-tools`); nothing is downloaded
(PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION) and PULUMI_HOME is private.

Config is set the way the README tells operators: plain values with `config set-all --json`
(arrays and objects as structured values), each secret leaf with `config set --secret [--path]` and
its value on stdin, removed keys with `config rm`; only what changed since the last run is sent.

The report comes from the engine's own event log (`--event-log`, a flag the CLI shows with
PULUMI_DEBUG_COMMANDS=true), while stdout keeps the operator's view (`report.output`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from components.settings import NAMESPACE

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".tools" / "bin"
PLUGINS = ("pulumi", "pulumi-language-python", "pulumi-language-python-exec", "pulumi-resource-command", "pulumi-resource-pulumi-python")
PASSPHRASE = "real engine test passphrase (test only)"
PROGRAM_FILES = ("Pulumi.yaml", "__main__.py", ".env.example")  # copied: the project dir is the program's PROJECT_DIR
PROGRAM_DIRS = ("components", "scripts", "tools")  # linked: the program's read-only parts
LINKED = (*PROGRAM_DIRS, ".tools", "venv")  # linked: read-only parts of the checkout
# The project file of a tiny program (RealEngine(program=...)): this repository's runtime and venv, no config declared.
TINY_PROJECT = "name: cognivern\nruntime:\n  name: python\n  options:\n    toolchain: pip\n    virtualenv: venv\n"
# The engine's resource operations as the report names them: a replacement is one "replace" step for
# the new copy and a "delete" of the old one (logged later), the logical "replace" marker is dropped.
OPS = {"create-replacement": "replace", "delete-replaced": "delete", "replace": None}


def tools_bin() -> Path:
    """`.tools/bin` with every binary the real engine needs; a missing one fails the test (never skips)."""
    missing = [name for name in PLUGINS if not os.access(BIN / name, os.X_OK)]
    if missing:
        pytest.fail(f"{BIN} lacks {', '.join(missing)}: run `make pulumi-tools` (builds the CLI and the plugins)")
    return BIN


def engine_env(home: Path, state: Path) -> dict[str, str]:
    """The environment of every CLI call: private backend and PULUMI_HOME, no downloads, no colour."""
    return {
        "PATH": f"{tools_bin()}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": os.environ.get("HOME", str(home)),
        "PULUMI_HOME": str(home),
        "PULUMI_BACKEND_URL": f"file://{state}",
        "PULUMI_CONFIG_PASSPHRASE": PASSPHRASE,
        "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
        "PULUMI_SKIP_UPDATE_CHECK": "true",
        "PULUMI_SKIP_CONFIRMATIONS": "true",
        "PULUMI_DIY_BACKEND_NO_LEGACY_WARNING": "true",
        "PULUMI_DEBUG_COMMANDS": "true",  # shows --event-log; changes nothing else about a run
        "NO_COLOR": "1",
    }


@dataclass
class Step:
    """One resource operation of a run, in the order the engine began them.

    op: create, update, replace, delete, same, read, ... ; "failed" when the engine reported an error
    for it (`attempted` keeps what it tried). `commands`: what it ran on the host (a Command's text,
    `copy SRC -> DEST` for a CopyToRemote), empty for `same`/`delete` without a delete command.
    """

    urn: str
    type: str
    name: str
    op: str
    index: int
    attempted: str = ""
    commands: list[str] = field(default_factory=list)
    diffs: list[str] = field(default_factory=list)
    error: str | None = None
    done: bool = False
    seconds: float = 0.0  # from its start to its outputs, as the event log showed them (~50 ms resolution)
    started: float = 0.0  # seconds after the run began


class RunFailedError(Exception):
    """`up(check=True)` of a run that failed; `.report` says what ran and why it stopped."""

    def __init__(self, report: RunReport) -> None:
        super().__init__(f"pulumi {report.command} failed:\n{report.output}")
        self.report = report


@dataclass
class RunReport:
    command: str  # up, preview, refresh, destroy
    exit_code: int
    output: str  # what the operator's terminal showed (stdout and stderr, in that order)
    steps: list[Step]
    outputs: dict[str, Any]  # the stack's exports after a successful up ("[secret]" for secret ones)
    warnings: list[str]
    errors: list[str]  # error diagnostics: the program's (no resource) and each failed resource's
    summary_event: dict[str, Any]
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def text(self) -> str:
        return self.output

    @property
    def commands(self) -> list[str]:
        """Everything that ran on hosts, in the order the steps began."""
        return [c for s in self.steps for c in s.commands]

    def ops(self, *, include_same: bool = True) -> dict[str, str]:
        """Resource name -> operation (a replaced resource's later delete of its old copy is not its op)."""
        out: dict[str, str] = {}
        for s in self.steps:
            if s.op == "same" and not include_same:
                continue
            if s.op == "delete" and s.name in out:
                continue
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

    @property
    def failed(self) -> list[Step]:
        return [s for s in self.steps if s.op == "failed"]

    @property
    def program_error(self) -> str | None:
        """The error the program itself raised (bad config, a pre-flight check), if that is why it failed."""
        resource_errors = {s.error for s in self.failed}
        rest = [e for e in self.errors if e not in resource_errors and e != "update failed"]
        return "\n".join(rest) if rest and not self.ok else None

    def summary(self) -> str:
        lines = [f"pulumi {self.command}: exit {self.exit_code} ({self.seconds:.1f} s)"]
        lines += [f"  {s.index:3d} {s.op:8s} {s.name} {s.attempted}".rstrip() for s in self.steps]
        lines += [f"  error: {e}" for e in self.errors]
        return "\n".join(lines)


SECRET_SIG = ("4dabf18193072939515e22adb298388d", "1b47061264138c4ac30d75fd1eb44270")  # the state's secret marker


def is_secret(value: Any) -> bool:
    """A value the state stores encrypted (`{SIG_KEY: SECRET_SIG, "ciphertext": ...}`)."""
    return isinstance(value, dict) and value.get(SECRET_SIG[0]) == SECRET_SIG[1]


def mask_secrets(value: Any) -> Any:
    if is_secret(value):
        return "[secret]"
    if isinstance(value, dict):
        return {k: mask_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


def _message(diag: Mapping[str, Any]) -> str:
    return str(diag.get("message", "")).strip()


def _commands(op: str, new: Mapping[str, Any] | None) -> list[str]:
    """What an operation of a pulumi-command resource runs on the host (none for same, delete without delete)."""
    if new is None or op not in ("create", "update", "replace"):
        return []
    inputs = new.get("inputs", {})
    if new.get("type") == "command:remote:Command":
        text = inputs.get("update") if op == "update" and inputs.get("update") else inputs.get("create")
        return [text] if isinstance(text, str) else []
    if new.get("type") == "command:remote:CopyToRemote":
        source = inputs.get("source", {})
        path = source.get("path") if isinstance(source, dict) else None
        return [f"copy {path} -> {inputs.get('remotePath')}"]
    return []


def parse_events(lines: Iterable[tuple[float, str]]) -> tuple[list[Step], dict[str, Any], list[str], list[str], dict[str, Any]]:
    """The engine's event log, each line with the second it arrived -> (steps, stack outputs, warnings, errors, summary)."""
    steps: list[Step] = []
    by_urn: dict[str, Step] = {}
    outputs: dict[str, Any] = {}
    warnings: list[str] = []
    errors: list[str] = []
    summary: dict[str, Any] = {}
    started: dict[str, float] = {}
    for stamp, line in lines:
        if not line.strip():
            continue
        event = json.loads(line)
        if "resourcePreEvent" in event or "resOutputsEvent" in event:
            meta = event.get("resourcePreEvent", event.get("resOutputsEvent"))["metadata"]
            urn, raw_op = meta["urn"], meta["op"]
            res = meta.get("new") or meta.get("old") or {}
            if meta["type"] == "pulumi:pulumi:Stack":
                if "resOutputsEvent" in event and meta.get("new"):
                    outputs = dict(meta["new"].get("outputs") or {})
                continue
            if not res.get("custom") or meta["type"].startswith("pulumi:providers:"):
                continue  # components and default providers run nothing
            op = OPS.get(raw_op, raw_op)
            if op is None:
                continue
            key = f"{urn}#{op}"
            if "resourcePreEvent" in event:
                step = Step(urn, meta["type"], urn.rsplit("::", 1)[-1], op, len(steps), raw_op, _commands(op, meta.get("new")))
                step.diffs = list(meta.get("diffs") or [])
                step.started = stamp
                steps.append(step)
                by_urn[key] = by_urn[urn] = step
                started[key] = stamp
            elif key in by_urn:
                by_urn[key].done = True
                by_urn[key].seconds = stamp - started.get(key, stamp)
        elif "diagnosticEvent" in event:
            diag = event["diagnosticEvent"]
            severity = diag.get("severity")
            if severity == "warning":
                warnings.append(_message(diag))
            elif severity == "error":
                message = _message(diag)
                errors.append(message)
                failed = by_urn.get(diag.get("urn", ""))
                if failed is not None and not failed.done:
                    failed.op, failed.error = "failed", message
        elif "summaryEvent" in event:
            summary = event["summaryEvent"]
    return steps, outputs, warnings, errors, summary


class EventTail:
    """Reads the event log while the CLI writes it, stamping each line with when it arrived.

    The events' own timestamps are whole seconds; step durations and "how long until" figures need
    better, so a thread polls the file every 50 ms for the whole run.
    """

    def __init__(self, path: Path, started: float) -> None:
        self.path, self.started = path, started
        self.lines: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._pending = ""
        self._offset = 0

    def _read(self) -> None:
        try:
            with self.path.open() as f:
                f.seek(self._offset)
                chunk = f.read()
                self._offset = f.tell()
        except FileNotFoundError:
            return
        now = time.monotonic() - self.started
        *complete, self._pending = (self._pending + chunk).split("\n")
        self.lines.extend((now, line) for line in complete)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._read()

    def __enter__(self) -> EventTail:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._read()
        if self._pending.strip():
            self.lines.append((time.monotonic() - self.started, self._pending))


class Running:
    """A CLI run under way: `.process` (pulumi-local execs the CLI, so its pid is the CLI's), `.events()`."""

    def __init__(self, command: str, argv: list[str], cwd: Path, env: Mapping[str, str], log: Path, timeout: float) -> None:
        self.command, self.timeout = command, timeout
        self.output_file = log.with_suffix(".out")
        self.started = time.monotonic()
        self.tail = EventTail(log, self.started).__enter__()
        with self.output_file.open("w") as out:
            self.process = subprocess.Popen(argv, cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT, text=True)

    def events(self) -> list[dict[str, Any]]:
        """The engine events logged so far."""
        return [json.loads(line) for _, line in list(self.tail.lines) if line.strip()]

    def began(self, name: str) -> bool:
        """True once the engine has started an operation on the resource named `name`."""
        return any("resourcePreEvent" in e and e["resourcePreEvent"]["metadata"]["urn"].endswith(f"::{name}") for e in self.events())

    def wait(self, *, check: bool = True) -> RunReport:
        try:
            code = self.process.wait(timeout=self.timeout)
        finally:
            self.tail.__exit__(None, None, None)
        seconds = time.monotonic() - self.started
        output = self.output_file.read_text()
        steps, outputs, warnings, errors, summary = parse_events(self.tail.lines)
        if code != 0 and not errors:
            errors = [output.strip()]  # the CLI refused before the engine ran (a lock, bad flags)
        report = RunReport(self.command, code, output, steps, outputs, warnings, errors, summary, seconds)
        if check and not report.ok:
            raise RunFailedError(report)
        return report


class RealEngine:
    """One stack of this repository's program on a private project directory and `file://` backend."""

    def __init__(self, workdir: Path, *, stack: str = "test", timeout: float = 900, program: str | None = None, tree: Path = REPO) -> None:
        """`program`: the text of a tiny `__main__.py` to run instead of this repository's program
        (a project of its own, named like ours so its config keys are `cognivern:*`, none declared).
        `tree`: a tree holding the program (another commit's, for an upgrade); the CLI, plugins and
        venv always come from this checkout."""
        self.workdir = Path(workdir)
        self.project = self.workdir / "project"
        self.state_dir = self.workdir / "state"
        self.stack = stack
        self.timeout = timeout
        self.env = engine_env(self.workdir / "pulumi-home", self.state_dir)
        self.project.mkdir(parents=True)
        for name in (".tools", "venv"):
            (self.project / name).symlink_to(REPO / name)
        if program is None:
            self.use_program(tree)
        else:
            (self.project / "Pulumi.yaml").write_text(TINY_PROJECT)
            (self.project / "__main__.py").write_text(program)
            for name in PROGRAM_DIRS:
                (self.project / name).symlink_to(REPO / name)
        self._applied: dict[str, tuple[str, bool]] = {}  # key -> (raw value, secret) as last set
        self._runs = 0
        self.cli("stack-init")

    def use_program(self, program: Path) -> None:
        """Run `program`'s __main__.py and components from now on, on the same stack and state (an upgrade)."""
        for name in PROGRAM_FILES:
            shutil.copy(program / name, self.project / name)
        for name in PROGRAM_DIRS:
            link = self.project / name
            if link.is_symlink():
                link.unlink()
            elif link.exists():
                shutil.rmtree(link)
            link.symlink_to(program / name)

    # ------------------------------------------------------------------ the CLI
    def cli(
        self, *args: str, stdin: str | None = None, check: bool = True, env: Mapping[str, str] = {}
    ) -> subprocess.CompletedProcess[str]:
        """`scripts/pulumi-local STACK ARGS` in the project directory, as the README runs every pulumi command."""
        done = subprocess.run(
            ["scripts/pulumi-local", self.stack, *args],
            cwd=self.project,
            env={**self.env, **env},
            input=stdin,
            capture_output=True,
            text=True,
            timeout=self.timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"pulumi {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def edit(self, path: str, text: str) -> None:
        """Give this project its own `path` (e.g. an edited release tool); the checkout is untouched.

        The linked directory that holds it becomes a copy first, so later runs see the edit too.
        """
        top = self.project / path.split("/", 1)[0]
        if top.is_symlink():
            target = top.resolve()
            top.unlink()
            shutil.copytree(target, top, symlinks=True)
        (self.project / path).write_text(text)

    # ------------------------------------------------------------------ config
    def configure(self, config: Mapping[str, str], secret_keys: Sequence[str] = ()) -> None:
        """Bring the stack's config to `config` (raw strings, JSON for arrays/objects), sending only changes."""
        secrets = {k.split(":", 1)[-1] for k in secret_keys}
        wanted = {(k if ":" in k else f"{NAMESPACE}:{k}"): (v, k.split(":", 1)[-1] in secrets) for k, v in config.items()}
        removed = [k for k in self._applied if k not in wanted]
        if removed:
            self.cli("config", "rm-all", *removed)
        plain: dict[str, Any] = {}
        for key, (value, secret) in wanted.items():
            if self._applied.get(key) == (value, secret):
                continue
            structured = value[:1] in ("[", "{")
            if secret and structured:
                self._set_secret_leaves(key, json.loads(value))
            elif secret:
                self.cli("config", "set", "--secret", key, stdin=value)
            else:
                plain[key] = {"value": value, "secret": False, **({"objectValue": json.loads(value)} if structured else {})}
        if plain:
            self.cli("config", "set-all", "--json", json.dumps(plain))
        self._applied = dict(wanted)

    def _set_secret_leaves(self, key: str, value: Mapping[str, Any]) -> None:
        """A secret object (secretEnv) leaf by leaf, as the README sets it: `--secret --path KEY.NAME`, value on stdin."""
        old_value, _ = self._applied.get(key, ("{}", True))
        old = json.loads(old_value) if old_value[:1] == "{" else {}
        for name in old.keys() - value.keys():
            self.cli("config", "rm", "--path", f"{key}.{name}")
        for name, leaf in value.items():
            if old.get(name) != leaf or key not in self._applied:
                self.cli("config", "set", "--secret", "--path", f"{key}.{name}", stdin=str(leaf))

    def stack_file(self) -> str:
        path = self.project / f"Pulumi.{self.stack}.yaml"
        return path.read_text() if path.exists() else ""

    # ------------------------------------------------------------------ runs
    def run(self, command: str, *args: str, check: bool = True) -> RunReport:
        """`pulumi COMMAND ARGS --event-log F` and its report; `check`: raise RunFailedError when it fails."""
        return self.start(command, *args).wait(check=check)

    def start(self, command: str, *args: str) -> Running:
        """The same run, not waited for: a test can watch its events and kill it."""
        self._runs += 1
        log = self.workdir / f"events-{self._runs:03d}-{command}.jsonl"
        argv = ["scripts/pulumi-local", self.stack, command, *args, "--non-interactive", "--event-log", str(log)]
        return Running(command, argv, self.project, self.env, log, self.timeout)

    def up(
        self, config: Mapping[str, str] | None = None, *, secret_keys: Sequence[str] = (), check: bool = True, preview: bool = False
    ) -> RunReport:
        """`pulumi up --yes` (with `--skip-preview` unless `preview`), after setting `config` if given."""
        if config is not None:
            self.configure(config, secret_keys)
        return self.run("up", "--yes", *([] if preview else ["--skip-preview"]), check=check)

    def preview(self, config: Mapping[str, str] | None = None, *, secret_keys: Sequence[str] = (), check: bool = True) -> RunReport:
        """`pulumi preview --diff`: nothing runs; `.text` is what a reviewer reads."""
        if config is not None:
            self.configure(config, secret_keys)
        return self.run("preview", "--diff", check=check)

    def refresh(self, *, check: bool = True) -> RunReport:
        return self.run("refresh", "--yes", "--skip-preview", check=check)

    def destroy(self, *, check: bool = True) -> RunReport:
        return self.run("destroy", "--yes", "--skip-preview", check=check)

    # ------------------------------------------------------------------ state
    def export(self) -> dict[str, Any]:
        """`pulumi stack export` (secrets stay encrypted, as in the state)."""
        exported: dict[str, Any] = json.loads(self.cli("stack", "export").stdout)
        return exported

    def resources(self, *, pending_deletes: bool = False, masked: bool = False) -> dict[str, dict[str, Any]]:
        """Resource name -> its state entry (inputs, outputs, ...), custom resources only.

        A replacement whose run failed keeps the old copy in state marked `delete` (deleted at the
        end of the next successful run): those entries only with `pending_deletes=True`. `masked`:
        every secret value as "[secret]" (each checkpoint encrypts it anew, with a fresh nonce).
        """
        found = self.export()["deployment"].get("resources") or []
        custom = [r for r in found if r.get("custom") and not r["type"].startswith("pulumi:providers:")]
        entries = {r["urn"].rsplit("::", 1)[-1]: r for r in custom if bool(r.get("delete")) == pending_deletes}
        return mask_secrets(entries) if masked else entries

    def raw_state(self) -> str:
        """Every file of the file:// backend, concatenated (checkpoints, backups, history)."""
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.state_dir.rglob("*")) if p.is_file())
