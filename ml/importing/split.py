"""A seeded, intent-stratified train/validation/test split that keeps every copy of the same
customer message in one split (no leakage)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from csra.jobctx import JobError
from ml.importing.clean import message_key
from ml.importing.columns import UNKNOWN

SPLITS = ("train", "validation", "test")


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
