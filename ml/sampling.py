"""Samples that represent the data: seeded draws stratified by intent.

Datasets are often stored sorted by intent (Bitext is), so a sample must never be a slice: the
first 2,400 training rows of the development copy hold 3 of its 27 intents. Every sample csra
takes (training rows, validation rows for the loss, evaluation examples) comes from here.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

Row = TypeVar("Row", bound=Mapping[str, Any])


def stratum_quotas(sizes: Mapping[str, int], n: int) -> dict[str, int]:
    """How many of ``n`` draws each stratum gets: proportional to its size, exactly ``n`` in all.

    Largest-remainder rounding (ties broken by name, so the result is deterministic); every stratum
    gets at least one draw when ``n`` is at least the number of strata, taken from the largest quotas.
    """
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    exact = {k: n * v / total for k, v in sizes.items()}
    quotas = {k: math.floor(x) for k, x in exact.items()}
    by_remainder = sorted(sizes, key=lambda k: (-(exact[k] - quotas[k]), k))
    for k in by_remainder[: n - sum(quotas.values())]:
        quotas[k] += 1
    if n >= len(sizes):
        for k in sorted(sizes):
            if quotas[k] == 0 and sizes[k] > 0:
                donor = max(quotas, key=lambda d: (quotas[d], d))
                quotas[donor] -= 1
                quotas[k] = 1
    return quotas


def stratified_sample(rows: Sequence[Row], n: int | None, seed: int, key: str = "intent") -> list[Row]:
    """``n`` rows drawn at random (seeded), each ``key`` value in proportion to its share.

    Deterministic for a seed; the result keeps the input order. ``n`` None or >= len(rows): all rows.
    """
    if n is None or n >= len(rows):
        return list(rows)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[str(row.get(key) or "")].append(i)
    quotas = stratum_quotas({k: len(v) for k, v in groups.items()}, n)
    rng = random.Random(seed)
    picked: list[int] = []
    for k in sorted(groups):
        picked += rng.sample(groups[k], quotas[k])
    return [rows[i] for i in sorted(picked)]


def composition(rows: Sequence[Mapping[str, Any]], key: str = "intent") -> dict[str, int]:
    """Rows per ``key`` value, most common first: the make-up printed next to every result."""
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[str(row.get(key) or "")] += 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
