"""Output files written atomically, with the permissions the user's umask gives.

Outputs are written under a temporary name beside their destination and renamed into place, so an interrupted run
never leaves a partial file. `tempfile.mkstemp` / `mkdtemp` create that name as 0600 / 0700 (they are meant for
private scratch files), and a rename keeps the mode: without `apply_umask` a converted checkpoint or an answers file
would be readable by its owner only, whatever the umask says.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask. Linux reports it in /proc/self/status; elsewhere it is read by setting and restoring it
    (for that instant another thread creating a file would get mode 0o666)."""
    try:
        match = re.search(r"^Umask:\s*([0-7]+)$", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        match = None
    if match:
        return int(match.group(1), 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give `path` the mode `open()` / `mkdir()` would have created it with: 0o666 (file) or 0o777 (directory)
    less the umask."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~current_umask())


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write beside `path` and rename over it: an interrupted run never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
