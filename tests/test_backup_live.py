"""Backups while the app writes (issue 11 §4): deploys never block on "file changed as we read it".

One writer appends JSON lines to data/events.jsonl, another rewrites data/state.json (write a temp
file, rename it over: how a careful app writes a whole file) about 100 times a second, both as the
app user, while 20 activations run; each activation backs up shared/data first. All 20 succeed,
and every backup unpacks to a tree whose JSON files and JSON lines all parse; the last one is
restored for real. The sizes and times of the backups are printed (run with -s to see them).
Run as root: venv/bin/pytest -s tests/test_backup_live.py
"""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hardened_host import HardenedHost, hardened_host

ACTIVATIONS = 20
WRITER = r"""
import json, os, sys, time
data, kind = sys.argv[1], sys.argv[2]
n = 0
if kind == "append":
    fd = os.open(os.path.join(data, "events.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    pad = "x" * 200
    while True:
        n += 1
        os.write(fd, (json.dumps({"n": n, "t": time.time(), "pad": pad}) + "\n").encode())  # one write per line
        if n % 10 == 0:
            time.sleep(0.005)  # ~2,000 lines a second: busy, without starving the app of CPU
else:
    target = os.path.join(data, "state.json")
    while True:
        n += 1
        tmp = f"{target}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"n": n, "t": time.time(), "items": list(range(n % 500))}, f)
        os.rename(tmp, target)
        time.sleep(0.01)
"""
BACKUP_LINE = re.compile(r"backup (data-\S+\.tar\.gz): (\d+) bytes in (\d+) ms")


pytestmark = pytest.mark.needs_root("it runs the release tool as root")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HardenedHost]:
    # no bake: this module is about the backups taken before each of its 20 activations (cold starts)
    with hardened_host(tmp_path_factory.mktemp("backup-live"), dataBackupsKeep=ACTIVATIONS + 5, healthTimeout=25, bakeSeconds=0) as h:
        for rid in ("r1", "r2"):
            assert h.install(rid).returncode == 0
        h.ok("activate", "r1")
        yield h


def _parse(name: str, data: bytes) -> tuple[int, int]:
    """A *.json file parses, or every line of a *.jsonl file does: (json files, jsonl lines)."""
    if name.endswith(".json"):
        json.loads(data)
        return 1, 0
    if name.endswith(".jsonl"):
        lines = data.splitlines()
        for line in lines:
            json.loads(line)
        return 0, len(lines)
    return 0, 0


def _parse_tree(tree: Path) -> tuple[int, int]:
    """Every *.json under `tree` parses, and every line of every *.jsonl: (json files, jsonl lines)."""
    counts = [_parse(path.name, path.read_bytes()) for path in tree.rglob("*") if path.is_file()]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def _parse_archive(backup: Path) -> tuple[int, int]:
    """_parse_tree for the tree a backup unpacks to, read from the archive itself (20 backups of
    ~20 MB each were extracted to disk first, for nothing). Its members must be what tar's `data`
    filter lets through, like `restore` (which unpacks it for real) accepts."""
    files = lines = 0
    with tarfile.open(backup) as tar:
        for member in tar:
            tarfile.data_filter(member, "/nonexistent")  # raises for an absolute, escaping or special member
            extracted = tar.extractfile(member) if member.isfile() else None
            if extracted is not None:
                f, n = _parse(member.name, extracted.read())
                files, lines = files + f, lines + n
    return files, lines


def test_activations_back_up_and_restore_while_the_app_writes(host: HardenedHost) -> None:
    data = host.root / "shared" / "data"
    # A history worth archiving (~20 MB of JSON lines) before the writers start.
    host.as_app(
        "python3",
        "-c",
        "import json,sys\nwith open(sys.argv[1], 'w') as f:\n"
        " [f.write(json.dumps({'seed': i, 'pad': 'y' * 200}) + '\\n') for i in range(90000)]",
        str(data / "events.jsonl"),
    )
    writers = [
        subprocess.Popen(["runuser", "-u", host.user, "--", "python3", "-c", WRITER, str(data), kind], cwd="/")
        for kind in ("append", "rewrite")
    ]
    results = []
    try:
        for i in range(ACTIVATIONS):
            results.append(host.tool("activate", "r2" if i % 2 == 0 else "r1"))
            assert all(w.poll() is None for w in writers), "a writer died"
    finally:
        for w in writers:
            w.terminate()
            w.wait(timeout=10)
    failed = [(i, r.stderr) for i, r in enumerate(results) if r.returncode != 0]
    assert not failed, failed[0]

    figures = [m for r in results for m in BACKUP_LINE.finditer(r.stderr)]
    warned = sum("changed while being archived" in r.stderr for r in results)
    assert len(figures) == ACTIVATIONS
    backups = [host.root / "backups" / "data" / m.group(1) for m in figures]
    assert all(b.is_file() for b in backups)
    assert not list((host.root / "backups" / "data").glob(".*partial")), ".partial left behind"
    for backup in backups:
        files, lines = _parse_archive(backup)
        assert files >= 1 and lines >= 90000, (backup.name, files, lines)

    sizes = [int(m.group(2)) for m in figures]
    times = [int(m.group(3)) for m in figures]
    print(
        f"\nbackups under writes: {len(figures)} activations, all ok; tar warned of changed files in {warned};"
        f" archive {min(sizes)}-{max(sizes)} bytes, {min(times)}-{max(times)} ms (median {sorted(times)[len(times) // 2]} ms);"
        f" data {sum(p.stat().st_size for p in data.rglob('*') if p.is_file())} bytes"
    )

    restored = host.tool("restore", backups[-1].name)
    assert restored.returncode == 0, restored.stderr
    assert _parse_tree(data)[1] >= 90000
    assert "stopping the app" in restored.stderr
    assert restored.stderr.index("stopping the app") < restored.stderr.index("current shared/data saved to")
