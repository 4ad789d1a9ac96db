"""This host's copies of the shared store's models: the data dir's ``models`` folder as a bounded cache.

Used only when ``CSRA_MODEL_STORE_URL`` is set. Each copy has a marker ``models/.cache/<name>.json``
(content hash, publication, size, where it came from); the marker's mtime is the copy's last use.
A model this host lacks is fetched (verified) on first use; beyond ``CSRA_MODEL_CACHE_GB`` the least
recently used copies of published models are removed, never the one being used now, one used in
the last ``IN_USE_SECONDS`` (another process of this host may be loading it) or one with a GGUF export
the store lacks (made here before the store held exports: it exists only here). A model's published
exports are fetched with it when llama.cpp is to serve it (``local_exports``). Copies of models no
longer registered (deleted on another host) are removed by ``prune``. Torch-free (the API removes its
host's copy when it deletes a model).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from csra.specs import EXPORTS_DIR
from models_store.naming import gguf_exports, model_dir
from models_store.remote import RemoteStore, content_hash

logger = logging.getLogger(__name__)

CACHE_DIR = ".cache"
IN_USE_SECONDS = 120.0
PRUNE_EVERY_SECONDS = 60.0
EVICTABLE = ("published", "fetched")  # the store has them: they can be fetched again

_last_prune = 0.0


@dataclass
class Entry:
    name: str
    content_hash: str | None
    publish_id: str | None
    size_bytes: int
    source: str  # "published" (made here) or "fetched" (from the store); anything else is never evicted
    last_used: float


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl`` lock on ``path`` (blocks until the other holder is done)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _marker(store_dir: Path, name: str) -> Path:
    return Path(store_dir) / CACHE_DIR / f"{name}.json"


def read_entry(store_dir: Path, name: str) -> Entry | None:
    path = _marker(store_dir, name)
    try:
        data = json.loads(path.read_text())
        return Entry(name=name, content_hash=data.get("content_hash"), publish_id=data.get("publish_id"),
                     size_bytes=int(data.get("size_bytes") or 0), source=str(data.get("source")),
                     last_used=path.stat().st_mtime)
    except (OSError, ValueError):
        return None


def write_entry(store_dir: Path, name: str, *, content_hash: str | None, publish_id: str | None, source: str,
                size_bytes: int | None = None) -> None:
    """Mark ``models/<name>`` as a cache copy (atomically: a reader sees the old marker or the new one)."""
    folder = model_dir(store_dir, name)
    if size_bytes is None:
        size_bytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    path = _marker(store_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps({"content_hash": content_hash, "publish_id": publish_id, "source": source,
                               "size_bytes": size_bytes}))
    os.replace(tmp, path)


def entries(store_dir: Path) -> list[Entry]:
    folder = Path(store_dir) / CACHE_DIR
    if not folder.is_dir():
        return []
    found = (read_entry(store_dir, p.stem) for p in folder.glob("*.json") if not p.name.startswith("."))
    return [e for e in found if e is not None]


def remove(store_dir: Path, name: str) -> bool:
    """Remove this host's copy of ``name`` and its marker. The folder is renamed away first, so no
    reader ever finds a half-deleted model under the model's name."""
    folder = model_dir(store_dir, name)
    existed = folder.exists()
    if existed:
        trash = folder.with_name(f".{name}.trash-{uuid.uuid4().hex[:8]}")
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
    _marker(store_dir, name).unlink(missing_ok=True)
    return existed


def _stored_marker(gguf: Path) -> Path:
    return gguf.with_name(f".{gguf.name}.stored")


def mark_stored(gguf: Path) -> None:
    """Record that the store has this export (published from here, or fetched from it)."""
    _stored_marker(gguf).touch()


def _only_here(folder: Path) -> bool:
    """Whether the model folder holds a GGUF export that the store does not have."""
    return any(not _stored_marker(p).exists() for p in gguf_exports(folder))


def _busy(entry: Entry, store_dir: Path, keep: set[str], now: float) -> bool:
    return (entry.name in keep or now - entry.last_used < IN_USE_SECONDS
            or _only_here(model_dir(store_dir, entry.name)))


def evict(store_dir: Path, bound_bytes: int, keep: set[str], now: float | None = None) -> list[str]:
    """Remove least recently used copies of published models until the copies fit in ``bound_bytes``."""
    now = time.time() if now is None else now
    with file_lock(Path(store_dir) / CACHE_DIR / ".evict.lock"):
        cached = sorted(entries(store_dir), key=lambda e: e.last_used)
        total = sum(e.size_bytes for e in cached)
        removed = []
        for entry in cached:
            if total <= bound_bytes:
                break
            if entry.source not in EVICTABLE or _busy(entry, store_dir, keep, now):
                continue
            remove(store_dir, entry.name)
            total -= entry.size_bytes
            removed.append(entry.name)
            logger.info("model cache: removed the local copy of %s (least recently used; CSRA_MODEL_CACHE_GB)",
                        entry.name)
    if total > bound_bytes:
        logger.warning("model cache: %.1f GB of models in use exceed CSRA_MODEL_CACHE_GB (%.1f GB)",
                       total / 1024**3, bound_bytes / 1024**3)
    return removed


