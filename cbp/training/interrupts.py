"""Ctrl-C and SIGTERM that stop training at a consistent point, not in the middle of a step.

A run of days must not be lost to a Ctrl-C or to a cluster's SIGTERM. While :class:`GracefulStop`
is active, those signals only set a flag; the training loop finishes the step it is in, writes a
checkpoint and raises :class:`Interrupted`. A second signal gets the previous handler back, so
Ctrl-C twice still aborts at once (the checkpoint write is atomic, so the last one stays whole).
"""

from __future__ import annotations

import signal
import sys
import threading

import torch


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal after writing a checkpoint; exit with ``128 + signum``."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class GracefulStop:
    """Context manager: SIGINT/SIGTERM set :attr:`signum` instead of stopping the process.

    Signal handlers can only be installed from the main thread; elsewhere (a training loop run in
    a worker thread) this does nothing and signals keep their usual effect.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        self._restore()
        print(f"\ncbp: {signal.Signals(signum).name}: stopping after this step to write a "
              "checkpoint (send it again to abort at once)", file=sys.stderr, flush=True)


def poll(stop: GracefulStop | None, first_bad: torch.Tensor, world_size: int) -> tuple[int, int]:
    """``(signal number or 0, first step with a NaN/inf loss or -1)``, the same on every process:
    a stop and a bad loss seen by one process stop them all at the same step."""
    signum = (stop.signum if stop is not None else None) or 0
    if world_size == 1:
        return signum, int(first_bad)
    flags = torch.stack([torch.tensor(signum, device=first_bad.device), first_bad])
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    signum, bad = flags.tolist()
    return signum, bad
