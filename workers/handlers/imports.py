"""The import job: read a file, clean and split it, store the examples (ready only once all are stored)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import delete, insert

from csra.jobctx import JobContext, JobError
from csra.settings import get_settings
from csra.specs import ImportSpec
from db.models import Dataset, DatasetExample, DatasetStatus
from db.session import session_scope
from ml import importing

logger = logging.getLogger(__name__)
STORE_CHUNK = 2000


def resolve_source(source: str, work_dir: Path) -> Path:
    """``upload:<path>`` / ``file:<path>`` / ``hf:<dataset id>`` -> a local file to read."""
    scheme, _, value = source.partition(":")
    settings = get_settings()
    if scheme == "hf":
        return importing.download_hf_dataset(value, settings.data_dir / "hf-cache")
    if scheme not in ("upload", "file"):
        raise JobError(f"unknown dataset source {source!r}")
    path = Path(value).resolve()
    # an upload is read from the uploads folder only; a typed path from the import folders only (the
    # API checked both when the job was created; checked again in case the stored row was altered)
    allowed = path.is_relative_to(settings.uploads_dir) if scheme == "upload" else settings.importable(path)
    if not allowed:
        raise JobError(f"{path.name!r} is outside the allowed import folders (see CSRA_IMPORT_ROOTS)")
    if not path.is_file():
        raise JobError(f"dataset file {path.name!r} does not exist (or is not a file)")
    return path


def count_tokens(rows: list[dict[str, Any]], ctx: JobContext) -> dict[str, Any] | None:
    """Each row's prompt and reply tokens (set on the rows) and their sums per split, counted with the
    default base model's tokenizer; None (and a log line) when it is not available.

    What training estimates divide by a measured throughput; a base model with another tokenizer is
    estimated with these counts too (the estimate names the tokenizer it counted with).
    """
    from ml.training.tokens import example_token_counts
    from models_store.loading import load_tokenizer
    from models_store.registry import ensure_baseline_registered

    name = get_settings().baseline_name
    ctx.progress(0.85, f"counting tokens ({name}'s tokenizer)")
    try:  # registered by `csra up` / `csra models init`; a deployment without them converts it once here
        tokenizer, arch = load_tokenizer(ensure_baseline_registered()["path"])
        counts = example_token_counts(tokenizer, arch, rows)
    except (JobError, ValueError, OSError) as exc:
        logger.warning("token counts of %d rows skipped: %s", len(rows), exc)  # the job log shows no server path
        ctx.event("log", f"token counts skipped: the tokenizer of the default base model {name!r} could not be "
                         "used; training estimates for this dataset will have no token counts")
        return None
    splits: dict[str, dict[str, int]] = {}
    for row, (prompt, reply) in zip(rows, counts, strict=True):
        row["prompt_tokens"], row["reply_tokens"] = prompt, reply
        split = splits.setdefault(row["split"], {"rows": 0, "prompt_tokens": 0, "reply_tokens": 0})
        split["rows"] += 1
        split["prompt_tokens"] += prompt
        split["reply_tokens"] += reply
    return {"tokenizer": name, "splits": splits}


def handle_import(job_id: int, params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    dataset_id = int(params["dataset_id"])
    with session_scope() as s:
        ds = s.get(Dataset, dataset_id)
        if ds is None:
            raise JobError(f"dataset {dataset_id} was deleted before its import ran")
        source, options = ds.source, dict(ds.options or {})
    # a failed or cancelled import leaves its dataset failed with no examples: db.jobs.finish settles it
    return _import(dataset_id, source, ImportSpec.model_validate(options), ctx)


def _import(dataset_id: int, source: str, spec: ImportSpec, ctx: JobContext) -> dict[str, Any]:
    settings = get_settings()
    ctx.progress(0.02, "resolving source")
    path = resolve_source(source, ctx.work_dir)
    result = importing.import_dataset(
        path,
        spec,
        ctx,
        min_message_chars=spec.min_message_chars if spec.min_message_chars is not None else settings.min_message_chars,
        min_reply_chars=spec.min_reply_chars if spec.min_reply_chars is not None else settings.min_reply_chars,
    )
    ctx.check_cancelled()
    ctx.progress(0.9, f"storing {len(result.rows)} examples")
    cols = ("split", "instruction", "input", "output", "intent", "category", "flags")
    rows = [{"dataset_id": dataset_id, **{c: str(r.get(c) or "") for c in cols}} for r in result.rows]
    tokens = count_tokens(rows, ctx)
    if tokens is not None:
        result.stats["tokens"] = tokens
    with session_scope() as s:  # what an interrupted earlier attempt stored
        s.execute(delete(DatasetExample).where(DatasetExample.dataset_id == dataset_id))
    # In chunks, each its own short transaction: one huge insert would hold SQLite's write lock for
    # seconds, and every job's heartbeat (a write) would wait behind it until jobs looked dead. The
    # dataset turns "ready" only in the last transaction; until then no reader uses its examples.
    for start in range(0, len(rows), STORE_CHUNK):
        ctx.check_cancelled()
        with session_scope() as s:
            s.execute(insert(DatasetExample), rows[start: start + STORE_CHUNK])
        ctx.progress(0.9 + 0.09 * min(start + STORE_CHUNK, len(rows)) / len(rows), "storing examples")
    with session_scope() as s:
        ds = s.get(Dataset, dataset_id)
        if ds is None:
            raise JobError(f"dataset {dataset_id} was deleted while importing")
        ds.status = DatasetStatus.READY.value
        ds.stats = result.stats
        ds.row_count = len(rows)
        ds.error = None
    return {"dataset_id": dataset_id, "rows": len(rows), "stats": result.stats}