def prune(store_dir: Path, registered: dict[str, str | None], now: float | None = None) -> list[str]:
    """Remove copies of models that are no longer registered (``registered``: name -> content hash), or
    whose name now belongs to another model; a copy used in the last ``IN_USE_SECONDS`` waits."""
    now = time.time() if now is None else now
    removed = []
    for entry in entries(store_dir):
        if entry.name in registered and registered[entry.name] in (None, entry.content_hash):
            continue
        if now - entry.last_used < IN_USE_SECONDS:
            continue
        remove(store_dir, entry.name)
        removed.append(entry.name)
        logger.info("model cache: removed the local copy of %s (the model was deleted)", entry.name)
    return removed


def prune_if_due(store_dir: Path, registered: Callable[[], dict[str, str | None]]) -> None:
    """``prune`` at most every ``PRUNE_EVERY_SECONDS`` per process (best effort)."""
    global _last_prune
    now = time.monotonic()
    if now - _last_prune < PRUNE_EVERY_SECONDS:
        return
    _last_prune = now
    try:
        prune(store_dir, registered())
    except Exception:  # noqa: BLE001 - a failed clean-up must not fail a job
        logger.warning("model cache: pruning deleted models failed", exc_info=True)


def _usable(entry: Entry | None, folder: Path, expected_hash: str | None) -> bool:
    return (entry is not None and folder.is_dir() and (folder / "config.json").is_file()
            and (expected_hash is None or entry.content_hash == expected_hash))


def local_copy(store: RemoteStore, store_dir: Path, name: str, expected_hash: str | None,
               bound_bytes: int) -> Path:
    """The folder of model ``name`` on this host, fetched from ``store`` (verified) when missing or stale.

    Fast when the copy is there (a marker read and a touch). Raises ``ModelHashMismatch`` (refused,
    nothing kept), ``ModelNotPublished`` or ``ModelStoreError`` (the store is gone: retry later).
    """
    store_dir = Path(store_dir)
    folder = model_dir(store_dir, name)
    entry = read_entry(store_dir, name)
    if _usable(entry, folder, expected_hash):
        os.utime(_marker(store_dir, name))
        return folder
    with file_lock(store_dir / CACHE_DIR / f".{name}.lock"):  # one download per host, not one per process
        entry = read_entry(store_dir, name)
        if _usable(entry, folder, expected_hash):
            os.utime(_marker(store_dir, name))
            return folder
        if entry is None and _adopt(store, store_dir, name, folder, expected_hash):
            return folder
        tmp = store_dir / f".{name}.fetch-{uuid.uuid4().hex[:8]}"
        logger.info("fetching model %s from the model store %s", name, store.shown)
        manifest = store.fetch(name, tmp, expected_hash)
        if folder.exists():  # an older model of the same name, or an unverified leftover
            remove(store_dir, name)
        os.replace(tmp, folder)
        write_entry(store_dir, name, content_hash=manifest["content_hash"], publish_id=manifest["publish_id"],
                    source="fetched", size_bytes=int(manifest.get("size_bytes") or 0))
    evict(store_dir, bound_bytes, keep={name})
    return folder


def _adopt(store: RemoteStore, store_dir: Path, name: str, folder: Path, expected_hash: str | None) -> bool:
    """A folder without a marker (made here before ``CSRA_MODEL_STORE_URL`` was set, or a data dir copied
    from another host) is kept when its weights hash to the registry's content hash; the store gets it
    too if it lacks it, so every other host can fetch it from then on."""
    if expected_hash is None or not (folder / "config.json").is_file() or content_hash(folder) != expected_hash:
        return False
    manifest = store.manifest(name)
    if manifest is None or manifest.get("content_hash") != expected_hash:
        manifest = store.publish(name, folder, expected_hash)
    write_entry(store_dir, name, content_hash=expected_hash, publish_id=manifest.get("publish_id"),
                source="published")
    return True


def local_exports(store: RemoteStore, folder: Path, name: str, expected_hash: str | None) -> list[Path]:
    """Fetch into this host's copy (``folder``) the published GGUF exports of model ``name`` that it lacks
    (verified against their sha256; one download per host at a time). Returns the files fetched."""
    fetched = []
    for file, record in store.exports(name, expected_hash).items():
        dest = folder / EXPORTS_DIR / file
        if dest.is_file():
            continue
        with file_lock(folder.parent / CACHE_DIR / f".{name}.exports.lock"):
            if dest.is_file():
                continue
            logger.info("fetching %s of model %s from the model store %s", file, name, store.shown)
            store.fetch_export(name, record, dest)
            mark_stored(dest)
            fetched.append(dest)
    return fetched
