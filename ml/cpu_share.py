"""Chat first: background jobs (training, evaluation) pause while interactive generation runs.

On one machine every worker shares the same cores. Two torch processes running at once each
keep an OpenMP team busy on all cores; every parallel region then waits for a thread the other
process holds, and both crawl (measured on the 2-core project machine: a Linear-kernel check
took 0.32 s alone and 5.8 s beside a training job at nice 19; SCHED_IDLE did no better, see
bench/chat_while_training.py). OS priorities cannot fix that; taking turns can:

* the generate worker's engine *touches* a per-machine signal file while it has requests
  (at submit and at every decode step);
* a background job calls ``yield_cpu()`` between training steps, inside them (before each
  transformer block's forward and backward) and between evaluation decode steps; it sleeps
  while the signal is fresh, so its threads are off the cores while a chat reply is decoded.

Training never starves: after ``max_wait`` seconds of continuous chat it runs on for a tenth of
that before yielding again. The signal is a file's mtime (one ``stat`` per check, microseconds),
in ``$CSRA_DATA_DIR/run``, which belongs to one machine.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

HOLD_SECONDS = 0.5  # generation counts as active this long after its last touch
TOUCH_EVERY = 0.05
CHECK_EVERY = 0.01
SLEEP = 0.02
ASK_ENDING_EVERY = 0.5  # while paused, how often the job is asked whether it is to end


class InteractiveSignal:
    """The generate worker says "a chat is being answered"; background jobs listen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._touched = 0.0

    def touch(self) -> None:
        """Mark interactive generation as active now (throttled; never raises)."""
        now = time.monotonic()
        if now - self._touched < TOUCH_EVERY:
            return
        self._touched = now
        try:
            os.utime(self.path)
        except FileNotFoundError:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.touch()
            except OSError:
                logger.debug("cannot create %s", self.path, exc_info=True)
        except OSError:
            logger.debug("cannot touch %s", self.path, exc_info=True)

    def active(self) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime < HOLD_SECONDS
        except OSError:
            return False


class CpuYielder:
    """``yield_cpu()`` for a background job: sleeps while interactive generation is active.

    Waits at most ``max_wait`` seconds at a time; after such a long wait the job runs on for
    ``max_wait / 10`` seconds before it yields again, so it keeps progressing under constant chat.
    ``waited`` adds up the seconds it gave away (reported in training results).
    """

    def __init__(self, signal: InteractiveSignal, max_wait: float = 30.0,
                 ending: Callable[[], bool] | None = None) -> None:
        self.signal, self.max_wait = signal, max_wait
        self.ending = ending  # True once the job is to end (cancelled): asked while it waits
        self.waited = 0.0
        self.pauses = 0
        self._checked = 0.0
        self._free_until = 0.0
        self._ended = False

    def __call__(self, *_: Any) -> None:
        now = time.monotonic()
        if self._ended or now - self._checked < CHECK_EVERY or now < self._free_until:
            return
        self._checked = now
        if not self.signal.active():
            return
        self.pauses += 1
        start = asked = now
        while self.signal.active():
            if time.monotonic() - start >= self.max_wait:
                self._free_until = time.monotonic() + self.max_wait / 10
                break
            if self.ending is not None and time.monotonic() - asked >= ASK_ENDING_EVERY:
                asked = time.monotonic()
                if self.ending():  # a cancelled job stops pausing, so its own check ends it at once
                    self._ended = True
                    break
            time.sleep(SLEEP)
        self.waited += time.monotonic() - start
        self._checked = time.monotonic()


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformer (every element of each ModuleList of same-type modules)."""
    blocks: list[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and any(True for _ in module[0].parameters()):
                blocks.extend(module)
    return blocks


def yield_inside_steps(model: torch.nn.Module, yield_cpu: CpuYielder) -> list[Any]:
    """Hooks that call ``yield_cpu`` before each block's forward and backward; returns their handles."""
    handles = []
    for block in transformer_blocks(model):
        handles.append(block.register_forward_pre_hook(lambda module, args: yield_cpu()))
        handles.append(block.register_full_backward_pre_hook(lambda module, grad_output: yield_cpu()))
    return handles
