"""What the real engine and pulumi-command do that the program and the scenarios rely on.

A tiny program (config `spec`: a list of remote commands and copies) runs through the real
`pulumi up` (tests/support/real_engine.py: the CLI, the Python language host and
pulumi-resource-command from .tools/bin) against a bare private sshd. Every command appends a line
to a log file on the "host" (this machine, over real SSH), so the log is what ran, in the order it
ran. tests/REAL-ENGINE.md lists these behaviours with their upstream sources, and where the
stand-in these tests once ran on (tests/engine, removed) got them wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.real_engine import RealEngine, RunReport
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
    opts = pulumi.ResourceOptions(depends_on=[made[d] for d in r.get("deps", [])])
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
        self.engine = RealEngine(tmp / "engine", program=PROGRAM)

    def cmd(self, name: str, word: str | None = None, **extra: Any) -> dict[str, Any]:
        """A command that logs `create <word>` and `delete <word> [<PULUMI_COMMAND_STDOUT>]`."""
        word = word or name
        return {
            "name": name,
            "create": f"echo 'create {word}' >> {self.log}; echo out-{word}",
            "delete": f'echo "delete {word} [${{PULUMI_COMMAND_STDOUT:-no-previous-stdout}}]" >> {self.log}',
            **extra,
        }

    def timed(self, name: str, **extra: Any) -> dict[str, Any]:
        """A command that logs its start and end and takes a second in between."""
        stamp = f"$(date +%s.%N) >> {self.log}"
        return {"name": name, "create": f"echo start {name} {stamp}; sleep 1; echo end {name} {stamp}", **extra}

    def up(self, spec: list[dict[str, Any]]) -> RunReport:
        config = {"port": str(self.sshd.port), "hostKey": self.sshd.host_key, "key": self.sshd.private_key, "spec": json.dumps(spec)}
        return self.engine.up(config, secret_keys=["key"], check=False)

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def new_lines(self, before: int) -> list[str]:
        return self.lines()[before:]


@pytest.fixture
def target(sshd: LocalSshd, tmp_path: Path) -> Target:
    return Target(sshd, tmp_path)


def test_unchanged_inputs_run_nothing_and_a_changed_input_runs_create_again_or_update(target: Target) -> None:
    dest = target.tmp / "host" / "deep" / "er" / "file.txt"
    copy = {"name": "f", "path": str(dest), "text": "one\n"}
    update_b = f"echo 'update b' >> {target.log}"
    spec = [target.cmd("a"), target.cmd("b", update=update_b), copy]
    first = target.up(spec)
    assert first.ok and first.ops() == {"a": "create", "b": "create", "f": "create"}, first.summary()
    assert sorted(target.lines()) == ["create a", "create b"]
    assert first.outputs == {"a": "out-a", "b": "out-b"}  # one trailing newline trimmed, like the SDK docs say
    assert dest.read_text() == "one\n"  # parent directories created

    dest.write_text("changed on the host\n")
    same = target.up(spec)
    assert same.ok and set(same.ops().values()) == {"same"} and same.commands == [], same.summary()
    assert len(target.lines()) == 2 and dest.read_text() == "changed on the host\n"  # nothing ran, nothing copied
    assert same.outputs == first.outputs  # the stored outputs are handed back

    changed = target.up([target.cmd("a", stdin="new stdin"), target.cmd("b", stdin="x", update=update_b), {**copy, "text": "two\n"}])
    assert changed.ok and changed.ops() == {"a": "update", "b": "update", "f": "update"}, changed.summary()
    # a has no `update`: its `create` runs again; b runs its `update`; f is copied again (its asset changed)
    assert sorted(target.new_lines(2)) == ["create a", "update b"]
    assert dest.read_text() == "two\n"
    assert changed.outputs == {"a": "out-a", "b": ""}  # an update's own stdout replaces the stored one


def test_changed_triggers_replace_create_first_and_delete_the_old_copy_at_the_end(target: Target) -> None:
    removed = [target.cmd("p"), target.cmd("q", deps=["p"])]
    target.up([target.cmd("a", triggers=["v1"]), target.cmd("b", deps=["a"]), *removed])
    report = target.up([target.cmd("a", "a-v2", triggers=["v2"]), target.cmd("b", deps=["a"]), target.cmd("c")])
    assert report.ok, report.summary()
    assert report.ops() == {"a": "replace", "b": "same", "c": "create", "q": "delete", "p": "delete"}
    assert report.step("a", "replace").attempted == "create-replacement"
    assert [s.attempted for s in report.steps[-3:]].count("delete-replaced") == 1
    lines = target.new_lines(4)
    # the new copy and every other change first; then the deletes: the old copy of `a` and the
    # removed resources (dependents before what they depend on, the rest side by side)
    assert sorted(lines[:2]) == ["create a-v2", "create c"]
    assert sorted(lines[2:]) == [f"delete {x} [no-previous-stdout]" for x in "apq"]
    assert lines.index("delete q [no-previous-stdout]") < lines.index("delete p [no-previous-stdout]")
    # the provider sends PULUMI_COMMAND_STDOUT with SSH Setenv; a default sshd refuses it: a warning, no variable
    assert any("Unable to set 'PULUMI_COMMAND_STDOUT'" in w and "AcceptEnv" in w for w in report.warnings)
    assert target.engine.resources(pending_deletes=True) == {}


def test_independent_steps_run_side_by_side_and_dependents_wait_for_all_they_depend_on(target: Target) -> None:
    leaves = [target.timed(f"leaf{i}", deps=["root"]) for i in range(4)]
    report = target.up([target.cmd("root"), *leaves, target.cmd("join", deps=[leaf["name"] for leaf in leaves])])
    assert report.ok, report.summary()
    lines = target.lines()
    assert lines[0] == "create root" and lines[-1] == "create join"
    starts = [float(line.split()[2]) for line in lines if line.startswith("start")]
    ends = [float(line.split()[2]) for line in lines if line.startswith("end")]
    assert len(starts) == len(ends) == 4
    assert max(starts) < min(ends), "all four one-second leaves were running at once"


def test_a_failed_step_stops_its_dependents_while_other_steps_finish_and_the_next_run_converges(target: Target) -> None:
    target.up([target.cmd("x", triggers=["v1"]), target.cmd("old")])
    failing = {"name": "bad", "create": f"echo 'create bad' >> {target.log}; echo broken >&2; exit 3"}
    slow = {"name": "slow", "create": f"sleep 1; echo 'create slow' >> {target.log}"}
    spec = [target.cmd("x", "x2", triggers=["v2"]), {**failing, "deps": ["x"]}, target.cmd("after", deps=["bad"]), slow]
    failed = target.up(spec)
    assert not failed.ok
    assert failed.ops() == {"x": "replace", "bad": "failed", "slow": "create"}, failed.summary()
    assert "Process exited with status 3" in failed.errors[0] and "broken" in failed.errors[0]
    # the replacement and the independent slow step ran; the failed step's dependent did not; no deletes
    assert sorted(target.new_lines(2)) == ["create bad", "create slow", "create x2"]
    # state keeps what succeeded; x's old copy waits as a pending delete, `old` (no longer declared) stays
    assert set(target.engine.resources()) == {"x", "slow", "old"}
    assert set(target.engine.resources(pending_deletes=True)) == {"x"}

    fixed = target.up([target.cmd("x", "x2", triggers=["v2"]), target.cmd("bad", deps=["x"]), target.cmd("after", deps=["bad"]), slow])
    assert fixed.ok, fixed.summary()
    assert fixed.ops() == {"x": "same", "bad": "create", "after": "create", "slow": "same", "old": "delete"}
    lines = target.new_lines(5)
    assert lines[:2] == ["create bad", "create after"]
    assert sorted(lines[2:]) == ["delete old [no-previous-stdout]", "delete x [no-previous-stdout]"]
    assert target.engine.resources(pending_deletes=True) == {}
