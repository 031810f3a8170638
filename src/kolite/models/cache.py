"""The converted-graph cache: one folder per model, revision and precision, written atomically.

A conversion takes minutes on a Pi, so its result is kept and reused; a manifest records what it was
made from (a cheap source fingerprint, kolite's graph version, onnx/onnxruntime versions), and any
difference means the entry is stale and is rebuilt. Entries appear by a single rename, so a crash or
a second process never leaves a half-written graph that a later start would trust.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
GRAPH = "model.onnx"


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
    """The entry at `folder` if its manifest matches every key of `expected`, else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not (folder / GRAPH).is_file():
        return None
    if any(manifest.get(k) != v for k, v in expected.items()):
        return None
    for name, size in manifest.get("files", {}).items():  # a deleted or truncated weights file
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return None
    return CacheEntry(folder, manifest)


def write_entry(folder: Path, manifest: dict, build: Callable[[Path], None]) -> CacheEntry:
    """Run `build(tmpdir)` (it must write `model.onnx` there), add the manifest, then publish by rename."""
    written: dict = {}

    def build_with_manifest(tmp: Path) -> None:
        build(tmp)
        if not (tmp / GRAPH).is_file():
            raise RuntimeError("conversion produced no graph")
        written.update(manifest, files={p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()})
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
