"""Paths on any filesystem, and output files written atomically with the permissions the user's umask gives.

The paths of a run's outputs and models (workdir, checkpoints, metrics, TensorBoard, `--checkpoint`, the
converters' `--src/--dst`, image roots) go through
`as_path`: an etils `epath.Path`, the path type Orbax itself uses, which reads and writes local files with
`os`/`pathlib` and cloud URLs (`gs://`, `s3://`, ... through fsspec: gcsfs for `gs://`) with the same methods.
Local paths are made absolute once, here: Orbax and TensorStore resolve a relative path against no fixed directory.
Inputs that a library reads by local path only (data files indexed by byte offset, tokenizer files, upstream
checkpoint directories) are fetched from a URL once into a local cache (`local_copy`), kept under a size cap by
evicting the least recently used copies (`evict`).

Local outputs are written under a temporary name beside their destination and renamed into place, so an interrupted run
never leaves a partial file. `tempfile.mkstemp` / `mkdtemp` create that name as 0600 / 0700 (they are meant for
private scratch files), and a rename keeps the mode: without `apply_umask` a converted checkpoint or an answers file
would be readable by its owner only, whatever the umask says. On an object store there is no rename (a "rename" is
a copy then a delete); there an object is written in one upload, which the store makes visible only once complete,
so a reader sees the old object or the new one, never a part: `write_text_atomic` writes the object directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names a location on a remote filesystem (`gs://bucket/x`, `s3://...`), not a local path."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an `epath.Path`: URLs as they are, local paths absolute (against the current directory)."""
    text = os.fspath(path)
    return epath.Path(text if is_url(text) else os.path.abspath(os.path.expanduser(text)))


def parent_dir(path: str | os.PathLike) -> str:
    """The directory holding `path`, as a string: a URL's parent stays a URL (`pathlib` would turn `gs://b/x` into
    `gs:/b`), a local one stays as given (relative or not)."""
    return str(as_path(path).parent) if is_url(path) else str(Path(path).parent)


def files_under(directory: str | os.PathLike) -> list[epath.Path]:
    """Every file under `directory`, sorted. (`rglob` is refused on gs://, and `walk` there yields its directories
    without the `gs://`: the directories are walked here by name, from the top.)"""
    root = as_path(directory)
    out, todo = [], [root]
    while todo:
        d = todo.pop()
        _, dirs, names = next(d.walk(), (d, [], []))
        out += [d / n for n in names]
        todo += [d / n for n in dirs]
    return sorted(out)


def file_identity(path: str | os.PathLike) -> dict[str, int | str]:
    """What tells one version of a file from another: its size and modification time (local), or its size and
    generation (an object store; the generation changes on every overwrite, unlike a timestamp's seconds)."""
    if not is_url(path):
        stat = os.stat(path)
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    import fsspec

    fs, inner = fsspec.core.url_to_fs(os.fspath(path))
    info = fs.info(inner)
    if info.get("type") != "file":
        raise FileNotFoundError(f"not a file: {path}")
    return {"size": int(info["size"]), "version": str(info.get("generation") or info.get("mtime") or "")}


CACHE_MAX_GB = 50.0  # default size cap of the local cache, in GB (10^9 bytes)


def cache_root() -> Path:
    """Where `local_copy` keeps its copies: $SAIL_JAX_CACHE, else ~/.cache/sail-jax/files."""
    return Path(os.environ.get("SAIL_JAX_CACHE") or Path.home() / ".cache" / "sail-jax" / "files")


def cache_max_bytes() -> int:
    """The cache's size cap: $SAIL_JAX_CACHE_MAX_GB (GB, a positive number), else `CACHE_MAX_GB`."""
    text = os.environ.get("SAIL_JAX_CACHE_MAX_GB", "").strip()
    try:
        gb = float(text) if text else CACHE_MAX_GB
    except ValueError:
        gb = -1.0
    if not gb > 0:
        raise ValueError(f"SAIL_JAX_CACHE_MAX_GB={text!r}: expected a positive number of GB (default {CACHE_MAX_GB:g})")
    return int(gb * 1e9)


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def evict(keep: Path, max_bytes: int) -> list[Path]:
    """Remove the least recently used copies under `cache_root()` (by the time `local_copy` last returned each)
    until the cache holds at most `max_bytes`, never `keep` (the copy the caller is about to use; alone it may
    exceed the cap). Each is renamed away before it is deleted, so no process ever finds a partial copy; a process
    still reading a removed copy's open files keeps reading them (POSIX). Returns the copies removed."""
    root = keep.parent
    entries = []
    for d in root.iterdir():
        if d.name.startswith(".") or d == keep or not d.is_dir():  # temporary names: copies being made or removed
            continue
        try:
            entries.append((d.stat().st_mtime_ns, _tree_bytes(d), d))
        except OSError:  # removed meanwhile by another process
            continue
    total = _tree_bytes(keep) + sum(size for _, size, _ in entries)
    removed = []
    for _, size, d in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        gone = root / f".{d.name}.evicted-{os.getpid()}"
        try:
            os.rename(d, gone)
        except OSError:  # another process evicted it first
            continue
        shutil.rmtree(gone, ignore_errors=True)
        total -= size
        removed.append(d)
    return removed


