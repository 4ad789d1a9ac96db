"""Session-scoped tiny models built locally (no download): same code paths as the real model.

Import the fixtures in a test module with
``from tests.fixtures_models import tiny_causal, tiny_seq2seq  # noqa: F401``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from csra.specs import DEFAULT_INSTRUCTION


@pytest.fixture(scope="session")
def tiny_causal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (ChatML template, pad == eos == <|im_end|>) saved with save_pretrained."""
    from models_store.loading import build_tiny_causal

    return build_tiny_causal(tmp_path_factory.mktemp("tiny") / "tiny-causal")


@pytest.fixture(scope="session")
def tiny_seq2seq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random T5 with a plain tokenizer (no chat template)."""
    from models_store.loading import build_tiny_seq2seq

    return build_tiny_seq2seq(tmp_path_factory.mktemp("tiny") / "tiny-seq2seq")


def support_rows(n: int, offset: int = 0) -> list[dict[str, str]]:
    """``n`` short customer-support rows in csra's row format (a small repeating set)."""
    pairs = [
        ("I want to cancel my order", "I can help you cancel your order. Please log into your account."),
        ("How can I get a refund", "Certainly! Visit our website and open the Orders section."),
        ("I need help to reset my password", "Thank you for reaching out! Please follow these steps."),
        ("Can you help me track my order", "I understand how important this is. Please check your email."),
    ]
    rows = []
    for i in range(offset, offset + n):
        message, reply = pairs[i % len(pairs)]
        rows.append({"instruction": DEFAULT_INSTRUCTION, "input": message, "output": reply,
                     "intent": "cancel_order", "category": "ORDER"})
    return rows
