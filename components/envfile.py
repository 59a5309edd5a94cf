"""The app's variable list (`.env.example`) and how a stack's settings measure up against it.

`.env.example` is the contract with the app: its sections say where each variable comes from.
The program warns when a stack would write a `.env` that lacks a listed secret or carries a
variable the list does not know, so the two cannot drift apart silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from components.settings import Settings

_SECTION = re.compile(r"^# --- (Written by the program|Plain values|Secrets)\b")
_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=")
_KINDS = {"Written by the program": "program", "Plain values": "plain", "Secrets": "secret"}


@dataclass(frozen=True)
class EnvExample:
    program: frozenset[str]
    plain: frozenset[str]
    secret: frozenset[str]

    @property
    def all(self) -> frozenset[str]:
        return self.program | self.plain | self.secret


def parse_env_example(text: str) -> EnvExample:
    sections: dict[str, set[str]] = {"program": set(), "plain": set(), "secret": set()}
    current: str | None = None
    for line in text.splitlines():
        header = _SECTION.match(line)
        if header:
            current = _KINDS[header.group(1)]
            continue
        match = _LINE.match(line)
        if match:
            if current is None:
                raise ValueError(f".env.example: {match.group(1)} appears before any '# --- ...' section header")
            sections[current].add(match.group(1))
    return EnvExample(frozenset(sections["program"]), frozenset(sections["plain"]), frozenset(sections["secret"]))


def load_env_example(path: Path) -> EnvExample:
    return parse_env_example(path.read_text())


def drift_warnings(example: EnvExample, settings: Settings) -> list[str]:
    """What this stack's shared/.env would lack or add compared with .env.example."""
    warnings = []
    for key in sorted(example.secret - set(settings.secret_env)):
        warnings.append(
            f"shared/.env will lack {key} (.env.example lists it): "
            f"{settings.config_command} set --secret --path 'cognivern:secretEnv.{key}'"
        )
    for key in sorted(example.plain - set(settings.env) - set(settings.secret_env)):
        warnings.append(f"shared/.env will lack {key} (.env.example lists it): set cognivern:env.{key}")
    for key in sorted((set(settings.env) | set(settings.secret_env)) - example.all):
        warnings.append(f"{key} is not listed in .env.example: add it there so the app's variable list stays complete")
    return warnings
