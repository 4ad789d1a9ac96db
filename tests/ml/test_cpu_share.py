"""Background jobs take turns with chat on one machine (workers/cpu_share.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from csra.jobctx import LocalContext
from csra.specs import TrainSpec
from ml.cpu_share import CpuYielder, InteractiveSignal, transformer_blocks
from ml.training.run import run_training
from tests.fixtures_models import support_rows, tiny_causal  # noqa: F401


class Chatting:
    """Touches the signal from another thread, as the generate worker does while it decodes."""

    def __init__(self, signal: InteractiveSignal) -> None:
        self.signal = signal
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.signal.touch()
            time.sleep(0.01)

    def __enter__(self) -> Chatting:
        self.signal.touch()  # active from the first moment, whenever the thread gets scheduled
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def test_signal_is_active_only_shortly_after_a_touch(tmp_path: Path) -> None:
    signal = InteractiveSignal(tmp_path / "run" / "interactive")
    assert not signal.active()  # no file yet
    signal.touch()
    assert signal.active()
    time.sleep(0.6)
    assert not signal.active()


def test_yielder_waits_while_chat_is_active_and_returns_after(tmp_path: Path) -> None:
    signal = InteractiveSignal(tmp_path / "interactive")
    yielder = CpuYielder(signal, max_wait=30)
    t0 = time.monotonic()
    yielder()
    assert time.monotonic() - t0 < 0.05 and yielder.pauses == 0  # idle machine: no pause
    chat = Chatting(signal).__enter__()
    threading.Timer(0.4, chat.__exit__).start()  # a chat reply that takes 0.4 s
    time.sleep(0.05)
    t0 = time.monotonic()
    yielder()
    waited = time.monotonic() - t0
    # paused until the chat ended and the signal went stale (0.5 s hold), then went on
    assert 0.6 < waited < 1.5 and yielder.pauses == 1 and yielder.waited == pytest.approx(waited, abs=0.05)


def test_yielder_never_starves_the_job(tmp_path: Path) -> None:
    signal = InteractiveSignal(tmp_path / "interactive")
    yielder = CpuYielder(signal, max_wait=0.3)
    with Chatting(signal):
        t0 = time.monotonic()
        yielder()
        waited = time.monotonic() - t0
        assert 0.25 < waited < 1.0 and yielder.pauses == 1
        t1 = time.monotonic()
        yielder()  # inside its free slice (max_wait / 10): no pause
        assert time.monotonic() - t1 < 0.02


def test_training_pauses_for_chat_and_still_finishes(tiny_causal: Path, tmp_path: Path) -> None:  # noqa: F811
    signal = InteractiveSignal(tmp_path / "interactive")
    yielder = CpuYielder(signal, max_wait=0.2)  # under constant chat: 0.2 s pauses, 0.02 s free slices
    spec = TrainSpec(dataset_id=1, epochs=1, batch_size=4, precision="fp32", logging_steps=1, eval_every="epoch",
                     max_input_length=96, max_target_length=48)
    with Chatting(signal):
        result = run_training(spec, support_rows(64), support_rows(4), tiny_causal, tmp_path / "out",
                              LocalContext(work_dir=tmp_path), yield_cpu=yielder)
    assert result["steps"] == 16  # it still finished
    assert yielder.pauses >= 3 and result["yielded_to_chat_seconds"] >= 0.6  # and kept pausing after each slice


def test_hooks_sit_on_every_transformer_block(tiny_causal: Path) -> None:  # noqa: F811
    from models_store.loading import load_model_and_tokenizer

    model = load_model_and_tokenizer(tiny_causal).model
    blocks = transformer_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers


@pytest.mark.parametrize("max_wait", [0.2])
def test_forward_and_backward_call_the_yielder(tiny_causal: Path, tmp_path: Path, max_wait: float) -> None:  # noqa: F811
    from ml.cpu_share import yield_inside_steps
    from models_store.loading import load_model_and_tokenizer

    calls: list[int] = []

    class Counting(CpuYielder):
        def __call__(self, *_: object) -> None:
            calls.append(1)

    model = load_model_and_tokenizer(tiny_causal, for_training=True).model
    model.train()
    yield_inside_steps(model, Counting(InteractiveSignal(tmp_path / "x"), max_wait))
    import torch

    out = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]]))
    forward_calls = len(calls)
    out.loss.backward()
    layers = model.config.num_hidden_layers
    assert forward_calls == layers and len(calls) == 2 * layers
