"""Prompt starts computed once, for the llama.cpp engine (``ml.inference.llamacpp``).

Every chat starts with the same system prompt, and a conversation's next turn starts with its
earlier turns. In one step, prompt tokens at the same position after the same earlier tokens are one
batch entry of all their sequences (``step_entries``; a prefix tree finds them). Across steps, a
joining sequence copies the cells of its longest computed start (``longest_start``) from a running
sequence or from the prefix cache, an extra sequence that keeps the cells of the last finished reply
(prompt and reply); a copy only adds a sequence id to the cells of the unified KV cache. Measured on
the 2-core machine with the 16 chat prompts of ``bench/generate.py`` (69-72 tokens each): before this,
their prompts took 1.7 s of a 4.2 s batch of 16.

The price: a reply's prompt cells are computed in another batch, and sit in other cache cells, than
without sharing, and llama.cpp's logits differ in their last bits with both, so a seeded reply can
depend on what ran before it; ``prefix_cache=False`` (``CSRA_GEN_LLAMACPP_PREFIX_CACHE``) computes
every prompt in full.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ml.inference.rows import Row

Entry = tuple[int, int, list[int], bool]  # token, position, the sequences it belongs to, wants logits


class Running(Protocol):
    """What of a running sequence the sharing reads (and ``step_entries`` advances)."""

    row: Row
    seq_id: int
    pos: int  # the position of the next token fed to llama.cpp (= the cells it has)


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many first tokens ``a`` and ``b`` have in common, at most ``limit``."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if n >= limit or x != y:
            break
        n += 1
    return n


def fed(seq: Running) -> list[int]:
    """The tokens whose cells ``seq`` has (positions 0 .. pos-1)."""
    row = seq.row
    return (row.prompt_ids + row.generated)[:seq.pos] if seq.pos > len(row.prompt_ids) else row.prompt_ids[:seq.pos]


def longest_start(prompt: Sequence[int], sources: Sequence[tuple[int, Sequence[int]]]) -> tuple[int, int]:
    """(source sequence, length) of the longest start of ``prompt`` that one of ``sources`` (sequence id,
    the tokens whose cells it has) holds, all but the prompt's last token (its logits are needed);
    length 0: none."""
    best, source = 0, -1
    for sid, tokens in sources:
        n = common_prefix(prompt, tokens, len(prompt) - 1)
        if n > best:
            best, source = n, sid
    return source, best


def step_entries(active: Sequence[Running]) -> tuple[list[Entry], list[int], int, int]:
    """This step's batch: the rest of each new sequence's prompt, and each running sequence's last
    token; per sequence in ``active`` order, the index of the entry whose logits it reads; and the
    prompt tokens of the new sequences, and how many of them are computed. Advances each ``pos``.
    """
    entries: list[Entry] = []
    outputs: list[int] = []
    nodes: dict[tuple[int, int], int] = {}  # (the node of the tokens before, token) -> node
    entry_of: dict[int, int] = {}
    prompt_tokens = computed = 0
    for seq in active:
        prompt = seq.row.prompt_ids
        if seq.pos >= len(prompt):
            entries.append((seq.row.generated[-1], seq.pos, [seq.seq_id], True))
            outputs.append(len(entries) - 1)
            seq.pos += 1
            continue
        node, index = -1, -1
        for k, token in enumerate(prompt):
            node = nodes.setdefault((node, token), len(nodes))
            if k < seq.pos:
                continue  # its cell is there already (shared from the cache or a running sequence)
            last = k == len(prompt) - 1
            index = entry_of.get(node, -1)
            if index < 0:
                entry_of[node] = index = len(entries)
                entries.append((token, k, [seq.seq_id], last))
                computed += 1
            else:
                entries[index][2].append(seq.seq_id)
                if last:
                    entries[index] = (*entries[index][:3], True)
        prompt_tokens += len(prompt)
        outputs.append(index)
        seq.pos = len(prompt)
    return entries, outputs, prompt_tokens, computed
