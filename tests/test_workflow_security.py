"""Pull requests never meet deploy credentials outside an approval-gated environment.

The workflows are parsed, not run: for every job a pull request can trigger, the secrets it can
read are collected (job and workflow `env`, step `env`/`with`/`run`, `secrets: inherit`), and any
secret other than the read-only GITHUB_TOKEN is a deploy credential that only a job in an
approval-gated environment may touch. The old preview.yml (a copy in tests/fixtures/workflows)
is the negative control: it handed the passphrase and the state's write keys to every PR.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
OLD_PREVIEW = REPO / "tests" / "fixtures" / "workflows" / "preview-before-issue-12.yml"
PULUMI_VERSION = REPO / "tools" / "pulumi" / "VERSION"

# Environments with required reviewers (README, "GitHub settings"). `production` is also limited
# to the main branch, so a pull request's job can never use it.
GATED = frozenset({"preview", "production"})
MAIN_ONLY = frozenset({"production"})
PR_TRIGGERS = ("pull_request", "pull_request_target")
SECRET_REF = re.compile(r"\$\{\{\s*secrets\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
PR_HEAD_REF = re.compile(r"github\.event\.pull_request\.head\.(sha|ref)|github\.head_ref|refs/pull/")

# Each action's pinned commit is the commit of the tag in the comment, read from a mirror of the
# action's repository (`git rev-parse <tag>^{commit}`, 2026-11-30).
PINS = {
    ("actions/checkout", "v5.1.0"): "fbc6f3992d24b796d5a048ff273f7fcc4a7b6c09",
    ("actions/setup-python", "v6.3.0"): "ece7cb06caefa5fff74198d8649806c4678c61a1",
    ("actions/setup-node", "v5.0.0"): "a0853c24544627f65ddf259abe73b1d18a591444",
    ("pulumi/actions", "v7.0.0"): "8e5e406f4007fca908480587cb9893c07090f58d",
}
USES_LINE = re.compile(r"^\s*(?:-\s+)?uses:\s*(\S+)(.*)$", re.MULTILINE)
PINNED = re.compile(r"^(?P<action>[\w.-]+/[\w.-]+)@(?P<sha>[0-9a-f]{40})$")
TAG_COMMENT = re.compile(r"^\s+# (?P<tag>v\d+\.\d+\.\d+)\s*$")


def triggers(workflow: dict[Any, Any]) -> set[str]:
    on: str | dict[str, Any] = workflow.get(True, workflow.get("on", {}))  # YAML 1.1 reads the `on` key as True
    return {on} if isinstance(on, str) else set(on)


def secrets_read(workflow: dict[Any, Any], job: dict[str, Any]) -> set[str]:
    """Every secret a job can read; `secrets: inherit` reads all of them (`*`)."""
    if job.get("secrets") == "inherit":
        return {"*"}
    text = yaml.safe_dump([workflow.get("env", {}), {k: v for k, v in job.items() if k != "environment"}])
    return set(SECRET_REF.findall(text))


def environment(job: dict[str, Any]) -> str | None:
    env = job.get("environment")
    if isinstance(env, dict):
        return str(env.get("name"))
    return None if env is None else str(env)


def violations(workflow: dict[Any, Any]) -> list[str]:
    """Jobs a pull request triggers that can read a deploy credential without an approval gate."""
    if not triggers(workflow) & set(PR_TRIGGERS):
        return []
    out: list[str] = []
    for name, job in workflow["jobs"].items():
        env = environment(job)
        credentials = secrets_read(workflow, job) - {"GITHUB_TOKEN"}
        if env in MAIN_ONLY:
            out.append(f"{name}: a pull request job uses the main-only environment {env}")
        if credentials and env not in GATED:
            out.append(f"{name}: reads {', '.join(sorted(credentials))} outside an approval-gated environment")
        if "pull_request_target" in triggers(workflow) and env not in GATED and PR_HEAD_REF.search(yaml.safe_dump(job)):
            out.append(f"{name}: pull_request_target checks out the pull request's code without an approval gate")
    return out


def load(path: Path) -> dict[Any, Any]:
    data: dict[Any, Any] = yaml.safe_load(path.read_text())
    return data


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.yml")), ids=lambda p: p.name)
def test_no_pull_request_job_reads_a_deploy_credential_outside_a_gated_environment(path: Path) -> None:
    assert violations(load(path)) == []


def test_negative_control_the_old_preview_hands_credentials_to_every_pull_request() -> None:
    found = violations(load(OLD_PREVIEW))
    assert found == [
        "preview: reads PULUMI_CONFIG_PASSPHRASE, STATE_ACCESS_KEY_ID, STATE_SECRET_ACCESS_KEY outside an approval-gated environment"
    ]


def test_controls_removing_the_gate_or_switching_to_pull_request_target_is_caught() -> None:
    preview = load(WORKFLOWS / "preview.yml")
    ungated = yaml.safe_load(yaml.safe_dump(preview))
    del ungated["jobs"]["preview"]["environment"]
    assert any("PULUMI_CONFIG_PASSPHRASE" in v for v in violations(ungated))

    target = yaml.safe_load(yaml.safe_dump(preview))
    target[True] = {"pull_request_target": {}}
    del target["jobs"]["preview"]["environment"]
    target["jobs"]["preview"]["env"] = {}
    for step in target["jobs"]["preview"]["steps"]:
        step.pop("env", None)  # no credentials at all: only the checkout is left to catch
    target["jobs"]["preview"]["steps"][0]["with"]["ref"] = "${{ github.event.pull_request.head.sha }}"
    assert violations(target) == ["preview: pull_request_target checks out the pull request's code without an approval gate"]

    inherit = yaml.safe_load(yaml.safe_dump(preview))
    inherit["jobs"]["fork"]["secrets"] = "inherit"
    assert violations(inherit) == ["fork: reads * outside an approval-gated environment"]

    production = yaml.safe_load(yaml.safe_dump(preview))
    production["jobs"]["preview"]["environment"]["name"] = "production"
    assert violations(production) == ["preview: a pull request job uses the main-only environment production"]


def test_fork_pull_requests_get_one_line_instead_of_a_failed_preview() -> None:
    jobs = load(WORKFLOWS / "preview.yml")["jobs"]
    fork = "github.event.pull_request.head.repo.full_name != github.repository"
    same = "github.event.pull_request.head.repo.full_name == github.repository"
    assert jobs["fork"]["if"] == fork and jobs["preview"]["if"] == same
    (step,) = jobs["fork"]["steps"]
    assert step["run"].startswith('echo "::notice') and step["run"].count("\n") == 0
    assert secrets_read({}, jobs["fork"]) == set()


def test_preview_state_credentials_are_the_read_only_ones_and_deploy_is_main_only() -> None:
    preview = load(WORKFLOWS / "preview.yml")["jobs"]["preview"]
    assert environment(preview) == "preview"
    read_only = {"STATE_READ_ACCESS_KEY_ID", "STATE_READ_SECRET_ACCESS_KEY"}
    assert secrets_read({}, preview) == {"PULUMI_CONFIG_PASSPHRASE", "GITHUB_TOKEN", *read_only}
    deploy = load(WORKFLOWS / "deploy.yml")
    assert triggers(deploy) == {"push", "workflow_dispatch"}
    (job,) = deploy["jobs"].values()
    assert environment(job) == "production" and job["if"] == "github.ref == 'refs/heads/main'"


def secrets_outside_the_pulumi_step(workflow: dict[Any, Any]) -> list[str]:
    """Where a deploy credential is in reach of anything but the step that runs pulumi: the
    workflow's or a job's env, or another step (installing packages runs their code)."""
    out = [f"workflow env: {name}" for name in sorted(set(SECRET_REF.findall(yaml.safe_dump(workflow.get("env", {})))))]
    for job_name, job in workflow["jobs"].items():
        out += [f"{job_name} env: {name}" for name in sorted(set(SECRET_REF.findall(yaml.safe_dump(job.get("env", {})))))]
        for step in job.get("steps", []):
            found = set(SECRET_REF.findall(yaml.safe_dump(step))) - {"GITHUB_TOKEN"}
            if str(step.get("uses", "")).startswith("pulumi/actions@"):
                found -= set(SECRET_REF.findall(yaml.safe_dump(step.get("env", {}))))
            out += [f"{job_name} step {step.get('name', step.get('uses'))}: {name}" for name in sorted(found)]
    return out


@pytest.mark.parametrize("name", ["deploy.yml", "preview.yml"])
def test_credentials_are_only_in_the_env_of_the_step_that_runs_pulumi(name: str) -> None:
    """Not the job's env: `make venv/.runtime` (pip install: package code) and every other step run without them."""
    workflow = load(WORKFLOWS / name)
    assert secrets_outside_the_pulumi_step(workflow) == []
    (job,) = [j for j in workflow["jobs"].values() if any("pulumi/actions@" in str(s.get("uses", "")) for s in j["steps"])]
    (step,) = [s for s in job["steps"] if str(s.get("uses", "")).startswith("pulumi/actions@")]
    assert "PULUMI_CONFIG_PASSPHRASE" in SECRET_REF.findall(yaml.safe_dump(step["env"]))


