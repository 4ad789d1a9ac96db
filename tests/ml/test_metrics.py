"""Tests of ml.metrics: overlap, semantic similarity, heuristic, error patterns, placeholders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ml import metrics as m
from ml.metrics import ExampleInput, aggregate, needs_details, quality_score, score_examples

REF = (
    "I understand you want to cancel order {{Order Number}}. Please sign in to your account on "
    "{{Website URL}}, open the order history and choose the cancel option. I'm happy to help!"
)
UNRELATED = "Bananas grow in tropical climates and are rich in potassium, a mineral for the heart."


@pytest.fixture(scope="module")
def semantic_scores() -> list[dict]:
    """One batched scoring run with the real MiniLM model (loaded once for the module)."""
    return score_examples(
        [
            ExampleInput(REF, REF, "cancel_order", "ORDER"),
            ExampleInput(UNRELATED, REF, "cancel_order", "ORDER"),
        ]
    )


def test_module_import_does_not_load_torch() -> None:
    code = "import sys, ml.metrics as m; assert 'torch' not in sys.modules and m._encoder is None"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_identical_prediction_scores_perfectly(semantic_scores: list[dict]) -> None:
    same = semantic_scores[0]
    assert same["rouge_l"] == pytest.approx(1.0)
    assert same["bleu"] == pytest.approx(100.0)
    assert same["chrf"] == pytest.approx(100.0)
    assert same["semantic_similarity"] == pytest.approx(1.0, abs=1e-3)


def test_unrelated_prediction_scores_low(semantic_scores: list[dict]) -> None:
    other = semantic_scores[1]
    assert other["rouge_l"] < 0.2
    assert other["bleu"] < 10
    assert other["chrf"] < 30
    assert other["semantic_similarity"] < 0.3


def test_encoder_is_cached_and_loaded_from_the_local_package(semantic_scores: list[dict]) -> None:
    assert m.get_encoder() is m.get_encoder()
    model_dir = m.embedding_model_dir()
    assert model_dir.name == "model" and (model_dir / "model.safetensors").is_file()


def test_without_semantic_leaves_similarity_empty() -> None:
    (row,) = score_examples([ExampleInput(REF, REF)], with_semantic=False)
    assert row["semantic_similarity"] is None
    expected = {*m.FLAG_FIELDS, *m.PLACEHOLDER_FIELDS, "rouge_l", "bleu", "chrf", "heuristic_quality"}
    assert expected <= set(row)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ok", 0),
        ("This reply is long enough to count but says nothing.", 1),
        ("Sorry!", 1),
        ("Please send the order.", 2),
        ("I'm sorry about that, please provide your order details.", 3),
    ],
)
def test_heuristic_quality(text: str, expected: int) -> None:
    assert quality_score(text) == expected


def _flags(pred: str, ref: str = REF, intent: str = "cancel_order", hit: bool = False) -> dict:
    (row,) = score_examples([ExampleInput(pred, ref, intent, "", hit)], with_semantic=False)
    return row


def test_too_verbose() -> None:
    ref = "one two three four five six seven eight nine ten."
    assert _flags(" ".join(["word"] * 16) + ".", ref)["too_verbose"]
    assert not _flags(" ".join(["word"] * 15) + ".", ref)["too_verbose"]  # ratio 1.5 is not above


def test_needs_details_intents() -> None:
    assert needs_details("track_order") and needs_details("recover_password")
    assert not needs_details("check_refund_policy") and not needs_details("contact_human_agent")
    assert needs_details("") and needs_details("some_new_intent")  # unknown: never flagged
    assert len(m.BITEXT_INTENTS) == 27


@pytest.mark.parametrize(
    "pred",
    [
        "Could you please provide your order number?",
        "Please share the email address linked to your account.",
        "What is your registered email address?",
        "Sure. Could you provide me with the {{Order Number}} so I can check?",
        "To help you, may I have your phone number?",
        "Kindly share your account details.",
    ],
)
def test_asks_needless_details_positive(pred: str) -> None:
    assert _flags(pred, intent="check_refund_policy")["asks_needless_details"]


@pytest.mark.parametrize(
    "pred",
    [
        "Our refund policy allows returns within 30 days.",
        "You can call us at {{Customer Support Phone Number}} or write to our email address.",
        "Please feel free to contact our support team; the order number is on your receipt.",
        "Please send us your feedback. You can also check your account settings.",
        "Please send your request to our email address or our phone number.",
    ],
)
def test_asks_needless_details_negative_phrasing(pred: str) -> None:
    assert not _flags(pred, intent="check_refund_policy")["asks_needless_details"]


def test_asking_is_fine_when_the_intent_needs_details() -> None:
    row = _flags("Could you please provide your order number?", intent="track_order")
    assert not row["asks_needless_details"]


def test_repetitive() -> None:
    assert _flags("I can help you. I can help you. I can help you. I can help you.")["repetitive"]
    assert _flags("the order the order the order the order the order the order is here.")["repetitive"]
    assert not _flags(REF)["repetitive"]
    assert not _flags("Thanks.")["repetitive"]


@pytest.mark.parametrize(
    "pred",
    [
        "We hereby confirm the cancellation.",
        "Kindly be advised that the order is closed.",
        "We regret to inform you that this is impossible.",
        "Dear Sir/Madam, your request was received.",
        "Calm down, it is not our problem.",
        "THIS IS YOUR ORDER AND WE CANNOT CHANGE IT NOW.",
        "Your order is cancelled!!",
    ],
)
def test_off_tone_positive(pred: str) -> None:
    assert _flags(pred)["off_tone"]


@pytest.mark.parametrize(
    "pred",
    [REF, "Thank you! Your ORDER {{Order Number}} is on its way.", "There is whatever you need here."],
)
def test_off_tone_negative(pred: str) -> None:
    assert not _flags(pred)["off_tone"]


def test_unfinished() -> None:
    assert _flags("To cancel your order, please follow these")["unfinished"]
    assert _flags("Here are the steps:")["unfinished"]
    assert _flags("")["unfinished"]
    assert _flags("A complete reply.", hit=True)["unfinished"]
    for done in ("Done.", "Really?", "Great!", 'He said "thanks."', "All set 😊"):
        assert not _flags(done)["unfinished"], done


def test_placeholder_counts() -> None:
    ref = "Order {{Order Number}} ships soon; see {{Website URL}} or call {{Customer Support Phone Number}}."
    pred = "Order {{order number}} ships; see {{Website URL}}, {{Invoice Number}}, {{Order Number}"
    row = _flags(pred, ref)
    assert row["placeholders_kept"] == 2
    assert row["placeholders_invented"] == 1
    assert row["placeholders_broken"] == 1
    assert row["placeholders_expected"] == 3


@pytest.mark.parametrize(
    ("pred", "broken"),
    [
        ("{Order Number}}", 1),
        ("{{ }}", 1),
        ("{{{Order Number}}}", 1),
        ("a } b {{ c", 2),
        ("{{Order Number}}", 0),
    ],
)
def test_broken_placeholders(pred: str, broken: int) -> None:
    assert m.parse_placeholders(pred)[1] == broken


def test_aggregate_overall_per_intent_and_per_category() -> None:
    examples = [
        ExampleInput(REF, REF, "cancel_order", "ORDER"),
        ExampleInput("Could you provide your email address", REF, "check_refund_policy", "REFUND"),
        ExampleInput("Could you provide your email address?", REF, "check_refund_policy", "REFUND", True),
    ]
    scores = score_examples(examples, with_semantic=False)
    agg = aggregate(scores, examples)
    overall = agg["overall"]
    assert overall["n"] == 3
    assert overall["unfinished"] == pytest.approx(2 / 3)
    assert overall["asks_needless_details"] == pytest.approx(2 / 3)
    assert overall["placeholders_kept"] == pytest.approx(2 / 6)
    assert overall["semantic_similarity"] is None
    for key in m.FLAG_FIELDS + ("placeholders_invented", "placeholders_broken"):
        assert 0.0 <= overall[key] <= 1.0
    assert set(agg["per_intent"]) == {"cancel_order", "check_refund_policy"}
    assert agg["per_intent"]["cancel_order"]["bleu"] == pytest.approx(100.0)
    assert agg["per_intent"]["cancel_order"]["rouge_l"] == pytest.approx(1.0)
    assert agg["per_intent"]["check_refund_policy"]["n"] == 2
    assert agg["per_intent"]["check_refund_policy"]["asks_needless_details"] == 1.0
    assert agg["per_category"]["REFUND"]["unfinished"] == 1.0
    assert agg["per_category"]["ORDER"]["chrf"] == pytest.approx(100.0)


def test_aggregate_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        aggregate([], [ExampleInput("a", "b")])
