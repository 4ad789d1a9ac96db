"""Fine-tuning through ``run_training`` on tiny local models (same code paths as SmolLM2)."""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from csra.jobctx import JobCancelled, JobError, LocalContext
from csra.specs import TrainSpec
from ml.training.data import IGNORE, ExampleEncoder, collate
from ml.training.run import run_training
from ml.training.setup import resolve_precision
from models_store.loading import load_model_and_tokenizer
from tests.fixtures_models import support_rows, tiny_causal, tiny_seq2seq  # noqa: F401


def _spec(**kw: Any) -> TrainSpec:
    base = dict(dataset_id=1, epochs=2, learning_rate=5e-3, batch_size=4, logging_steps=1,
                eval_every=2, precision="fp32", max_input_length=96, max_target_length=48)
    return TrainSpec(**{**base, **kw})


def _train(model: Path, out: Path, ctx: LocalContext | None = None, n: int = 16, **kw: Any) -> dict:
    return run_training(_spec(**kw), support_rows(n), support_rows(4, offset=1), model, out,
                        ctx or LocalContext(work_dir=out))


def _losses(result: dict) -> list[float]:
    return [h["loss"] for h in result["history"] if "loss" in h]


@dataclass
class KilledContext(LocalContext):
    """Simulates the worker process dying: an exception that is not a cancellation."""

    kill_after_checks: int = 0

    def check_cancelled(self) -> None:
        self._checks += 1
        if self._checks > self.kill_after_checks:
            raise SystemExit("worker killed")


