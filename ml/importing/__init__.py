"""Dataset import: turn a raw CSV / JSONL / Parquet file into cleaned, split support rows.

The import job calls :func:`import_dataset`; the steps are also public so they can be tested
and reused on their own:

1. :func:`detect_format` -- csv, jsonl or parquet, from the declared format or the file name;
2. :func:`read_table` -- read every cell as text, with errors a person can act on (which
   line, which byte);
3. :func:`normalise_columns` -- map the source schema onto :data:`CSRA_COLUMNS`;
4. :func:`clean` -- whitespace, missing values, duplicates, too-short and incomplete rows,
   counting what each step removed;
5. :func:`split` -- a seeded, intent-stratified train/validation/test split that keeps every
   copy of the same customer message in one split (no leakage).

Plain Python and pandas only: no Celery, no database, no torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csra.jobctx import JobContext, JobError
from csra.specs import ImportSpec
from ml.importing.clean import clean, collapse_whitespace, incomplete_mask, message_key
from ml.importing.columns import CSRA_COLUMNS, REQUIRED_COLUMNS, chat_rows, names, normalise_columns
from ml.importing.read import FORMATS, detect_format, download_hf_dataset, read_table
from ml.importing.split import SPLITS, split, split_stats

__all__ = ["CSRA_COLUMNS", "FORMATS", "REQUIRED_COLUMNS", "SPLITS", "ImportResult", "chat_rows", "clean",
           "collapse_whitespace", "detect_format", "download_hf_dataset", "import_dataset", "incomplete_mask",
           "message_key", "normalise_columns", "read_table", "split", "split_stats"]

logger = logging.getLogger(__name__)


@dataclass
class ImportResult:
    """The outcome of an import: the kept rows (with their split) and what happened to the rest."""

    rows: list[dict[str, str]]
    stats: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- format and reading


def import_dataset(
    path: Path, spec: ImportSpec, ctx: JobContext, min_message_chars: int, min_reply_chars: int
) -> ImportResult:
    """Detect, read, normalise, clean and split ``path``; report progress and honour cancellation.

    ``spec.min_message_chars`` / ``spec.min_reply_chars``, when set, win over the given
    thresholds (the settings' defaults). Progress stays within 0.05-0.85: the caller reports
    storing the rows and completion. ``stats`` is JSON-serialisable.
    """
    min_message = spec.min_message_chars if spec.min_message_chars is not None else min_message_chars
    min_reply = spec.min_reply_chars if spec.min_reply_chars is not None else min_reply_chars
    _stage(ctx, 0.05, "detecting format")
    fmt = detect_format(path, spec.format)
    _stage(ctx, 0.1, f"reading {fmt}")
    raw = read_table(path, fmt)
    if raw.empty:
        raise JobError(f"file {path.name!r} has no rows (columns found: {names(list(raw.columns))})")
    _stage(ctx, 0.4, "mapping columns")
    rows = normalise_columns(raw, spec.column_mapping, spec.default_instruction)
    _stage(ctx, 0.5, "cleaning")
    cleaned, clean_stats = clean(rows, min_message, min_reply)
    if cleaned.empty:
        raise JobError(_nothing_left_message(clean_stats))
    _stage(ctx, 0.75, "splitting")
    fractions = (spec.train_fraction, spec.validation_fraction, spec.test_fraction)
    done = split(cleaned, fractions, spec.seed)
    ctx.check_cancelled()
    stats: dict[str, Any] = {
        **clean_stats,
        "format": fmt,
        "message_groups": int(message_key(done["input"]).nunique()),
        **split_stats(done),
    }
    _log_summary(ctx, stats)
    ctx.progress(0.85, "cleaned and split")
    return ImportResult(rows=done[[*CSRA_COLUMNS, "split"]].to_dict("records"), stats=stats)


def _stage(ctx: JobContext, fraction: float, stage: str) -> None:
    ctx.check_cancelled()
    ctx.progress(fraction, stage)


def _nothing_left_message(stats: dict[str, int]) -> str:
    removed = ", ".join(
        f"{v} by {k.removeprefix('removed_').replace('_', ' ')}"
        for k, v in stats.items()
        if k.startswith("removed_") and v
    )
    return f"no usable rows after cleaning: all {stats['rows_read']} rows read were removed ({removed})"


def _log_summary(ctx: JobContext, stats: dict[str, Any]) -> None:
    removed = {k: v for k, v in stats.items() if k.startswith("removed_")}
    message = (
        f"kept {stats['rows_kept']} of {stats['rows_read']} rows "
        f"(train {stats['split_rows']['train']}, validation {stats['split_rows']['validation']}, "
        f"test {stats['split_rows']['test']})"
    )
    ctx.event("log", message, **removed, whitespace_normalised=stats["whitespace_normalised"])
