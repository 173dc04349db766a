"""Stopping a run cleanly: Ctrl-C and SIGTERM finish the current step and checkpoint first."""

from __future__ import annotations

import signal
import threading

from mode_cli.console import console

# `train.on_nonfinite`: a NaN or inf loss or gradient norm stops the run, or its update is skipped.
NONFINITE_POLICIES = ("stop", "skip")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training after a step and a checkpoint; the CLI exits with
    `exit_code` (130 for SIGINT, 143 for SIGTERM) and prints the message (how to resume)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """While the loop runs, SIGINT and SIGTERM ask it to stop after the current step; a second
    Ctrl-C interrupts at once. The previous handlers come back on exit."""

    EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
    EXIT_CODES_BY_NAME = {signum.name: code for signum, code in EXIT_CODES.items()}

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
        # Python delivers signals to the main thread only; elsewhere leave handling as it is.
        if threading.current_thread() is threading.main_thread():
            for signum in self.EXIT_CODES:
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        console.print(
            f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
            "(Ctrl-C again stops at once, without one)"
        )