@pytest.fixture(scope="module")
def reference_run(tiny_causal: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811
    """8 steps (2 epochs of 4 batches) on the tiny Llama, evaluated and checkpointed every 2 steps."""
    return _train(tiny_causal, tmp_path_factory.mktemp("ref"))


# --------------------------------------------------------------------------- labels and batches


def test_labels_keep_end_token_when_pad_is_eos(tiny_causal: Path) -> None:  # noqa: F811
    lm = load_model_and_tokenizer(tiny_causal)
    tok = lm.tokenizer
    assert tok.pad_token_id == tok.eos_token_id
    encoder = ExampleEncoder(tok, "causal", 96, 192)
    rows = support_rows(2)
    rows[1]["output"] += " And a much longer reply, so that the first example gets padded."
    batch = collate(encoder.encode_all(rows), "causal", tok.pad_token_id)
    for i in range(2):
        real = batch.labels[i][batch.labels[i] != IGNORE]
        assert real[-1].item() == tok.convert_tokens_to_ids("<|im_end|>")
    assert (batch.targets == tok.eos_token_id).sum().item() == 2  # both end tokens are predicted
    assert batch.input_ids.shape[1] == max(len(e.input_ids) for e in encoder.encode_all(rows))  # dynamic


def test_loss_only_on_reply_tokens(tiny_causal: Path) -> None:  # noqa: F811
    tok = load_model_and_tokenizer(tiny_causal).tokenizer
    encoder = ExampleEncoder(tok, "causal", 96, 48)
    row = support_rows(1)[0]
    example = encoder.encode(row)
    supervised = [t for t in example.labels if t != IGNORE]
    assert tok.decode(supervised) == row["output"] + "<|im_end|>"
    n_prompt = example.labels.index(next(t for t in example.labels if t != IGNORE))
    assert tok.decode(example.input_ids[:n_prompt]).endswith("<|im_start|>assistant\n")
    batch = collate([example], "causal", tok.pad_token_id)
    flat = batch.input_ids.flatten()
    assert torch.equal(flat[batch.target_index + 1], batch.targets)  # position t predicts token t + 1
    assert batch.n_targets == len(supervised)


def test_truncation_keeps_end_of_prompt_and_cuts_a_long_reply_without_its_end(tiny_causal: Path) -> None:  # noqa: F811
    tok = load_model_and_tokenizer(tiny_causal).tokenizer
    row = support_rows(1)[0]
    row["output"] = "word " * 200
    example = ExampleEncoder(tok, "causal", 16, 10).encode(row)
    n_prompt = sum(1 for t in example.labels if t == IGNORE)
    assert n_prompt == 16 and len(example.input_ids) - n_prompt == 10
    assert tok.decode(example.input_ids[:n_prompt]).endswith("assistant\n")
    # cut in mid-reply: no end token, or the model would learn to stop in mid-reply
    assert tok.eos_token_id not in example.labels and tok.decode(example.labels[n_prompt:]).startswith("word word")
    fits = ExampleEncoder(tok, "causal", 16, 10).encode({**row, "output": "word " * 3})
    assert fits.labels[-1] == tok.eos_token_id  # a reply that fits keeps its end


# --------------------------------------------------------------------------- training runs


def test_causal_training_reduces_loss_and_saves_model(reference_run: dict) -> None:
    losses = _losses(reference_run)
    assert reference_run["steps"] == 8 and len(losses) == 8
    assert losses[-1] < losses[0]
    evals = [h["eval_loss"] for h in reference_run["history"] if "eval_loss" in h]
    assert len(evals) == 4 and evals[-1] < evals[0]
    assert reference_run["best_val_loss"] == min(evals)
    assert reference_run["tokens_seen"] > 0 and reference_run["precision"] == "fp32"
    model_dir = Path(reference_run["model_dir"])
    assert (model_dir / "model.safetensors").is_file()
    assert load_model_and_tokenizer(model_dir).arch == "causal"
    checkpoints = sorted(p.name for p in (model_dir.parent / "checkpoints").iterdir())
    assert checkpoints == ["step-8"]  # last == best here; others pruned


def test_same_seed_same_losses(tiny_causal: Path, tmp_path: Path, reference_run: dict) -> None:  # noqa: F811
    again = _train(tiny_causal, tmp_path)
    assert _losses(again) == _losses(reference_run)


def test_seq2seq_trains(tiny_seq2seq: Path, tmp_path: Path) -> None:  # noqa: F811
    result = _train(tiny_seq2seq, tmp_path, n=8, epochs=3, eval_every="epoch")
    losses = _losses(result)
    assert result["steps"] == 6 and losses[-1] < losses[0]
    assert load_model_and_tokenizer(result["model_dir"]).arch == "seq2seq"


def test_metrics_and_progress_events(reference_run: dict, tiny_causal: Path, tmp_path: Path) -> None:  # noqa: F811
    ctx = LocalContext(work_dir=tmp_path)
    _train(tiny_causal, tmp_path, ctx, n=8, epochs=1)
    metrics = [d for kind, _, d in ctx.events if kind == "metric"]
    assert {"step", "epoch", "loss", "learning_rate", "tokens_per_second"} <= set(metrics[0])
    assert any("eval_loss" in m for m in metrics)
    assert ctx.progress_log[-1][0] == 1.0 and "training: step 2/2" in ctx.progress_log[-1][1]


def test_resume_after_kill(tiny_causal: Path, tmp_path: Path, reference_run: dict) -> None:  # noqa: F811
    with pytest.raises(SystemExit):
        _train(tiny_causal, tmp_path, KilledContext(work_dir=tmp_path, kill_after_checks=5))
    assert (tmp_path / "checkpoints" / "step-4").is_dir() and not (tmp_path / "model").exists()
    (tmp_path / "checkpoints" / ".step-6.tmp-999").mkdir()  # a checkpoint the kill interrupted
    ctx = LocalContext(work_dir=tmp_path)
    result = _train(tiny_causal, tmp_path, ctx)
    assert result["resumed_from_step"] == 4 and result["steps"] == 8
    assert any(m == "resumed from step 4" for _, m, _ in ctx.events)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-8"]
    # Same data order, optimizer, schedule and RNG: the resumed run continues the uninterrupted one.
    assert _losses(result) == pytest.approx(_losses(reference_run), rel=1e-5)


def test_a_run_also_checkpoints_on_time_and_resumes_from_there(tiny_causal: Path, tmp_path: Path) -> None:  # noqa: F811
    """Between evaluations (none here before the end) a checkpoint is saved once ``checkpoint_seconds``
    have passed: a run killed after step 5 resumes from step 5, not from 0, and continues as if never killed."""
    def train(out: Path, ctx: LocalContext, seconds: float | None) -> dict:
        return run_training(_spec(eval_every=1000), support_rows(16), support_rows(4, offset=1), tiny_causal, out,
                            ctx, checkpoint_seconds=seconds)

    uninterrupted = train(tmp_path / "ref", LocalContext(work_dir=tmp_path / "ref"), None)
    out = tmp_path / "killed"
    with pytest.raises(SystemExit):
        train(out, KilledContext(work_dir=out, kill_after_checks=5), 1e-9)  # due after every step
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-5"]  # the earlier ones pruned
    ctx = LocalContext(work_dir=out)
    result = train(out, ctx, 3600.0)  # not due again: the final evaluation's checkpoint is the only one
    assert result["resumed_from_step"] == 5 and result["steps"] == 8
    assert [m for _, m, _ in ctx.events if m.startswith("checkpoint at step")] == []
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-8"]
    assert _losses(result) == pytest.approx(_losses(uninterrupted), rel=1e-5)


def test_cancel_raises(tiny_causal: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(JobCancelled):
        _train(tiny_causal, tmp_path, LocalContext(work_dir=tmp_path, cancel_after_checks=3))
    assert not (tmp_path / "model").exists()


def test_cancel_keeps_best(tiny_causal: Path, tmp_path: Path) -> None:  # noqa: F811
    ctx = LocalContext(work_dir=tmp_path, cancel_after_checks=5)
    result = _train(tiny_causal, tmp_path, ctx, keep_best_on_cancel=True)
    assert result["cancelled"] is True and result["steps"] == 5  # 5 checks pass, the 6th cancels
    assert result["best_step"] == 4
    assert load_model_and_tokenizer(result["model_dir"]).arch == "causal"


def test_lora_on_tiny_llama(tiny_causal: Path, tmp_path: Path) -> None:  # noqa: F811
    result = _train(tiny_causal, tmp_path, n=8, epochs=1, method="lora", learning_rate=1e-2)
    assert result["steps"] == 2
    merged = load_model_and_tokenizer(result["model_dir"]).model  # a plain merged model, no adapters
    assert type(merged).__name__ == "LlamaForCausalLM"
    base = load_model_and_tokenizer(tiny_causal).model
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], base.state_dict()[q])


