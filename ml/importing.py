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

import codecs
import csv
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from csra.jobctx import JobContext, JobError
from csra.specs import ImportSpec

logger = logging.getLogger(__name__)

CSRA_COLUMNS = ("instruction", "input", "output", "intent", "category", "flags")
REQUIRED_COLUMNS = ("input", "output")
SPLITS = ("train", "validation", "test")
FORMATS = ("csv", "jsonl", "parquet")
UNKNOWN = "unknown"

_SUFFIX_FORMATS = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_HF_PATTERNS = ["*.csv", "*.jsonl", "*.json", "*.parquet"]
_HF_METADATA_FILES = {"dataset_info.json", "dataset_infos.json", "config.json"}
# A reply ending in one of these announces text that never came ("follow these steps:").
_LEAD_IN_CHARS = frozenset(":,;-\u2013\u2014([{&/")
# A reply without closing punctuation whose last word cannot end a sentence was cut short.
# (Only words that practically never end an English sentence: "help you with that" is complete.)
_DANGLING_WORDS = frozenset("a an the and or nor but your our my their its than because via per if".split())


@dataclass
class ImportResult:
    """The outcome of an import: the kept rows (with their split) and what happened to the rest."""

    rows: list[dict[str, str]]
    stats: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- format and reading


def detect_format(path: Path, declared: str | None) -> str:
    """The file format: ``declared`` when given, else from the file name's extension."""
    if declared:
        fmt = declared.strip().lower()
        if fmt not in FORMATS:
            raise JobError(f"unknown file format {declared!r}: use one of {', '.join(FORMATS)}")
        return fmt
    suffix = path.suffix.lower()
    if suffix in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[suffix]
    raise JobError(
        f"cannot tell the format of {path.name!r} from its extension {suffix or '(none)'!r}: "
        "name it .csv, .jsonl or .parquet, or set format to csv, jsonl or parquet"
    )


def read_table(path: Path, fmt: str) -> pd.DataFrame:
    """Read a data file; JobError (naming the line or byte) on an empty, undecodable or broken file."""
    if not path.is_file():
        raise JobError(f"file {path.name!r} does not exist")
    if path.stat().st_size == 0:
        raise JobError(f"file {path.name!r} is empty (0 bytes)")
    if fmt == "parquet":
        return _read_parquet(path)
    text = _read_utf8(path)
    if not text.strip():
        raise JobError(f"file {path.name!r} is empty (only whitespace)")
    if fmt == "csv":
        return _read_csv(text, path.name)
    if fmt == "jsonl":
        return _read_json(text, path.name)
    raise JobError(f"unknown file format {fmt!r}: use one of {', '.join(FORMATS)}")


def _read_utf8(path: Path) -> str:
    """The file's text; JobError with the byte offset and line of the first non-UTF-8 byte."""
    data = path.read_bytes()
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + skip
        line = data.count(b"\n", 0, offset) + 1
        raise JobError(
            f"file {path.name!r} is not UTF-8 text: invalid byte 0x{data[offset]:02x} at byte offset "
            f"{offset} (line {line}); save it as UTF-8 and upload it again"
        ) from None


def _read_csv(text: str, name: str) -> pd.DataFrame:
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        raise JobError(f"file {name!r} has no header row and no data") from None
    except (pd.errors.ParserError, csv.Error, ValueError) as exc:
        where = _locate_csv_problem(text) or str(exc).strip()
        raise JobError(f"could not parse CSV file {name!r}: {where}") from None


