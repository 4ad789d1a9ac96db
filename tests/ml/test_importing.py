"""Tests of the dataset-import domain module (no Celery, no database)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from csra.jobctx import JobCancelled, JobError, LocalContext
from csra.specs import DEFAULT_INSTRUCTION, ImportSpec
from ml.importing import (
    CSRA_COLUMNS,
    ImportResult,
    clean,
    detect_format,
    download_hf_dataset,
    import_dataset,
    message_key,
    normalise_columns,
    read_table,
    split,
)

BITEXT = Path(__file__).resolve().parents[2].parent / "shared/data/bitext/bitext_customer_support.csv"
REPLY = "Thank you for reaching out, I will gladly help you with that today."


def _run(path: Path, ctx: LocalContext | None = None, **spec: object) -> ImportResult:
    ctx = ctx or LocalContext(work_dir=path.parent)
    return import_dataset(path, ImportSpec(**spec), ctx, min_message_chars=3, min_reply_chars=20)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _frame(**columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(columns, dtype="str")


def _removed(stats: dict) -> int:
    return sum(v for k, v in stats.items() if k.startswith("removed_"))


def _splits_of_messages(rows: list[dict]) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {}
    keys = message_key(pd.Series([r["input"] for r in rows], dtype="str"))
    for key, row in zip(keys, rows, strict=True):
        seen.setdefault(key, set()).add(row["split"])
    return seen


# --------------------------------------------------------------------------- format and reading


@pytest.mark.parametrize(
    ("name", "declared", "expected"),
    [
        ("a.csv", None, "csv"),
        ("a.CSV", None, "csv"),
        ("a.jsonl", None, "jsonl"),
        ("a.json", None, "jsonl"),
        ("a.parquet", None, "parquet"),
        ("a.txt", "csv", "csv"),
    ],
)
def test_detect_format(name: str, declared: str | None, expected: str) -> None:
    assert detect_format(Path(name), declared) == expected


def test_detect_format_unknown_extension() -> None:
    with pytest.raises(JobError, match=r"'\.xlsx'.*csv, jsonl or parquet"):
        detect_format(Path("data.xlsx"), None)
    with pytest.raises(JobError, match="unknown file format 'xml'"):
        detect_format(Path("data.csv"), "xml")


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(JobError, match=r"empty \(0 bytes\)"):
        read_table(path, "csv")


def test_whitespace_only_file(tmp_path: Path) -> None:
    path = tmp_path / "blank.jsonl"
    path.write_text("\n \n")
    with pytest.raises(JobError, match="empty"):
        read_table(path, "jsonl")


def test_header_only_csv_has_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("instruction,response\n")
    with pytest.raises(JobError, match="has no rows"):
        _run(path)


def test_non_utf8_bytes_name_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"instruction,response\ncaf\xe9 order,some reply text here\n")
    with pytest.raises(JobError, match=r"not UTF-8.*0xe9 at byte offset 24 \(line 2\)"):
        read_table(path, "csv")


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfinstruction,response\nhello,world\n")
    assert list(read_table(path, "csv").columns) == ["instruction", "response"]


def test_csv_unclosed_quote_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.csv"
    path.write_text(
        'instruction,response\n"multi\nline",fine reply\nsecond,"never closed\nthird,row\n',
        encoding="utf-8",
    )
    with pytest.raises(JobError, match=r"line 4: a quoted field .* never closed"):
        read_table(path, "csv")


def test_csv_wrong_field_count_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "fields.csv"
    path.write_text("instruction,response\nhello,reply\na,b,c\n", encoding="utf-8")
    with pytest.raises(JobError, match=r"line 3: expected 2 fields .* found 3"):
        read_table(path, "csv")


def test_invalid_json_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n\n{"input": "c", "output": }\n', encoding="utf-8")
    with pytest.raises(JobError, match="invalid JSON in 'bad.jsonl' on line 3"):
        read_table(path, "jsonl")


def test_json_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(JobError, match="line 2 .* not a JSON object"):
        read_table(path, "jsonl")


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"input": "hi", "output": "there"}]), encoding="utf-8")
    table = read_table(path, detect_format(path, None))
    assert table.to_dict("records") == [{"input": "hi", "output": "there"}]


def test_unreadable_parquet(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(JobError, match="could not read Parquet file 'bad.parquet'"):
        read_table(path, "parquet")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(JobError, match="does not exist"):
        read_table(tmp_path / "nope.csv", "csv")


# --------------------------------------------------------------------------- columns


def test_bitext_layout() -> None:
    df = _frame(
        flags=["B"],
        instruction=["where is my order"],
        category=["ORDER"],
        intent=["track_order"],
        response=["x"],
    )
    out = normalise_columns(df, {}, "Be nice.")
    assert list(out.columns) == list(CSRA_COLUMNS)
    assert out.iloc[0].to_dict() == {
        "instruction": "Be nice.",
        "input": "where is my order",
        "output": "x",
        "intent": "track_order",
        "category": "ORDER",
        "flags": "B",
    }


def test_instruction_layout_fills_optional_columns() -> None:
    df = pd.DataFrame({"Instruction": ["Answer briefly.", None], "input": ["hi", "yo"], "output": ["a", "b"]})
    out = normalise_columns(df, {}, "Default.")
    assert out["instruction"].tolist() == ["Answer briefly.", "Default."]
    assert out["intent"].tolist() == ["unknown", "unknown"]
    assert out["category"].tolist() == ["unknown", "unknown"]
    assert out["flags"].tolist() == ["", ""]


def test_column_mapping_wins() -> None:
    df = _frame(question=["hello"], answer=["reply"], instruction=["not the agent instruction"], label=["x"])
    out = normalise_columns(df, {"input": "question", "output": "answer", "intent": "label"}, "D.")
    row = out.iloc[0].to_dict()
    assert (row["input"], row["output"], row["intent"], row["instruction"]) == (
        "hello",
        "reply",
        "x",
        "not the agent instruction",
    )


def test_column_mapping_claims_bitext_instruction() -> None:
    df = _frame(instruction=["customer text"], response=["r"], note=["agent rule"])
    out = normalise_columns(df, {"instruction": "note"}, "D.")
    assert out.iloc[0][["instruction", "input"]].tolist() == ["agent rule", "customer text"]


def test_missing_columns_are_named() -> None:
    df = _frame(question=["q"], answer=["a"])
    with pytest.raises(JobError) as info:
        normalise_columns(df, {}, "D.")
    message = str(info.value)
    assert "missing required column(s): input, output" in message
    assert "columns found: question, answer" in message
    assert "column_mapping" in message


def test_column_mapping_to_absent_column() -> None:
    with pytest.raises(JobError, match="column_mapping refers to column.* nope.*columns found: q"):
        normalise_columns(_frame(q=["q"]), {"input": "nope"}, "D.")
    with pytest.raises(JobError, match="unknown csra column.* reply"):
        normalise_columns(_frame(q=["q"]), {"reply": "q"}, "D.")


# --------------------------------------------------------------------------- cleaning


def _rows(*pairs: tuple[str, str]) -> pd.DataFrame:
    df = _frame(input=[p[0] for p in pairs], output=[p[1] for p in pairs])
    return normalise_columns(df, {}, "Help.")


def test_clean_counts_every_step() -> None:
    df = _rows(
        ("  where is   my\norder ", REPLY),  # kept, whitespace normalised
        ("where is my order", REPLY),  # duplicate once normalised
        ("", REPLY),  # missing message
        ("refund please", "   "),  # missing reply
        ("hi", REPLY),  # message too short
        ("cancel my order", "Sure."),  # reply too short
        ("change my address", "To change it, please follow these steps:"),  # incomplete: lead-in
        ("track it", "Your parcel is on its way and will arrive with the"),  # incomplete: dangling word
        ("cancel order {{Order Number}}", "Please open the '{Cancel Order}}' page and confirm."),  # broken
        ("sign off", "Happy to help with that, Best regards the Support Team"),  # kept: no full stop
    )
    kept, stats = clean(df, min_message_chars=3, min_reply_chars=20)
    assert stats == {
        "rows_read": 10,
        "whitespace_normalised": 2,
        "removed_missing": 2,
        "removed_exact_duplicates": 1,
        "removed_too_short": 2,
        "removed_incomplete": 3,
        "rows_kept": 2,
    }
    assert kept["input"].tolist() == ["where is my order", "sign off"]
    assert stats["rows_read"] - _removed(stats) == stats["rows_kept"]


def test_nothing_left_after_cleaning(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "short.jsonl", [{"input": "hello there", "output": "ok"}] * 3)
    with pytest.raises(JobError, match=r"no usable rows after cleaning: .*3 rows.*by too short"):
        _run(path)


# --------------------------------------------------------------------------- splitting


def _intent_frame(groups_per_intent: dict[str, int], copies: int = 1) -> pd.DataFrame:
    inputs, intents = [], []
    for intent, n in groups_per_intent.items():
        for i in range(n):
            for c in range(copies):
                inputs.append(f"{intent} message {i}" if c == 0 else f"  {intent.upper()}  MESSAGE {i} ")
                intents.append(intent)
    return _frame(input=inputs, output=[REPLY] * len(inputs), intent=intents)


def test_split_is_group_aware_and_covers_small_intents() -> None:
    df = _intent_frame({"big": 200, "small": 3, "tiny": 2}, copies=2)
    out = split(df, (0.9, 0.05, 0.05), seed=1)
    keys = message_key(out["input"])
    assert (out.groupby(keys)["split"].nunique() == 1).all()
    small = set(out.loc[out["intent"] == "small", "split"])
    assert small == {"train", "validation", "test"}
    assert set(out.loc[out["intent"] == "tiny", "split"]) == {"train"}
    big = out.loc[out["intent"] == "big", "split"].value_counts()
    assert big["validation"] == big["test"] == 20


def test_split_zero_fractions_and_row_order() -> None:
    df = _intent_frame({"a": 30, "b": 30})
    out = split(df, (0.8, 0.2, 0.0), seed=3)
    assert set(out["split"]) == {"train", "validation"}
    shuffled = split(df.sample(frac=1, random_state=0), (0.8, 0.2, 0.0), seed=3).sort_index()
    assert shuffled["split"].tolist() == out["split"].tolist()
    assert set(split(df, (1.0, 0.0, 0.0), seed=3)["split"]) == {"train"}


def test_split_rejects_bad_fractions() -> None:
    with pytest.raises(JobError, match="fractions"):
        split(_intent_frame({"a": 3}), (0.5, 0.2, 0.2), seed=0)


# --------------------------------------------------------------------------- whole imports


def test_jsonl_instruction_layout(tmp_path: Path) -> None:
    records = [
        {"instruction": "Answer as a bank agent.", "input": f"{k} question {i}", "output": REPLY, "intent": k}
        for i in range(40)
        for k in ("a", "b")
    ]
    result = _run(_write_jsonl(tmp_path / "data.jsonl", records), seed=7)
    assert len(result.rows) == 80
    assert {r["instruction"] for r in result.rows} == {"Answer as a bank agent."}
    assert set(result.rows[0]) == {*CSRA_COLUMNS, "split"}
    assert result.stats["format"] == "jsonl"
    assert result.stats["split_intents"]["test"]["a"] >= 1


def test_parquet_with_column_mapping(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    pd.DataFrame(
        {
            "question": [f"my parcel {i} is late" for i in range(20)],
            "answer": [REPLY] * 20,
            "topic": ["delivery"] * 20,
        }
    ).to_parquet(path)
    result = _run(path, column_mapping={"input": "question", "output": "answer", "category": "topic"})
    assert result.stats["rows_kept"] == 20
    assert {r["category"] for r in result.rows} == {"delivery"}
    assert {r["instruction"] for r in result.rows} == {DEFAULT_INSTRUCTION}
    assert sum(result.stats["split_rows"].values()) == 20


def test_spec_thresholds_win(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"input": "hello there", "output": "A short reply."}])
    assert _run(path, min_reply_chars=5).stats["rows_kept"] == 1


def test_progress_is_reported(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"input": "hello there", "output": REPLY}])
    ctx = LocalContext(work_dir=tmp_path)
    _run(path, ctx)
    fractions = [f for f, _ in ctx.progress_log]
    assert fractions == sorted(fractions)
    assert 0 < fractions[0] and fractions[-1] < 0.9  # the caller reports storing and completion
    assert any(kind == "log" and "kept 1 of 1 rows" in msg for kind, msg, _ in ctx.events)


@pytest.mark.parametrize("checks", [0, 2, 4])
def test_cancellation(tmp_path: Path, checks: int) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"input": "hello there", "output": REPLY}])
    with pytest.raises(JobCancelled):
        _run(path, LocalContext(work_dir=tmp_path, cancel_after_checks=checks))


def test_hf_download_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(JobError, match="could not download Hugging Face dataset acme/support: "):
        download_hf_dataset("acme/support", tmp_path)
    with pytest.raises(JobError, match="not a Hugging Face dataset id"):
        download_hf_dataset("../etc/passwd", tmp_path)


# --------------------------------------------------------------------------- the real Bitext copy


@pytest.fixture(scope="module")
def bitext(tmp_path_factory: pytest.TempPathFactory) -> ImportResult:
    if not BITEXT.is_file():
        pytest.skip(f"Bitext copy not found at {BITEXT}")
    return _run(BITEXT, LocalContext(work_dir=tmp_path_factory.mktemp("bitext")), seed=42)


def test_bitext_stats_add_up(bitext: ImportResult) -> None:
    stats = bitext.stats
    assert stats["rows_read"] == 10508
    assert stats["rows_read"] - _removed(stats) == stats["rows_kept"] == len(bitext.rows)
    assert stats["removed_incomplete"] >= 1  # e.g. "please follow these steps:" with no steps
    assert sum(stats["split_rows"].values()) == stats["rows_kept"]
    assert json.loads(json.dumps(stats)) == stats  # stored as a JSON column


def test_bitext_split_ratios_and_intents(bitext: ImportResult) -> None:
    counts = bitext.stats["split_rows"]
    total = sum(counts.values())
    assert counts["train"] / total == pytest.approx(0.9, abs=0.01)
    assert counts["validation"] / total == pytest.approx(0.05, abs=0.01)
    assert counts["test"] / total == pytest.approx(0.05, abs=0.01)
    for name, intents in bitext.stats["split_intents"].items():
        assert len(intents) == 27, name
    assert len(bitext.stats["split_categories"]["test"]) == 11


def test_bitext_no_leakage(bitext: ImportResult) -> None:
    leaked = {k: s for k, s in _splits_of_messages(bitext.rows).items() if len(s) > 1}
    assert not leaked


def test_bitext_split_is_seeded(bitext: ImportResult) -> None:
    cleaned = pd.DataFrame([{k: r[k] for k in CSRA_COLUMNS} for r in bitext.rows], dtype="str")
    same = split(cleaned, (0.9, 0.05, 0.05), seed=42)["split"].tolist()
    other = split(cleaned, (0.9, 0.05, 0.05), seed=43)["split"].tolist()
    assert same == [r["split"] for r in bitext.rows]
    assert other != same


def test_chat_export_jsonl_imports_as_training_rows(tmp_path):
    """GET /chats/export?format=jsonl output (OpenAI chat format) imports back as a dataset."""
    import json as _json

    from csra.jobctx import LocalContext
    from csra.specs import ImportSpec
    from ml.importing import import_dataset

    chats = [{"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": f"where is my order number {i}?"},
                           {"role": "assistant", "content": f"Your order {i} ships tomorrow, thank you for waiting."},
                           {"role": "user", "content": f"and can I change the address for order {i}?"},
                           {"role": "assistant", "content": "Yes, you can change it in your account settings."}]}
             for i in range(20)]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(_json.dumps(c) for c in chats))
    result = import_dataset(path, ImportSpec(), LocalContext(tmp_path), min_message_chars=3, min_reply_chars=10)
    assert len(result.rows) == 40
    assert {r["instruction"] for r in result.rows} == {"Be brief."}
    assert any(r["input"] == "and can I change the address for order 3?" for r in result.rows)