# --------------------------------------------------------------------------- early errors


def test_lora_unknown_module(tiny_causal: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(JobError, match=r"nope_proj.*available module names:.*q_proj"):
        _train(tiny_causal, tmp_path, method="lora", lora_target_modules=["q_proj", "nope_proj"])


def test_folder_without_weights(tiny_causal: Path, tmp_path: Path) -> None:  # noqa: F811
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(tiny_causal / "config.json", empty / "config.json")
    with pytest.raises(JobError, match="has no weights"):
        _train(empty, tmp_path / "out")


def test_context_too_long(tiny_causal: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(JobError, match="exceeds the model's context of 1024"):
        _train(tiny_causal, tmp_path, max_input_length=800, max_target_length=400)


def test_no_train_rows(tiny_causal: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(JobError, match="no training rows"):
        run_training(_spec(), [], [], tiny_causal, tmp_path, LocalContext(work_dir=tmp_path))


def test_fp16_needs_gpu() -> None:
    with pytest.raises(JobError, match="fp16 needs a GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_disk_full_leaves_no_half_written_model(
    tiny_causal: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    from transformers import PreTrainedModel

    def full_disk(self: Any, save_directory: Any, **kw: Any) -> None:
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        (Path(save_directory) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(JobError, match="disk full while saving the model to .*free space and retry"):
        _train(tiny_causal, tmp_path, n=4, epochs=1)
    assert not (tmp_path / "model").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model")]


def test_reply_only_loss_equals_full_logits_loss(tiny_causal: Path) -> None:  # noqa: F811
    """lm_head at reply positions only, no attention mask: the same loss as HF's padded full pass."""
    from ml.training.loss import LossFn

    lm = load_model_and_tokenizer(tiny_causal)
    rows = support_rows(3)
    rows[0]["output"] += " Plus a longer tail so the batch has padding."
    examples = ExampleEncoder(lm.tokenizer, "causal", 96, 48).encode_all(rows)
    batch = collate(examples, "causal", lm.tokenizer.pad_token_id)
    mask = torch.zeros_like(batch.input_ids)
    for i, example in enumerate(examples):
        mask[i, : len(example.input_ids)] = 1
    with torch.no_grad():
        ours = LossFn(lm.model, "causal")(batch) / batch.n_targets
        theirs = lm.model(input_ids=batch.input_ids, attention_mask=mask, labels=batch.labels).loss
    assert LossFn(lm.model, "causal").fast
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
