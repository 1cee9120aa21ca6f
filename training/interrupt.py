"""Stopping a run on Ctrl-C (SIGINT) or SIGTERM within seconds, keeping the last complete step.

A step at a large size takes minutes; waiting for it to end is not "stopping". So while a step
computes (its forwards and backwards, `StopOnSignal.abortable`), a stop request abandons it: a check
runs before every repeated block's forward and, through a hook on the block's output, in the
backward at every block, and raises `StepAborted`. Nothing of the abandoned step has reached the
weights or the optimizer (they change only after every micro-step's backward), so the checkpoint
written then is the last complete step's, and a resumed run repeats the uninterrupted one exactly.
Outside that phase (the gradient all-reduce, the optimizer step, the log, a checkpoint) a request
stops the run after the step, which is short.

Python runs a signal handler only in the main thread, between bytecodes: a main thread waiting for
a CUDA backward (run by autograd's device threads) would not see it until the backward ends. So the
C-level handler's byte on a wakeup socket (`signal.set_wakeup_fd`) is read by a small thread that
sets the request at once, and the checks read it from whichever thread runs them. The same signal
again, once the first has been handled, acts at once (Ctrl-C: KeyboardInterrupt).

With several processes the signal must reach each one (torchrun passes its SIGINT / SIGTERM on to its
workers; Ctrl-C reaches the whole process group): each abandons its share, and the loop's all-reduce
of the "aborted" flag makes every process discard the step, so no collective call is left unmatched.
Under FSDP (training/fsdp.py) the processes also meet at every block (its weights are all-gathered),
so one that abandoned the step alone would leave the others waiting there: each check is then a vote
(`agree`, called by every process at the same checks) and all abandon the step at the same block.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable
from contextlib import contextmanager

from torch import Tensor, nn

from sampling.offload import blocks_of

log = logging.getLogger(__name__)


class StepAborted(Exception):
    """The step in progress was abandoned on a stop request; its partial gradients are to be discarded."""


class StopOnSignal:
    """Ctrl-C or SIGTERM requests a stop (`requested`); inside `abortable()` the model's blocks raise
    `StepAborted` at the next block, forward or backward. `model`: whose blocks check (None: no checks).
    `agree(requested)`: whether any process requested a stop (None: this process decides alone)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, model: nn.Module | None = None, agree: Callable[[bool], bool] | None = None):
        self.model = model
        self.agree = agree
        self._requested = threading.Event()
        self._abortable = False
        self._previous: dict[int, object] = {}
        self._hooks: list = []
        self._writer: socket.socket | None = None  # the wakeup socket's end the C-level handler writes to
        self._previous_fd = -1

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
            reader, writer = socket.socketpair()
            writer.setblocking(False)  # the C handler must never block
            self._previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            self._writer = writer
            threading.Thread(target=self._watch, args=(reader,), daemon=True, name="stop-on-signal").start()
        for block in blocks_of(self.model) if self.model is not None else []:
            self._hooks.append(block.register_forward_pre_hook(lambda module, args: self.check()))
            self._hooks.append(block.register_forward_hook(self._check_in_backward))
        return self

    def _watch(self, reader: socket.socket) -> None:
        """Reads the signal numbers the C-level handler writes, as they arrive."""
        with reader:
            while data := reader.recv(64):  # b"": the writer was closed, the run is over
                if any(s in data for s in self.SIGNALS):
                    self._requested.set()

    def _handle(self, signum, frame) -> None:
        """The Python-level handler (main thread): the request, the message, and the old handler back."""
        self._requested.set()
        signal.signal(signum, self._previous[signum])
        log.warning("%s: stopping now; the last complete step is kept in a checkpoint (again to quit at once)",
                    signal.Signals(signum).name)

    def check(self) -> None:
        """Raise `StepAborted` if a stop was requested (in any process, with `agree`) while the step may be
        abandoned."""
        if not self._abortable:
            return
        requested = self._requested.is_set()
        if self.agree is not None:
            requested = self.agree(requested)
        if requested:
            raise StepAborted

    def _check_in_backward(self, module: nn.Module, args, output) -> None:
        """A forward hook: the backward checks too, when it reaches this block's output."""
        outputs = output if isinstance(output, tuple) else (output,)
        tensor = next((t for t in outputs if isinstance(t, Tensor) and t.requires_grad), None)
        if tensor is not None:
            tensor.register_hook(lambda grad: self.check())

    @contextmanager
    def abortable(self):
        """The forwards and backwards of one step: a stop request abandons them (`StepAborted`)."""
        self._abortable = True
        try:
            self.check()
            yield
        finally:
            self._abortable = False

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._writer is not None:
            signal.set_wakeup_fd(self._previous_fd)
            self._writer.close()  # the watcher reads the end of the stream and ends
            self._writer = None
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
