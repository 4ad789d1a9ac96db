"""Tests of ml.report: files, tables, escaping, and plotting edge cases."""

from __future__ import annotations

from pathlib import Path

from ml.metrics import ExampleInput, aggregate, score_examples
from ml.report import build_report

ROWS = [
    ("cancel_order", "ORDER", "cancel my order {{Order Number}}",
     "I can help you cancel order {{Order Number}}. Please sign in to your account."),
    ("check_refund_policy", "REFUND", "what is your refund policy | returns",
     "Our refund policy allows returns within 30 days of delivery."),
    ("track_order", "ORDER", "where is my order",
     "You can track order {{Order Number}} on {{Website URL}}."),
]
PREDICTIONS = {
    "base": [
        "Could you please provide your email address? <script>alert('x')</script>",
        "Refunds | returns are handled by our team and the",
        "We hereby inform you that order tracking is available. Tracking is available.",
    ],
    "base-ft": [
        "I can help you cancel order {{Order Number}}. Please sign in to your account.",
        "Our refund policy allows returns within 30 days.",
        "You can track order {{Order Number}} on {{Website URL}}.",
    ],
}


def _inputs(names: list[str]) -> tuple[dict, list[dict], list[dict]]:
    per_model, examples = {}, []
    for name in names:
        exs = [ExampleInput(p, ref, intent, cat)
               for (intent, cat, _, ref), p in zip(ROWS, PREDICTIONS[name], strict=True)]
        scores = score_examples(exs, with_semantic=False)
        per_model[name] = aggregate(scores, exs)
        examples += [
            {"model": name, "intent": ex.intent, "category": ex.category, "prompt": row[2],
             "reference": ex.reference, "prediction": ex.prediction, **sc}
            for ex, sc, row in zip(exs, scores, ROWS, strict=True)
        ]
    evaluation = {"id": 7, "dataset_id": 3, "split": "test", "created_at": "2025-01-01T00:00:00",
                  "per_model": per_model}
    models = [{"name": n, "kind": "fine_tuned" if n.endswith("-ft") else "baseline"} for n in names]
    return evaluation, models, examples


def test_full_report(tmp_path: Path) -> None:
    evaluation, models, examples = _inputs(["base", "base-ft"])
    curves = {"base-ft": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7}]}
    paths = build_report(tmp_path, evaluation, models, examples, curves, worst_n=2)
    files = ("metrics.png", "per_intent.png", "lengths.png", "loss_curves.png", "report.md", "report.html")
    for name in files:
        assert paths[name].is_file() and paths[name].stat().st_size > 0, name
    md = paths["report.md"].read_text()
    assert "## Leaderboard" in md and "| model | kind |" in md
    leaderboard = md.split("## Leaderboard")[1].split("##")[0]
    assert leaderboard.index("base-ft") < leaderboard.index("| base |")  # best ROUGE-L first
    assert "what is your refund policy \\| returns" in md  # `|` escaped in table cells
    assert "Refunds \\| returns" in md
    assert "](metrics.png)" in md and "](loss_curves.png)" in md
    assert "Worst examples: asks needless details" in md and "Worst examples: off tone" in md
    off_tone = md.split("## Worst examples: off tone")[1].split("##")[0]
    assert "We hereby inform you" in off_tone and "track_order" in off_tone
    assert "<script>" not in md
    page = paths["report.html"].read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert '<img src="per_intent.png"' in page and "check_refund_policy" in page


def test_one_model_and_no_loss_curves(tmp_path: Path) -> None:
    evaluation, models, examples = _inputs(["base"])
    paths = build_report(tmp_path, evaluation, models, examples, {"base": []})
    assert "loss_curves.png" not in paths and not (tmp_path / "loss_curves.png").exists()
    for name in ("metrics.png", "per_intent.png", "lengths.png", "report.md", "report.html"):
        assert paths[name].is_file()
    assert "No training loss recorded" in paths["report.md"].read_text()


def test_empty_inputs_do_not_crash(tmp_path: Path) -> None:
    evaluation = {"id": 1, "dataset_id": 1, "split": "test", "created_at": "", "per_model": {}}
    paths = build_report(tmp_path, evaluation, [], [], {})
    assert paths["report.md"].is_file() and paths["report.html"].is_file()
