"""Reading a raw file: its format, every cell as text, errors a person can act on (which line, which
byte), and Hugging Face datasets where the hub is reachable."""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import pandas as pd

from csra.jobctx import JobError

logger = logging.getLogger(__name__)

FORMATS = ("csv", "jsonl", "parquet")
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