def _locate_csv_problem(text: str) -> str | None:
    """Find the physical line of a CSV problem (unclosed quote, wrong field count)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    last_line = 0
    try:
        header = next(reader)
        last_line = reader.line_num
        for record in reader:
            start, last_line = last_line + 1, reader.line_num
            if record and len(record) != len(header):
                return (
                    f"line {start}: expected {len(header)} fields (as in the header), found "
                    f"{len(record)}; check the quoting of that row"
                )
    except csv.Error as exc:
        if "end of data" in str(exc):
            return f"line {last_line + 1}: a quoted field starting there is never closed (broken quote)"
        return f"line {last_line + 1}: {exc} (broken quote)"
    return None


def _read_json(text: str, name: str) -> pd.DataFrame:
    """JSON Lines (one object per line), or a single JSON array of objects."""
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise JobError(f"invalid JSON in {name!r} on line {exc.lineno}: {exc.msg}") from None
        return _records_frame(records, name)
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JobError(
                f"invalid JSON in {name!r} on line {number}: {exc.msg} (column {exc.colno})"
            ) from None
        if not isinstance(record, dict):
            raise JobError(f"line {number} of {name!r} is not a JSON object: each line must be {{...}}")
        records.append(record)
    return pd.DataFrame.from_records(records)


def _records_frame(records: Any, name: str) -> pd.DataFrame:
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise JobError(f"{name!r} must be JSON Lines or a JSON array of objects")
    return pd.DataFrame.from_records(records)


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises many types (ArrowInvalid, OSError...)
        raise JobError(f"could not read Parquet file {path.name!r}: {exc}") from None


# --------------------------------------------------------------------------- Hugging Face


def download_hf_dataset(dataset_id: str, cache_dir: Path) -> Path:
    """Download a dataset's data files from the Hugging Face Hub; return the main one.

    The main file is the first, in path order, whose name mentions ``train``, else the first
    data file (Parquet before CSV before JSONL before JSON). Respects ``HF_HUB_OFFLINE``.
    """
    from huggingface_hub import constants, snapshot_download

    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", dataset_id or ""):
        raise JobError(f"{dataset_id!r} is not a Hugging Face dataset id (expected owner/name)")
    try:
        folder = snapshot_download(
            dataset_id,
            repo_type="dataset",
            cache_dir=cache_dir,
            allow_patterns=_HF_PATTERNS,
            etag_timeout=5,
            local_files_only=bool(constants.HF_HUB_OFFLINE),
        )
    except Exception as exc:  # network, unknown repo, gated repo, offline cache miss...
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise JobError(f"could not download Hugging Face dataset {dataset_id}: {reason[:500]}") from None
    return _main_data_file(Path(str(folder)), dataset_id)


def _main_data_file(folder: Path, dataset_id: str) -> Path:
    rank = {".parquet": 0, ".csv": 1, ".jsonl": 2, ".json": 3}
    files = [
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in rank and p.name not in _HF_METADATA_FILES
    ]
    if not files:
        raise JobError(f"Hugging Face dataset {dataset_id} has no CSV, JSONL or Parquet file")
    files.sort(key=lambda p: ("train" not in p.name.lower(), rank[p.suffix.lower()], str(p)))
    return files[0]


# --------------------------------------------------------------------------- columns


def normalise_columns(df: pd.DataFrame, mapping: dict[str, str], default_instruction: str) -> pd.DataFrame:
    """Map the source columns onto :data:`CSRA_COLUMNS` (all text, no missing values but ``""``).

    Recognised layouts (column names matched case-insensitively):

    * Bitext ``flags, instruction, category, intent, response``: its ``instruction`` is the
      customer message, so ``input = instruction``, ``output = response`` and the agent
      instruction is ``default_instruction``;
    * instruction data ``instruction, input, output`` (instruction = agent instruction,
      input = customer message); a missing or empty instruction becomes ``default_instruction``.

    * chat logs ``messages`` (the OpenAI chat fine-tuning format that ``GET /chats/export``
      writes): every user turn followed by an assistant turn becomes one row, the system
      message (if any) its instruction.

    An explicit ``mapping`` (csra column -> source column) wins over both. ``intent`` and
    ``category`` default to ``"unknown"``, ``flags`` to ``""``.
    """
    if not mapping and "messages" in [str(c).strip().lower() for c in df.columns]:
        df = chat_rows(df[next(c for c in df.columns if str(c).strip().lower() == "messages")], default_instruction)
    sources = _resolve_sources(list(df.columns), mapping)
    missing = [col for col in REQUIRED_COLUMNS if col not in sources]
    if missing:
        raise JobError(_missing_columns_message(missing, list(df.columns)))
    out = pd.DataFrame(index=df.index)
    for col in CSRA_COLUMNS:
        out[col] = _as_text(df[sources[col]]) if col in sources else ""
    out["instruction"] = _fill_blank(out["instruction"], default_instruction)
    out["intent"] = _fill_blank(out["intent"], UNKNOWN)
    out["category"] = _fill_blank(out["category"], UNKNOWN)
    return out.reset_index(drop=True)


def chat_rows(messages: pd.Series, default_instruction: str) -> pd.DataFrame:
    """One (instruction, input, output) row per user -> assistant pair of each chat."""
    rows = []
    for line, chat in enumerate(messages, start=1):
        if not isinstance(chat, list | np.ndarray):
            raise JobError(f"line {line}: 'messages' must be a list of {{role, content}} objects")
        system, last_user = default_instruction, None
        for m in chat:
            role, content = (m or {}).get("role"), str((m or {}).get("content") or "")
            if role == "system" and content.strip():
                system = content
            elif role == "user":
                last_user = content
            elif role == "assistant" and last_user is not None:
                rows.append({"instruction": system, "input": last_user, "output": content})
                last_user = None
    return pd.DataFrame(rows, columns=["instruction", "input", "output"])


def _resolve_sources(columns: list[Any], mapping: dict[str, str]) -> dict[str, Any]:
    """csra column -> source column: the explicit mapping first, then the recognised layouts."""
    by_name = {str(c).strip().lower(): c for c in columns}
    unknown = sorted(set(mapping) - set(CSRA_COLUMNS))
    if unknown:
        raise JobError(
            f"column_mapping names unknown csra column(s) {', '.join(unknown)}; "
            f"known: {', '.join(CSRA_COLUMNS)}"
        )
    absent = sorted(src for src in mapping.values() if src not in columns and src.lower() not in by_name)
    if absent:
        raise JobError(
            f"column_mapping refers to column(s) {', '.join(absent)} that the file does not have; "
            f"columns found: {_names(columns)}"
        )
    sources = {dst: (src if src in columns else by_name[src.lower()]) for dst, src in mapping.items()}
    claimed = set(sources.values())
    for dst, src in _layout_defaults(by_name).items():
        if dst not in sources and src in by_name and by_name[src] not in claimed:
            sources[dst] = by_name[src]
            claimed.add(by_name[src])
    return sources


def _layout_defaults(by_name: dict[str, Any]) -> dict[str, str]:
    """csra column -> lower-case source name for the detected layout."""
    optional = {"intent": "intent", "category": "category", "flags": "flags"}
    is_bitext = "response" in by_name and "output" not in by_name and "input" not in by_name
    if is_bitext:
        return {"input": "instruction", "output": "response", **optional}
    return {"instruction": "instruction", "input": "input", "output": "output", **optional}


def _missing_columns_message(missing: list[str], columns: list[Any]) -> str:
    example = json.dumps({"input": "<customer message column>", "output": "<agent reply column>"})
    return (
        f"missing required column(s): {', '.join(missing)} (input = customer message, output = agent "
        f"reply); columns found: {_names(columns)}. Recognised layouts are Bitext "
        "(instruction, response, intent, category, flags) and instruction/input/output; for other "
        f"files set column_mapping, e.g. {example}"
    )


def _names(columns: list[Any]) -> str:
    return ", ".join(str(c) for c in columns) or "(none)"


def _as_text(series: pd.Series) -> pd.Series:
    """Every value as a string; missing values (None, NaN) become ``""``."""
    return series.astype("str").fillna("")


def _fill_blank(series: pd.Series, value: str) -> pd.Series:
    return series.where(series.str.strip() != "", value)


# --------------------------------------------------------------------------- cleaning


def clean(
    df: pd.DataFrame, min_message_chars: int, min_reply_chars: int
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Clean normalised rows; return the kept rows and how many rows each step changed or removed.

    Steps, in order (each ``removed_*`` count is rows that step dropped):

    1. whitespace: every run of whitespace (newlines included) in every column becomes one
       space and the ends are stripped (``whitespace_normalised`` = rows changed); this also
       makes the exact and the already-collapsed Bitext rows consistent;
    2. ``removed_missing``: empty customer message (``input``) or reply (``output``);
    3. ``removed_exact_duplicates``: same instruction, input and output as an earlier row;
    4. ``removed_too_short``: message shorter than ``min_message_chars`` or reply shorter than
       ``min_reply_chars`` characters;
    5. ``removed_incomplete``: a message or reply with unbalanced ``{{``/``}}`` placeholder
       braces (a broken placeholder such as ``{Cancel Order}}``), or a reply that was cut
       short: it ends with a lead-in character (``:`` ``,`` ``;`` a dash, an opening bracket,
       ``&`` or ``/``, e.g. "follow these steps:" with no steps) or, lacking closing
       punctuation, ends on a word that cannot end a sentence ("the", "and", "your", ...).
       A reply that merely lacks a final full stop ("Best regards, the Support Team") is kept.
    """
    stats: dict[str, int] = {"rows_read": len(df)}
    df, stats["whitespace_normalised"] = _normalise_whitespace(df)
    df = _drop(df, (df["input"] == "") | (df["output"] == ""), "removed_missing", stats)
    dupes = df.duplicated(subset=["instruction", "input", "output"], keep="first")
    df = _drop(df, dupes, "removed_exact_duplicates", stats)
    short = (df["input"].str.len() < min_message_chars) | (df["output"].str.len() < min_reply_chars)
    df = _drop(df, short, "removed_too_short", stats)
    df = _drop(df, incomplete_mask(df), "removed_incomplete", stats)
    stats["rows_kept"] = len(df)
    return df.reset_index(drop=True), stats


