"""The converted-graph cache: one folder per model, revision and variant, written atomically.

A conversion takes minutes on a Pi, so its result is kept and reused; a manifest records what it was
made from (a cheap source fingerprint, a digest of kolite's converter code, onnx/onnxruntime
versions) and what it holds (each file's size and sha256), and any difference means the entry is
stale or damaged and is rebuilt, never served: a file corrupted in place without changing its size
is found by its digest. Entries appear by a single rename, so a crash never leaves a half-written
graph that a later start would trust; `entry_lock` makes a second process wait for the first one's
conversion instead of converting again, and removes what a killed conversion left.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

MANIFEST = "manifest.json"
GRAPH = "model.onnx"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheEntry:
    folder: Path
    manifest: dict

    @property
    def graph(self) -> Path:
        return self.folder / GRAPH


def entry_folder(home: Path, name: str, revision: str, precision: str) -> Path:
    """`<home>/models/<name>/<revision>/<precision>` with the name made file-system safe."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "--", name.strip("/")) or "model"
    return Path(home) / "models" / safe / re.sub(r"[^A-Za-z0-9._-]+", "_", revision) / precision


def file_fingerprint(path: Path) -> dict:
    """Identify a source file without hashing gigabytes: the hub blob name (its sha256) when the
    file is a hub-cache symlink, otherwise size and modification time."""
    path = Path(path)
    real = path.resolve()
    st = real.stat()
    fp = {"name": path.name, "size": st.st_size}
    if path.is_symlink() and real.parent.name == "blobs":
        fp["blob"] = real.name
    else:
        fp["mtime_ns"] = st.st_mtime_ns
    return fp


def lookup(folder: Path, expected: dict) -> CacheEntry | None:
    """The entry at `folder` if its manifest matches every key of `expected` and every file it lists
    has the size and sha256 recorded, else None (logged when the entry exists but is damaged)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        if folder.exists():
            log.warning("the converted model in %s has no readable manifest: converting again", folder)
        return None
    if not isinstance(manifest, dict) or any(manifest.get(k) != v for k, v in expected.items()):
        return None
    files = manifest.get("files")
    if not isinstance(files, dict) or GRAPH not in files:
        return None
    for name, recorded in files.items():
        path = folder / name
        try:
            ok = path.stat().st_size == recorded["size"] and file_sha256(path) == recorded["sha256"]
        except (OSError, KeyError, TypeError):
            ok = False
        if not ok:
            log.warning("the converted model in %s is damaged (%s does not match its manifest): converting again",
                        folder, name)
            return None
    return CacheEntry(folder, manifest)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in blocks (KoGPT2 int8's 170 MB: about 0.2 s on a PC)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@contextmanager
def entry_lock(folder: Path) -> Iterator[None]:
    """Hold `folder`'s conversion lock: a second process converting the same entry waits here, then
    finds the first one's result. Temporary folders a killed conversion left are removed once held."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
            log.info("removing %s, left by an interrupted conversion", stale)
            shutil.rmtree(stale, ignore_errors=True)
        yield


def write_entry(folder: Path, manifest: dict, build: Callable[[Path], None]) -> CacheEntry:
    """Run `build(tmpdir)` (it must write `model.onnx` there), add the manifest, then publish by rename."""
    written: dict = {}

    def build_with_manifest(tmp: Path) -> None:
        build(tmp)
        if not (tmp / GRAPH).is_file():
            raise RuntimeError("conversion produced no graph")
        written.update(manifest, files={p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
                                        for p in sorted(tmp.iterdir()) if p.is_file()})
        (tmp / MANIFEST).write_text(json.dumps(written, indent=2, sort_keys=True), encoding="utf-8")

    publish_folder(folder, build_with_manifest)
    return CacheEntry(folder, written)


def publish_folder(folder: Path, build: Callable[[Path], None]) -> None:
    """Run `build(tmpdir)` in a temporary sibling of `folder`, then rename it to `folder`: a reader sees the
    old folder or the whole new one, and an interrupted build is never taken for a result. An existing
    `folder` is moved aside first, then dropped."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        build(tmp)
        if folder.exists():  # stale: move it aside first, then drop it
            stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}")
            os.replace(folder, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
