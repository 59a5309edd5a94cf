"""The engine stand-in's own semantics, against a bare private sshd and a tiny Pulumi program.

Every command appends a line to a log file on the "host" (this machine, over real SSH), so the
log is the order in which the engine ran things. See tests/engine/ENGINE.md.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.engine import CommandError, Engine, EngineError, RunFailedError, UnsupportedError
from tests.engine.engine import Connection, go_client_kex
from tests.support.sshd import LocalSshd

PROGRAM = """
import json
import pulumi
from pulumi_command import remote

cfg = pulumi.Config("cognivern")
conn = remote.ConnectionArgs(
    host="127.0.0.1",
    port=int(cfg.require("port")),
    user="root",
    private_key=cfg.require_secret("key"),
    host_key=cfg.require("hostKey"),
)
made = {}
for r in json.loads(cfg.require("spec")):
    opts = pulumi.ResourceOptions(depends_on=[made[d] for d in r.get("deps", [])], delete_before_replace=r.get("dbr"))
    if "path" in r:
        made[r["name"]] = remote.CopyToRemote(
            r["name"], connection=conn, source=pulumi.StringAsset(r["text"]), remote_path=r["path"], triggers=r.get("triggers"), opts=opts
        )
        continue
    made[r["name"]] = remote.Command(
        r["name"],
        connection=conn,
        create=r.get("create"),
        update=r.get("update"),
        delete=r.get("delete"),
        stdin=r.get("stdin"),
        triggers=r.get("triggers"),
        environment=r.get("env"),
        opts=opts,
    )
    pulumi.export(r["name"], made[r["name"]].stdout)
