"""A `pulumi up` killed (SIGKILL) in the middle of its activate step, and the runbook's recovery.

The CLI is killed once the new release is live and baking (nginx already serves it), the way a CI
runner or an out-of-memory kill ends it: no signal handler runs. What the real engine leaves
behind (pulumi/pulumi v3.274.1): the DIY backend's stack lock (`backend/diy`: only `pulumi cancel`
removes it, and it removes every lock of the stack), a pending `creating` operation for the step it
was waiting on (`backend/snapshot.go` keeps pending creates in every later checkpoint until a
refresh with `--clear-pending-creates` or an interactive refresh; each `up` warns,
`deployment_executor.go` printPendingOperationsWarning), and its plugins running on as orphans
(the language host checks its engine every 5 minutes, `rpcutil.Healthcheck`). The server side
goes on: the activation is detached from the SSH session. docs/OPERATIONS.md's recovery block is
run as written (with this stack's name), under 8 clients through nginx, and must converge with
no failed request.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from components.settings import SECRET_KEYS
from tests.support.helpers import wait_until
from tests.support.load import Load
from tests.support.stack import TargetStack, readable
from tests.support.target_host import TargetHost

REPO = Path(__file__).resolve().parents[1]
V1, V2 = "kill-v1", "kill-v2"
ACTIVATE = "cognivern-test-release-activate"


def runbook_recovery(stack_name: str) -> list[list[str]]:
    """The command lines of OPERATIONS.md's recovery block, for `stack_name` instead of prod."""
    text = (REPO / "docs" / "OPERATIONS.md").read_text()
    block = re.search(r"<!-- recovery: .*? -->\n```bash\n(.*?)```", text, re.S)
    assert block is not None, "docs/OPERATIONS.md has no recovery block"
    lines = [line.split() for line in block.group(1).splitlines() if line.strip()]
    assert all(words[:2] == ["scripts/pulumi-local", "prod"] for words in lines), lines
    return [[words[0], stack_name, *words[2:]] for words in lines]


def child_pids(pid: int) -> list[int]:
    done = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in done.stdout.split()]


def pending_operations(stack: TargetStack) -> list[dict[str, object]]:
    found: list[dict[str, object]] = stack.engine.export()["deployment"].get("pending_operations") or []
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TargetStack]:
    with TargetHost() as host:
        live = TargetStack(host, tmp_path_factory.mktemp("interrupted"), bakeSeconds=6)
        live.up(release=V1, artifact=live.artifact(V1))
        yield live


def test_a_killed_up_is_recovered_by_the_runbook_without_a_failed_request(stack: TargetStack) -> None:
    engine = stack.engine
    artifact = stack.artifact(V2)
    orphans: list[int] = []
    marks: dict[str, float] = {}
    with Load([stack.host.nginx.url("/release"), stack.host.nginx.url("/health")], clients=8) as load:
        engine.configure(stack.config(release=V2, artifact=artifact), SECRET_KEYS)
        run = engine.start("up", "--yes", "--skip-preview")
        try:
            since = time.monotonic()
            # switched and baking: the activate step began and nginx answers from the new release
            wait_until(lambda: run.began(ACTIVATE) and load.first(V2, since) is not None, timeout=90)
            orphans = child_pids(run.process.pid)
            marks["killed"] = time.monotonic() - since
            os.kill(run.process.pid, signal.SIGKILL)
            killed = run.wait(check=False)
            assert killed.exit_code == -signal.SIGKILL and killed.step("release-activate").done is False

            # what the engine left behind: the next `up` refuses on the lock, naming the dead pid
            refused = stack.up(check=False)
            assert not refused.ok and refused.steps == []
            assert "the stack is currently locked by 1 lock(s)" in refused.output
            assert f"(pid {run.process.pid})" in refused.output, refused.output
            (pending,) = pending_operations(stack)
            assert pending["type"] == "creating" and str(pending["resource"]["urn"]).endswith(f"::{ACTIVATE}")  # type: ignore[index]

            # the runbook, as written
            outputs = []
            for argv in runbook_recovery(engine.stack):
                done = subprocess.run(argv, cwd=engine.project, env=engine.env, capture_output=True, text=True, timeout=600, check=False)
                assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stdout}\n{done.stderr}"
                outputs.append(done.stdout + done.stderr)
                marks[argv[2]] = time.monotonic() - since
        finally:
            for pid in orphans:  # the killed CLI's plugins (each its own process group) would linger up to 5 minutes
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        final_up = outputs[-1]
        assert "Traceback" not in final_up and "pending operations" not in final_up, final_up
        assert "already current and healthy; nothing to do" in final_up, final_up  # no reload of a healthy release
        time.sleep(0.5)
    failed = [(round(t - since, 2), got) for t, got in load.results if got.startswith(("HTTP", "error"))]
    runs = sorted((stack.host.root / ".deploy" / "runs").glob("*.log"))
    assert failed == [], f"{marks}\n{failed[:5]} ... {failed[-5:]}\n" + "\n".join(p.read_text() for p in runs[-2:]) + outputs[-1]
    assert pending_operations(stack) == []
    assert stack.serving()["release"] == V2 and stack.current() == V2
    settled = readable(engine.up())
    assert settled.commands == [] and set(settled.ops().values()) == {"same"}, settled.summary()
    assert not [w for w in settled.warnings if "pending operations" in w]
