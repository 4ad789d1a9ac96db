"""Mapping a source schema onto csra's columns (Bitext, instruction JSONL, OpenAI chat logs, or a
``column_mapping``)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from csra.jobctx import JobError

CSRA_COLUMNS = ("instruction", "input", "output", "intent", "category", "flags")
REQUIRED_COLUMNS = ("input", "output")
UNKNOWN = "unknown"


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
    out["instruction"] = fill_blank(out["instruction"], default_instruction)
    out["intent"] = fill_blank(out["intent"], UNKNOWN)
    out["category"] = fill_blank(out["category"], UNKNOWN)
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
            f"columns found: {names(columns)}"
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
        f"reply); columns found: {names(columns)}. Recognised layouts are Bitext "
        "(instruction, response, intent, category, flags) and instruction/input/output; for other "
        f"files set column_mapping, e.g. {example}"
    )


def names(columns: list[Any]) -> str:
    return ", ".join(str(c) for c in columns) or "(none)"


def _as_text(series: pd.Series) -> pd.Series:
    """Every value as a string; missing values (None, NaN) become ``""``."""
    return series.astype("str").fillna("")


def fill_blank(series: pd.Series, value: str) -> pd.Series:
    return series.where(series.str.strip() != "", value)


# --------------------------------------------------------------------------- cleaning
