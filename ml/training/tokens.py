"""Token counts of dataset rows as a training run would see them, before any run (for estimates).

``ExampleEncoder`` renders and tokenizes one row at a time (the chat template is Jinja: ~0.1 ms a
row), too slow for an import of 150,000 rows. Here the template is rendered once per distinct
instruction with a marker where the customer message goes, and the rows' full prompts
(``prefix + message + suffix``, the very string ``example_prompt`` renders) are tokenized in one
batch by the fast (Rust) tokenizer. Counts are before truncation: an estimate applies each run's
``max_input_length`` / ``max_target_length`` itself. ``tests/ml/test_token_counts.py`` checks them
against ``ExampleEncoder`` row by row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ml.prompting import end_token_ids, example_prompt, has_chat_template

MARK = "\x1fMESSAGE\x1f"
BATCH = 4096


def _prompt_parts(tokenizer: Any, instruction: str) -> tuple[str, str]:
    rendered = example_prompt(tokenizer, instruction, MARK)
    prefix, found, suffix = rendered.partition(MARK)
    if not found:  # a template that rewrites the message: no shortcut (never seen; stay exact)
        raise ValueError("the chat template does not keep the customer message as written")
    return prefix, suffix


def _lengths(tokenizer: Any, texts: list[str], special: bool) -> list[int]:
    out: list[int] = []
    for start in range(0, len(texts), BATCH):
        ids = tokenizer(texts[start: start + BATCH], add_special_tokens=special)["input_ids"]
        out.extend(len(x) for x in ids)
    return out


def example_token_counts(tokenizer: Any, arch: str, rows: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """(prompt tokens, reply tokens with the end-of-turn token) of each row, untruncated and ungrounded."""
    chat = has_chat_template(tokenizer)
    parts: dict[str, tuple[str, str]] = {}
    prompts = []
    for r in rows:
        instruction = str(r["instruction"])
        if instruction not in parts:
            parts[instruction] = _prompt_parts(tokenizer, instruction)
        prefix, suffix = parts[instruction]
        prompts.append(prefix + str(r["input"]) + suffix)
    replies = [str(r["output"]) if (chat or arch == "seq2seq") else " " + str(r["output"]) for r in rows]
    end = len(end_token_ids(tokenizer, arch))
    prompt_n = _lengths(tokenizer, prompts, special=not chat or arch == "seq2seq")
    reply_n = _lengths(tokenizer, replies, special=False)
    return [(p, r + end) for p, r in zip(prompt_n, reply_n, strict=True)]
