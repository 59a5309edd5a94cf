"""File-tree snapshots for "a re-run changed nothing" assertions."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def manifest(*tops: Path) -> dict[str, tuple[object, ...]]:
    """Every path under `tops`: (mode, uid, gid, size, mtime_ns, link target); index 4 is the mtime."""
    out: dict[str, tuple[object, ...]] = {}
    for top in tops:
        if not top.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [".", *dirnames, *filenames]:
                p = Path(dirpath) if name == "." else Path(dirpath) / name
                st = p.lstat()
                link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
                out[str(p)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, link)
    return out
