"""`pulumi preview --diff` kept as golden files (tests/goldens/preview/NAME.txt), reviewed like code.

    text = normalise(report.text, Run(values={"<ROOT>": str(root), ...}))
    assert_golden("keep-releases", text)         # GOLDEN_UPDATE=1 rewrites the file instead

A golden is what a reviewer reads on the pull request, minus what differs from run to run:
- the values a test host picks (temp paths, ports, the unique app user, the Node major, host keys)
  are replaced by `<NAME>` placeholders the test names (`Run.values`, longest value first);
- sha256 digests (a fixture artifact is rebuilt on each run) become `<SHA256-n>` (one the CLI cut
  short, `<SHA256-n>...`) and the short asset hashes the engine prints `<HASH-n>`, numbered by
  first appearance, so a diff still shows which digest stayed and which changed;
- a command's id suffix (`[id=NAME1a2b3c4d]`) and the default provider's UUID are dropped;
- `warning:` lines are left out: the same ones (unset .env.example variables, the plugin found on
  PATH) follow every preview and are tested where they are made;
- the resource blocks (each with its own indentation) are sorted by resource name, then URN: the
  engine reports resources that do not depend on each other in whichever order their
  registrations arrive.
Nothing else is touched: the operations, the properties and their old and new values stay as the
CLI printed them.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

GOLDENS = Path(__file__).resolve().parents[1] / "goldens" / "preview"
UPDATE = os.environ.get("GOLDEN_UPDATE") == "1"

_SHA256 = re.compile(r"\b[0-9a-f]{64}\b")
_ASSET_HASH = re.compile(r"(asset\(file:)([0-9a-f]{7})(\))")
_TRUNCATED_HEX = re.compile(r"\b([0-9a-f]{6,63})\.\.\.")
_ID = re.compile(r"^(\s*\[id=)[^\]]*\]\n", re.MULTILINE)
_PROVIDER = re.compile(r"(::default_[0-9_]+)::[0-9a-f-]{36}\]")
# A resource block starts at its operation marker (`~ `, `+ `, `- `, `+-`, `-+` or none) and type,
# at any indentation (children are indented under their component, deletions come unindented).
_BLOCK = re.compile(r"^ *(?:[~+-] |\+-|-\+|  )?[A-Za-z][\w:$.-]*: \([a-z-]+\)$", re.MULTILINE)
_STACK_BLOCK = "pulumi:pulumi:Stack: ("
_URN = re.compile(r"\[urn=([^\]]+)\]")


@dataclass
class Run:
    """What varies between runs of one test: literal value -> placeholder (the longest replaced first)."""

    values: Mapping[str, str] = field(default_factory=dict)


def _number(pattern: re.Pattern[str], text: str, label: str, group: int = 0) -> str:
    seen: dict[str, int] = {}

    def sub(m: re.Match[str]) -> str:
        value = m.group(group)
        n = seen.setdefault(value, len(seen) + 1)
        placeholder = f"<{label}-{n}>"
        return m.group(0).replace(value, placeholder) if group else placeholder

    return pattern.sub(sub, text)


def _sort_blocks(body: str) -> str:
    """The resource blocks between the stack line and `--outputs:--`/`Resources:`, sorted by URN."""
    starts = [m.start() for m in _BLOCK.finditer(body) if _STACK_BLOCK not in m.group(0)]
    if not starts:
        return body
    head, blocks = body[: starts[0]], [body[a:b] for a, b in zip(starts, [*starts[1:], len(body)], strict=True)]
    tail = ""
    last = blocks[-1]
    for marker in ("    --outputs:--", "Resources:"):
        at = last.find(marker)
        if at != -1:
            blocks[-1], tail = last[:at], last[at:]
            break

    def key(block: str) -> tuple[str, str]:
        found = _URN.search(block)
        urn = found.group(1) if found else block
        return urn.rsplit("::", 1)[-1], urn  # by name: a component right before its children

    return head + "".join(sorted(blocks, key=key)) + tail


def _truncated_digests(text: str) -> str:
    """A digest the CLI cut short (`4eac397..."`): the placeholder of the full digest it starts."""
    full = {m.group(0): None for m in _SHA256.finditer(text)}
    seen: dict[str, int] = {}
    for digest in full:
        seen.setdefault(digest, len(seen) + 1)

    def sub(m: re.Match[str]) -> str:
        prefix = m.group(1)
        for digest, n in seen.items():
            if digest.startswith(prefix):
                return f"<SHA256-{n}>..."
        return "<HEX>..."

    return _TRUNCATED_HEX.sub(sub, text)


def normalise(text: str, run: Run) -> str:
    """The preview as a golden: see the module docstring for every change made."""
    lines = [line for line in text.splitlines() if not line.startswith("warning:")]
    out = "\n".join(lines).strip("\n") + "\n"
    for value, placeholder in sorted(run.values.items(), key=lambda item: -len(item[0])):
        if value:
            out = out.replace(value, placeholder)
    out = _truncated_digests(out)
    out = _number(_SHA256, out, "SHA256")
    out = _number(_ASSET_HASH, out, "HASH", group=2)
    out = _ID.sub(r"", out)
    out = _PROVIDER.sub(r"\1]", out)
    return _sort_blocks(out)


def golden_path(name: str) -> Path:
    return GOLDENS / f"{name}.txt"


def assert_golden(name: str, text: str) -> None:
    """`text` must equal tests/goldens/preview/NAME.txt (GOLDEN_UPDATE=1: write it instead)."""
    path = golden_path(name)
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    want = path.read_text() if path.exists() else ""
    if text != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True), f"{path.name} (golden)", "this run"))
        raise AssertionError(f"the preview differs from {path} (GOLDEN_UPDATE=1 rewrites it; review the change):\n{diff}")