def _normalise_whitespace(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    out = df.copy()
    changed = pd.Series(False, index=df.index)
    for col in CSRA_COLUMNS:
        out[col] = collapse_whitespace(out[col])
        changed |= out[col] != df[col]
    out["intent"] = _fill_blank(out["intent"], UNKNOWN)
    out["category"] = _fill_blank(out["category"], UNKNOWN)
    return out, int(changed.sum())


def collapse_whitespace(text: pd.Series) -> pd.Series:
    """Every whitespace run (newlines, tabs, non-breaking spaces) as one space, ends stripped."""
    values = [" ".join(v.split()) if isinstance(v, str) else "" for v in text]
    return pd.Series(values, index=text.index, dtype="str")


def _drop(df: pd.DataFrame, mask: pd.Series, key: str, stats: dict[str, int]) -> pd.DataFrame:
    stats[key] = int(mask.sum())
    return df[~mask]


def incomplete_mask(df: pd.DataFrame) -> pd.Series:
    """Rows whose reply was cut short or whose placeholders are broken (see :func:`clean`)."""
    reply = df["output"]
    broken = _unbalanced_placeholders(reply) | _unbalanced_placeholders(df["input"])
    lead_in = reply.str[-1:].isin(_LEAD_IN_CHARS)
    last_word = reply.str.rsplit(" ", n=1).str[-1].str.lower()
    dangling = last_word.isin(_DANGLING_WORDS)
    return broken | lead_in | dangling


def _unbalanced_placeholders(text: pd.Series) -> pd.Series:
    return text.str.count(r"\{\{") != text.str.count(r"\}\}")


# --------------------------------------------------------------------------- splitting


def message_key(messages: pd.Series) -> pd.Series:
    """The leakage key of a customer message: lower-cased, whitespace collapsed and stripped."""
    return collapse_whitespace(messages.str.lower())


def split(df: pd.DataFrame, fractions: tuple[float, float, float], seed: int) -> pd.DataFrame:
    """Add a ``split`` column: a seeded, group-aware split stratified by intent.

    Rows with the same :func:`message_key` form a group and always share a split; a group's
    intent is its most frequent one. Within each intent the groups are shuffled (seeded) and
    cut so that row counts follow ``fractions`` (train, validation, test). An intent with at
    least one group per non-zero split gets at least one validation and one test group;
    intents with fewer groups go to train only. The result depends on the rows and the
    seed, not on the row order.
    """
    _check_fractions(fractions)
    out = df.copy()
    if out.empty:
        out["split"] = pd.Series(dtype="str")
        return out
    codes, _ = pd.factorize(message_key(out["input"]), sort=True)
    sizes = np.bincount(codes)
    intents = _group_intents(codes, out["intent"])
    rank = np.empty(len(sizes), dtype=np.int64)
    rank[np.random.default_rng(seed).permutation(len(sizes))] = np.arange(len(sizes))
    assigned = np.zeros(len(sizes), dtype=np.int64)
    for intent in sorted(set(intents)):
        groups = np.flatnonzero(intents == intent)
        groups = groups[np.argsort(rank[groups], kind="stable")]
        assigned[groups] = _allocate(sizes[groups], fractions)
    out["split"] = np.asarray(SPLITS, dtype=object)[assigned[codes]]
    return out


def _check_fractions(fractions: tuple[float, float, float]) -> None:
    if len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise JobError(
            f"split fractions must be (train > 0, validation >= 0, test >= 0) adding up to 1, not {fractions}"
        )


def _group_intents(codes: np.ndarray, intents: pd.Series) -> np.ndarray:
    """The most frequent intent of each group (ties: the alphabetically first)."""
    frame = pd.DataFrame({"g": codes, "intent": intents.fillna(UNKNOWN).to_numpy()})
    counts = frame.value_counts().reset_index(name="n")
    counts = counts.sort_values(["g", "n", "intent"], ascending=[True, False, True])
    return counts.drop_duplicates("g").sort_values("g")["intent"].to_numpy()


def _allocate(sizes: np.ndarray, fractions: tuple[float, float, float]) -> np.ndarray:
    """Split ids (0 train, 1 validation, 2 test) for one intent's groups, in shuffled order.

    A group goes to validation / test when the middle of its row span falls in the first
    ``validation`` / next ``test`` fraction of the intent's rows; the rest go to train.
    """
    _, f_val, f_test = fractions
    n = len(sizes)
    middle = (np.cumsum(sizes) - sizes / 2) / sizes.sum()
    n_val = int((middle < f_val).sum())
    n_test = int((middle < f_val + f_test).sum()) - n_val
    if n >= 1 + (f_val > 0) + (f_test > 0):
        n_val = max(n_val, 1) if f_val > 0 else 0
        n_test = max(n_test, 1) if f_test > 0 else 0
        while n_val + n_test >= n:
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
    else:
        n_val = n_test = 0
    return np.repeat([1, 2, 0], [n_val, n_test, n - n_val - n_test])


def split_stats(df: pd.DataFrame) -> dict[str, Any]:
    """Rows per split, and per split per intent and per category."""
    return {
        "split_rows": {s: int((df["split"] == s).sum()) for s in SPLITS},
        "split_intents": _per_split(df, "intent"),
        "split_categories": _per_split(df, "category"),
    }


def _per_split(df: pd.DataFrame, column: str) -> dict[str, dict[str, int]]:
    return {
        s: {str(k): int(v) for k, v in df.loc[df["split"] == s, column].value_counts().sort_index().items()}
        for s in SPLITS
    }


# --------------------------------------------------------------------------- the job


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
        raise JobError(f"file {path.name!r} has no rows (columns found: {_names(list(raw.columns))})")
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
