"""Token counts for estimates equal what training really encodes, row by row."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from csra.specs import DEFAULT_INSTRUCTION
from ml.training.data import ExampleEncoder
from ml.training.tokens import example_token_counts
from models_store.loading import load_tokenizer
from tests.fixtures_models import tiny_causal, tiny_seq2seq  # noqa: F401

BIG = 1_000_000  # no truncation


def _rows(bitext_path: Path, n: int = 300) -> list[dict[str, str]]:
    df = pd.read_csv(bitext_path).sample(n, random_state=0)  # drawn: the file is sorted by intent
    rows = [{"instruction": DEFAULT_INSTRUCTION, "input": m, "output": r}
            for m, r in zip(df["instruction"], df["response"], strict=True)]
    rows[0] = {**rows[0], "instruction": "Answer briefly."}  # a second instruction: its own prompt parts
    rows[1] = {**rows[1], "input": "  spaces around  ", "output": " {{Order Number}} first\n"}
    return rows


@pytest.mark.parametrize("which", ["tiny_causal", "tiny_seq2seq"])
def test_counts_match_the_training_encoder(which: str, request: pytest.FixtureRequest, bitext_path: Path):
    tokenizer, arch = load_tokenizer(request.getfixturevalue(which))
    rows = _rows(bitext_path)
    encoder = ExampleEncoder(tokenizer, arch, BIG, BIG)
    expected = []
    for r in rows:
        ex = encoder.encode(r)
        reply = sum(1 for t in ex.labels if t != -100) if arch == "causal" else len(ex.labels)
        prompt = len(ex.input_ids) - (reply if arch == "causal" else 0)
        expected.append((prompt, reply))
    assert example_token_counts(tokenizer, arch, rows) == expected


@pytest.mark.slow
def test_counts_match_for_smollm2(bitext_path: Path):
    """The default base model's own tokenizer (ChatML template, byte-level BPE)."""
    from transformers import AutoTokenizer

    from models_store.loading import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    rows = _rows(bitext_path, 200)
    encoder = ExampleEncoder(tokenizer, "causal", BIG, BIG)
    expected = []
    for r in rows:
        ex = encoder.encode(r)
        reply = sum(1 for t in ex.labels if t != -100)
        expected.append((len(ex.input_ids) - reply, reply))
    assert example_token_counts(tokenizer, "causal", rows) == expected
