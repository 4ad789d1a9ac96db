"""Cleaning as the original design did, counting what each step removed: whitespace, missing values,
exact duplicates, too-short and incomplete rows."""

from __future__ import annotations

import pandas as pd

from ml.importing.columns import CSRA_COLUMNS, UNKNOWN, fill_blank

# A reply ending in one of these announces text that never came ("follow these steps:").
_LEAD_IN_CHARS = frozenset(":,;-\u2013\u2014([{&/")
# A reply without closing punctuation whose last word cannot end a sentence was cut short.
# (Only words that practically never end an English sentence: "help you with that" is complete.)
_DANGLING_WORDS = frozenset("a an the and or nor but your our my their its than because via per if".split())


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
    out["intent"] = fill_blank(out["intent"], UNKNOWN)
    out["category"] = fill_blank(out["category"], UNKNOWN)
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