"""


@pytest.fixture(scope="module")
def sshd() -> Iterator[LocalSshd]:
    with LocalSshd() as daemon:
        yield daemon


class Target:
    def __init__(self, sshd: LocalSshd, tmp: Path) -> None:
        self.sshd = sshd
        self.tmp = tmp
        self.log = tmp / "host" / "log"
        self.log.parent.mkdir()
        self.log.touch()
        program = tmp / "program.py"
        program.write_text(PROGRAM)
        self.engine = Engine(tmp / "state", program=program)

    def cmd(self, name: str, word: str | None = None, **extra: Any) -> dict[str, Any]:
        """A command that logs `create <word>`, `update <word>`, `delete <word>`."""
        word = word or name
        return {
            "name": name,
            "create": f"echo 'create {word}' >> {self.log}; echo out-{word}",
            "delete": f'echo "delete {word} [${{PULUMI_COMMAND_STDOUT:-no-previous-stdout}}]" >> {self.log}',
            **extra,
        }

    def config(self, spec: list[dict[str, Any]]) -> dict[str, str]:
        return {"port": str(self.sshd.port), "hostKey": self.sshd.host_key, "key": self.sshd.private_key, "spec": json.dumps(spec)}

    def up(self, spec: list[dict[str, Any]], **kw: Any) -> Any:
        return self.engine.up(self.config(spec), secret_keys=["key"], **kw)

    def preview(self, spec: list[dict[str, Any]]) -> Any:
        return self.engine.preview(self.config(spec), secret_keys=["key"])

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def state_names(self) -> set[str]:
        return {r["name"] for r in self.engine.state()["resources"].values()}


@pytest.fixture
def target(sshd: LocalSshd, tmp_path: Path) -> Target:
    return Target(sshd, tmp_path)


def test_create_then_unchanged_runs_nothing(target: Target) -> None:
    spec = [target.cmd("a"), target.cmd("b", deps=["a"])]
    first = target.up(spec)
    assert first.ops() == {"a": "create", "b": "create"}
    assert target.lines() == ["create a", "create b"]
    assert first.outputs == {"a": "out-a", "b": "out-b"}  # trailing newline trimmed, like the provider
    assert first.dependency_violations == []

    assert set(target.preview(spec).ops().values()) == {"same"}
    second = target.up(spec)
    assert set(second.ops().values()) == {"same"}
    assert second.commands == []
    assert target.lines() == ["create a", "create b"]
    assert second.outputs == {"a": "out-a", "b": "out-b"}  # stored outputs returned for unchanged resources


def test_changed_input_updates_in_place_with_update_or_create(target: Target) -> None:
    target.up([target.cmd("a"), target.cmd("b", update=f"echo 'update b' >> {target.log}")])
    target.up([target.cmd("a", stdin="new stdin"), target.cmd("b", stdin="x", update=f"echo 'update b' >> {target.log}")])
    report = target.up([target.cmd("a", "a2"), target.cmd("b", stdin="x", update=f"echo 'update b' >> {target.log}")])
    assert report.ops() == {"a": "update", "b": "same"}
    # a: no `update` -> `create` again (stdin change, then create-string change); b: its `update`
    assert target.lines() == ["create a", "create b", "create a", "update b", "create a2"]
    assert not [line for line in target.lines() if line.startswith("delete")]


def test_changed_triggers_replace_create_before_delete_with_the_old_delete_at_the_end(target: Target) -> None:
    target.up([target.cmd("a", triggers=["v1"]), target.cmd("b", deps=["a"])])
    report = target.up([target.cmd("a", "a-v2", triggers=["v2"]), target.cmd("b", deps=["a"]), target.cmd("c")])
    assert sorted((s.name, s.op) for s in report.steps[:3]) == [("a", "replace"), ("b", "same"), ("c", "create")]
    assert (report.steps[-1].name, report.steps[-1].op) == ("a", "delete")
    # the new a was created; the old a's delete ran after everything else had succeeded
    assert sorted(target.lines()[2:4]) == ["create a-v2", "create c"]
    assert target.lines()[4:] == ["delete a [no-previous-stdout]"]
    # the provider sends PULUMI_COMMAND_STDOUT with SSH Setenv; a default sshd refuses it: warning, no variable
    assert any("PULUMI_COMMAND_STDOUT" in w and "AcceptEnv" in w for w in report.warnings)
    assert target.engine.state()["pendingDeletes"] == []


def test_delete_before_replace_deletes_first(target: Target) -> None:
    target.up([target.cmd("a", triggers=[1], dbr=True)])
    report = target.up([target.cmd("a", "a-v2", triggers=[2], dbr=True)])
    assert report.ops() == {"a": "replace"}
    assert target.lines() == ["create a", "delete a [no-previous-stdout]", "create a-v2"]


def test_removed_resources_are_deleted_at_the_end_dependents_first(target: Target) -> None:
    target.up([target.cmd("a"), target.cmd("b", deps=["a"]), target.cmd("c", deps=["b"]), target.cmd("keep")])
    report = target.up([target.cmd("keep"), target.cmd("new")])
    assert [(s.name, s.op) for s in report.steps[2:]] == [("c", "delete"), ("b", "delete"), ("a", "delete")]
    assert target.lines()[4:] == ["create new"] + [f"delete {x} [no-previous-stdout]" for x in "cba"]
    assert target.state_names() == {"keep", "new"}


def test_a_failed_command_stops_the_run_and_state_keeps_what_succeeded(target: Target) -> None:
    target.up([target.cmd("old")])
    spec = [
        target.cmd("a"),
        {"name": "b", "create": f"echo 'create b' >> {target.log}; echo broken >&2; exit 3", "deps": ["a"]},
        target.cmd("c", deps=["b"]),
    ]
    with pytest.raises(RunFailedError) as failed:
        target.up(spec)
    report = failed.value.report
    assert isinstance(report.error, CommandError) and report.error.exit_code == 3
    assert "broken" in str(report.error) and "Process exited with status 3" in str(report.error)
    ops = report.ops()
    assert (ops["a"], ops["b"], ops.get("c", "skipped")) == ("create", "failed", "skipped")
    assert "old" not in ops  # no deletions after a failure
    # nothing after the failure ran, and the removed resource was not deleted (no deletes after a failure)
    assert target.lines() == ["create old", "create a", "create b"]
    assert target.state_names() == {"old", "a"}

    fixed = [target.cmd("a"), target.cmd("b", deps=["a"]), target.cmd("c", deps=["b"])]
    again = target.up(fixed)
    assert again.ops() == {"a": "same", "b": "create", "c": "create", "old": "delete"}
    assert target.lines()[3:] == ["create b", "create c", "delete old [no-previous-stdout]"]


def test_dependencies_complete_before_dependents_run(target: Target) -> None:
    spec = (
        [target.cmd("root")]
        + [target.cmd(f"leaf{i}", deps=["root"]) for i in range(6)]
        + [target.cmd("join", deps=[f"leaf{i}" for i in range(6)])]
    )
    report = target.up(spec)
    assert report.dependency_violations == []
    order = {s.name: s.index for s in report.steps}
    for step in report.steps:
        for dep in step.dependencies:
            assert order[dep.rsplit("::", 1)[-1]] < step.index, (step.name, dep)
    assert target.lines()[0] == "create root" and target.lines()[-1] == "create join"


def test_copy_to_remote_copies_on_hash_or_path_change_and_never_deletes(target: Target) -> None:
    dest = target.tmp / "host" / "deep" / "er" / "file.txt"
    copy = {"name": "f", "path": str(dest), "text": "one\n"}
    assert target.up([copy]).ops() == {"f": "create"}
    assert dest.read_text() == "one\n"  # parent directories created
    dest.write_text("changed on the host\n")
    assert target.up([copy]).commands == []  # same asset: nothing copied
    assert dest.read_text() == "changed on the host\n"
    report = target.up([{**copy, "text": "two\n"}])
    assert report.ops() == {"f": "update"} and dest.read_text() == "two\n"
    report = target.up([{**copy, "text": "two\n", "triggers": ["r2"]}])
    assert report.ops() == {"f": "replace"}
    report = target.up([])
    assert report.ops() == {"f": "delete"} and report.commands == []
    assert dest.read_text() == "two\n"  # CopyToRemote has no delete


def test_environment_fails_like_setenv_against_a_default_sshd(target: Target) -> None:
    with pytest.raises(RunFailedError) as failed:
        target.up([target.cmd("a", env={"FOO": "bar"})])
    assert isinstance(failed.value.report.error, EngineError)
    assert "could not set environment variable" in str(failed.value.report.error)
    assert target.lines() == []


def test_hcloud_resources_are_refused_before_anything_runs(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "state")  # the real program, Hetzner stack
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ8b0pTBp5e8hGQHDgNnLrHHOHxg0VHzUXoTWlBXDk8S deploy"
    report = engine.up({"release": "v1", "sshPublicKey": key}, check=False)
    assert isinstance(report.error, UnsupportedError) and "hcloud" in str(report.error)
    assert report.commands == []
    assert engine.state()["resources"] == {}


def test_connections_negotiate_the_key_exchange_the_go_client_would(sshd: LocalSshd) -> None:
    """pulumi-command's Go client offers no sntrup761x25519 (OpenSSH's first choice): against this
    OpenSSH server it gets curve25519-sha256, and so must the stand-in's ssh."""
    conn = Connection(
        host="127.0.0.1",
        port=sshd.port,
        user=sshd.user,
        private_key=sshd.private_key,
        host_key=sshd.host_key,
        per_dial_timeout=10,
        dial_error_limit=1,
    )
    with conn.options() as opts:
        proc = subprocess.run(
            ["ssh", *opts, "-v", "-p", str(sshd.port), f"{sshd.user}@127.0.0.1", "true"], capture_output=True, text=True, timeout=30
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kex: algorithm: curve25519-sha256\n" in proc.stderr
    assert go_client_kex().split(",")[0] in {"mlkem768x25519-sha256", "curve25519-sha256"}
