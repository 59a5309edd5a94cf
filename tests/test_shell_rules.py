"""The host scripts' validators (lib.sh, bash) accept exactly what the Python rules accept.

Neither side holds a copy: the rules live in components/release/cognivern_release/facts.py, and the
scripts get them as generated bash variables (`facts.shell_prelude`, put in front of lib.sh by
components.remote). What can still differ is the regex dialect (Python `re` against POSIX ERE in
bash's `[[ =~ ]]`) and lib.sh's loop over the directory lists, so every value of the settings BAD
table, every good value the settings tests use and the path tables go to both.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from components.release.cognivern_release import facts
from components.remote import LIB
from tests.test_settings import BAD, GOOD_IDS, KEY
from tests.test_validation import CANDIDATE_ROOTS

GOOD = [
    *GOOD_IDS,
    *CANDIDATE_ROOTS,
    *("cognivern", "deploy", "_svc", "a" * 32, "app-user_2"),
    *("cognivern-agent", "cognivern.agent-2", "Agent_1", "A" * 64, "cognivern_agent-2"),
    *("/opt/cognivern", "/srv/app.v2", "/opt/a-b_c/d.e", "0" * 64, "f" * 64),
]
EDGE = ["", "a" * 65, "-x", ".x", "x.", "x\n", "\nx", "x y", "é", "/opt/...", "/opt/..x", "/./opt", "//opt", "/opt/x/", "ROOT", "0" * 63]
EDGE += ["/opt/.", "/opt/..", "/..", "/.", "/", "/.a", "/a/.b/..c", "/etc", "/etc/x", "/etcetera", "/var/lib", "/var/lib/x"]


def bad_table_values() -> set[str]:
    """Every value of tests/test_settings.py's BAD table (whatever key it was given for)."""
    values: set[str] = set()
    for overrides, _ in BAD:
        assert isinstance(overrides, dict)
        values |= {str(v) for v in overrides.values() if v is not None}
    return values


# argv cannot carry NUL: such a value never reaches a script (and every Python rule refuses it).
VALUES = sorted(v for v in bad_table_values() | {*GOOD, *EDGE, KEY} if "\0" not in v)

# name -> (Python rule, the lib.sh test of "$v")
RULES: dict[str, tuple[Callable[[str], bool], str]] = {
    "user": (lambda v: facts.USER_RE.match(v) is not None, 'valid_user "$v"'),
    "abs-path": (facts.abs_path, 'valid_abs_path "$v"'),
    "site-name": (lambda v: facts.SITE_NAME_RE.match(v) is not None, 'valid_site_name "$v"'),
    "system-path": (facts.system_path, 'system_path "$v"'),
}


def shell_answers(check: str, values: list[str]) -> list[bool]:
    """One bash for all values: the prelude and lib.sh, then `check` once per value (as $v)."""
    script = facts.shell_prelude() + LIB.read_text() + f'\nfor v in "$@"; do if {check}; then echo 1; else echo 0; fi; done'
    result = subprocess.run(["bash", "-c", script, "rules", *values], capture_output=True, text=True, check=True)
    answers = result.stdout.splitlines()
    assert len(answers) == len(values), result.stderr
    return [line == "1" for line in answers]


@pytest.mark.parametrize("rule", sorted(RULES))
def test_the_generated_shell_rules_accept_what_python_accepts(rule: str) -> None:
    python_rule, check = RULES[rule]
    shell = shell_answers(check, VALUES)
    disagree = {v: f"python {python_rule(v)}, shell {s}" for v, s in zip(VALUES, shell, strict=True) if python_rule(v) != s}
    assert disagree == {}
    assert any(shell) and not all(shell), "the values must hold some each side accepts and some it refuses"


def test_every_app_name_the_settings_accept_becomes_a_site_name_the_scripts_accept() -> None:
    """facts.site_name is the one sanitiser: nginx-site.sh and tls.sh get its result as --name."""
    from components import settings

    app_names = [v for v in VALUES if settings.APP_NAME_RE.fullmatch(v)]
    assert len(app_names) > 5 and any("." in v for v in app_names)
    assert shell_answers('valid_site_name "$v"', [facts.site_name(v) for v in app_names]) == [True] * len(app_names)