def local_file(path: str | os.PathLike, what: str = "file") -> str | os.PathLike:
    """What to hand a library that reads local files only: `path` itself, or for a URL its local copy (`local_copy`)
    once the object is known to exist (else FileNotFoundError "{what} not found: URL", naming the URL)."""
    if not is_url(path):
        return path
    if not as_path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return local_copy(path)


def local_copy(url: str | os.PathLike, names: tuple[str, ...] | None = None) -> Path:
    """A local copy of the file or directory `url` (of a directory: the files named in `names` that exist, else all
    of them), for libraries that read local files only. Made once per content: the copy lives under `cache_root()`
    named by a hash of the URL and every file's `file_identity`, so a changed object gives a new copy and every
    process of the host (Grain workers, later runs) reuses an unchanged one. It is written into a temporary
    directory renamed into place, so a concurrent process never sees a partial copy. Each use marks the copy as
    recently used (its directory's mtime); after a new copy, the least recently used others are evicted down to
    `cache_max_bytes()` (`evict`)."""
    src = as_path(url)
    if src.is_dir():
        found = files_under(src) if names is None else [src / n for n in names if (src / n).is_file()]
        rel = [os.fspath(f)[len(os.fspath(src)):].lstrip("/") for f in found]
    elif src.is_file():
        found, rel = [src], [src.name]
    else:
        raise FileNotFoundError(f"not found: {url}")
    ident = [os.fspath(src), *[(r, file_identity(f)) for r, f in zip(rel, found, strict=True)]]
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]
    entry = cache_root() / key
    out = entry if src.is_dir() else entry / src.name
    if entry.is_dir():
        with contextlib.suppress(OSError):  # a read-only shared cache is still used, in order of creation
            os.utime(entry)
        return out
    max_bytes = cache_max_bytes()  # a bad setting is refused before anything is fetched
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=entry.parent))
    try:
        for r, f in zip(rel, found, strict=True):
            (tmp / r).parent.mkdir(parents=True, exist_ok=True)
            with f.open("rb") as g, (tmp / r).open("wb") as h:
                shutil.copyfileobj(g, h, 1 << 24)
        apply_umask(tmp)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not entry.is_dir():  # else another process made the same copy first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    evict(entry, max_bytes)
    return out


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


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write beside `path` and rename over it: an interrupted run never leaves a partial file. On an object store,
    one upload (atomic there, see the module docstring)."""
    if is_url(path):
        target = as_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        return
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


class _ObjectAppender:
    """An appendable text file on an object store, which has no append: the object is rewritten whole (existing
    content + what was written) on every `flush`, each upload replacing it at once."""

    def __init__(self, path: epath.Path):
        self.path = path
        self.text = path.read_text() if path.exists() else ""
        self._dirty = False

    def write(self, text: str) -> int:
        self.text += text
        self._dirty = True
        return len(text)

    def flush(self) -> None:
        if self._dirty:
            self.path.write_text(self.text)
            self._dirty = False

    def close(self) -> None:
        self.flush()


def open_append(path: str | os.PathLike):
    """A text file opened for appending: a local file, or an object rewritten on each `flush` (see above)."""
    if is_url(path):
        return _ObjectAppender(as_path(path))
    return open(path, "a", encoding="utf-8")  # noqa: SIM115 (the caller closes it)


def upload_tree(local: str | os.PathLike, dst: str | os.PathLike, last: tuple[str, ...] = ()) -> None:
    """Copy the local directory `local` to `dst` (a URL) file by file, the top-level entries named in `last` after
    all others: a reader that takes those as the sign of a complete directory never sees a partial one."""
    src, target = Path(local), as_path(dst)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    for p in sorted(files, key=lambda p: p.relative_to(src).parts[0] in last):
        out = target / p.relative_to(src).as_posix()
        out.parent.mkdir(parents=True, exist_ok=True)
        with p.open("rb") as f, out.open("wb") as g:
            shutil.copyfileobj(f, g, 1 << 24)