def test_control_credentials_in_the_job_env_are_caught() -> None:
    """The shape both workflows had before: the job's env handed the passphrase and state keys to `pip install`."""
    found = secrets_outside_the_pulumi_step(load(OLD_PREVIEW))
    assert "preview env: PULUMI_CONFIG_PASSPHRASE" in found and "preview env: STATE_ACCESS_KEY_ID" in found
    deploy = load(WORKFLOWS / "deploy.yml")
    moved = yaml.safe_load(yaml.safe_dump(deploy))
    (job,) = moved["jobs"].values()
    install = next(s for s in job["steps"] if str(s.get("run", "")).startswith("make venv/.runtime"))  # pip install
    install["env"] = {"PULUMI_CONFIG_PASSPHRASE": "${{ secrets.PULUMI_CONFIG_PASSPHRASE }}"}
    assert secrets_outside_the_pulumi_step(moved) == ["deploy step Install dependencies: PULUMI_CONFIG_PASSPHRASE"]


def test_every_action_is_pinned_to_the_commit_of_the_tag_in_its_comment() -> None:
    seen = set()
    for path in sorted(WORKFLOWS.glob("*.yml")):
        for ref, comment in USES_LINE.findall(path.read_text()):
            pinned, tag = PINNED.match(ref), TAG_COMMENT.match(comment)
            assert pinned and tag, f"{path.name}: {ref}{comment} is not pinned as owner/repo@<sha> # vX.Y.Z"
            key = (pinned["action"], tag["tag"])
            assert PINS.get(key) == pinned["sha"], f"{path.name}: {ref} is not the commit of {key}"
            seen.add(key)
    assert seen == set(PINS)


def test_pulumi_cli_is_the_version_the_project_builds() -> None:
    version = PULUMI_VERSION.read_text()
    assert re.fullmatch(r"\d+\.\d+\.\d+\n", version), version
    steps = [
        step
        for path in sorted(WORKFLOWS.glob("*.yml"))
        for job in load(path)["jobs"].values()
        for step in job["steps"]
        if str(step.get("uses", "")).startswith("pulumi/actions@")
    ]
    assert len(steps) == 2
    for step in steps:
        assert step["with"]["pulumi-version-file"] == "tools/pulumi/VERSION"
        assert "pulumi-version" not in step["with"]


def test_readme_lists_the_github_settings_the_workflows_read() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### GitHub settings") :].split("\n## ")[0]
    names = set()
    for path in sorted(WORKFLOWS.glob("*.yml")):
        names |= set(SECRET_REF.findall(path.read_text())) | set(re.findall(r"vars\.([A-Z_]+)", path.read_text()))
    for name in sorted(names - {"GITHUB_TOKEN"}) + sorted(GATED):
        assert f"`{name}`" in section, name
    assert "required reviewers" in section and ".pulumi-passphrase" in section and "sshPrivateKey" in section
