"""The shell validators accept exactly what the Python rules accept, value for value.

A value the program lets through reaches a server script as an argument, and the script checks it
again before using it: a rule that drifts on one side either fails a good deploy on the server or
lets the server take what the program refused. Every value of the settings BAD table, every good
value the settings tests use and the path tables are fed to each pair (Python rule, shell function).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from components import settings
from components.render import SITE_NAME_RE, site_name
from tests.test_settings import BAD, GOOD_IDS, KEY
from tests.test_validation import CANDIDATE_ROOTS

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "components" / "host" / "lib.sh"
RELEASE_TOOL = REPO / "components" / "release" / "cognivern-release.sh"

GOOD = [
    *GOOD_IDS,
    *CANDIDATE_ROOTS,
    *("cognivern", "deploy", "_svc", "a" * 32, "app-user_2"),
    *("cognivern-agent", "cognivern.agent-2", "Agent_1", "A" * 64, "cognivern_agent-2"),
    *("/opt/cognivern", "/srv/app.v2", "/opt/a-b_c/d.e", "0" * 64, "f" * 64),
]
EDGE = ["", "a" * 65, "-x", ".x", "x.", "x\n", "\nx", "x y", "é", "/opt/...", "/opt/..x", "/./opt", "//opt", "/opt/x/", "ROOT", "0" * 63]


def bad_table_values() -> set[str]:
    """Every value of tests/test_settings.py's BAD table (whatever key it was given for)."""
    values: set[str] = set()
    for overrides, _ in BAD:
        assert isinstance(overrides, dict)
        values |= {str(v) for v in overrides.values() if v is not None}
    return values


VALUES = sorted(bad_table_values() | {*GOOD, *EDGE, KEY})
# argv cannot carry NUL: such a value never reaches a script (and every Python rule refuses it).
VALUES = [v for v in VALUES if "\0" not in v]

# name -> (Python rule, the file the shell sources, the shell test of "$v")
PAIRS: dict[str, tuple[Callable[[str], bool], Path, str]] = {
    "release-id": (lambda v: settings.RELEASE_ID_RE.fullmatch(v) is not None, RELEASE_TOOL, '(valid_id "$v") 2>/dev/null'),
    "sha256": (lambda v: settings.SHA256_RE.fullmatch(v) is not None, RELEASE_TOOL, "[[ $v =~ $SHA_RE ]]"),
    "user": (lambda v: settings.USER_RE.fullmatch(v) is not None, LIB, 'valid_user "$v"'),
    "abs-path": (settings.abs_path, LIB, 'valid_abs_path "$v"'),
    "abs-path-release-tool": (settings.abs_path, RELEASE_TOOL, 'valid_abs_path "$v"'),
    "site-name": (lambda v: SITE_NAME_RE.fullmatch(v) is not None, LIB, 'valid_site_name "$v"'),
}


def shell_answers(source: Path, check: str, values: list[str]) -> list[bool]:
    """One bash for all values: `check` runs once per value (as $v) after sourcing `source`."""
    script = f'source {source}\nfor v in "$@"; do if {check}; then echo 1; else echo 0; fi; done'
    result = subprocess.run(["bash", "-c", script, "agree", *values], capture_output=True, text=True, check=True)
    answers = result.stdout.splitlines()
    assert len(answers) == len(values), result.stderr
    return [line == "1" for line in answers]


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_shell_and_python_accept_the_same_values(pair: str) -> None:
    python_rule, source, check = PAIRS[pair]
    shell = shell_answers(source, check, VALUES)
    disagree = {v: f"python {python_rule(v)}, shell {s}" for v, s in zip(VALUES, shell, strict=True) if python_rule(v) != s}
    assert disagree == {}
    assert any(shell) and not all(shell), "the values must hold some each side accepts and some it refuses"


def test_every_app_name_the_settings_accept_becomes_a_site_name_the_scripts_accept() -> None:
    """render.site_name is the one sanitiser: nginx-site.sh and tls.sh get its result as --name."""
    app_names = [v for v in VALUES if settings.APP_NAME_RE.fullmatch(v)]
    assert len(app_names) > 5 and any("." in v for v in app_names)
    assert shell_answers(LIB, 'valid_site_name "$v"', [site_name(v) for v in app_names]) == [True] * len(app_names)
