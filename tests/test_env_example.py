""".env.example, Pulumi.prod.yaml and the program's .env stay in step.

The drift warnings are checked as an operator meets them: in the real `pulumi preview` of the
program (tests/support/real_engine.py), with the secrets set as the README says.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from components.envfile import load_env_example, parse_env_example
from components.settings import RESERVED_ENV_KEYS, SECRET_KEYS
from tests.support.real_engine import RealEngine, RunReport

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = load_env_example(REPO / ".env.example")
PROD_ENV = set(yaml.safe_load((REPO / "Pulumi.prod.yaml").read_text())["config"]["cognivern:env"])
DOCUMENT_VARIABLES = {
    "PORT", "NODE_ENV", "ARBITRUM_RPC_URL", "SAPIENCE_PRIVATE_KEY", "ROUTEWAY_API_KEY",
    "GROQ_API_KEY", "RECALL_API_KEY", "RECALL_BUCKET", "AGENTS_ENABLED",
}  # fmt: skip
ALL_SECRETS = {key: f"secret-{key.lower()}" for key in EXAMPLE.secret}
PROD_ENV_VALUES = {k: "x" for k in PROD_ENV}
STACK = {
    "release": "v1",
    "host": "192.0.2.10",
    "artifactUrl": "https://example.invalid/a.tar.gz",
    "artifactSha256": "0" * 64,
    "env": json.dumps(PROD_ENV_VALUES),
}


def env_warnings(report: RunReport) -> list[str]:
    return [w for w in report.warnings if ".env" in w]


def test_sections_match_what_the_program_writes() -> None:
    assert EXAMPLE.program == RESERVED_ENV_KEYS
    assert EXAMPLE.plain == PROD_ENV
    assert not EXAMPLE.secret & EXAMPLE.plain
    assert EXAMPLE.all >= DOCUMENT_VARIABLES


def test_placeholders_only() -> None:
    for line in (REPO / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            if key in EXAMPLE.secret:
                assert set(value) <= set("0x."), f"{key} must be a placeholder, got {value!r}"


def test_drift_between_the_stack_and_env_example_is_named_in_the_preview(tmp_path: Path) -> None:
    engine = RealEngine(tmp_path)
    complete = engine.preview({**STACK, "secretEnv": json.dumps(ALL_SECRETS)}, secret_keys=SECRET_KEYS)
    assert complete.ok and env_warnings(complete) == [], complete.output

    secrets = dict(ALL_SECRETS)
    del secrets["GROQ_API_KEY"]
    config = {**STACK, "env": json.dumps({**PROD_ENV_VALUES, "NEW_FLAG": "1"}), "secretEnv": json.dumps(secrets)}
    drifted = engine.preview(config, secret_keys=SECRET_KEYS)
    warnings = env_warnings(drifted)
    assert any("lack GROQ_API_KEY" in w and "cognivern:secretEnv.GROQ_API_KEY" in w for w in warnings), drifted.output
    assert any("NEW_FLAG is not listed in .env.example" in w for w in warnings), warnings
    assert len(warnings) == 2
    assert "lack GROQ_API_KEY" in drifted.output  # what the operator's terminal shows


def test_variables_outside_a_section_are_rejected() -> None:
    with pytest.raises(ValueError, match="before any"):
        parse_env_example("FOO=1\n")
