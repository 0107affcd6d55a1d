"""Stop requests: SIGTERM / SIGINT, or a STOP file in the run folder (how the app asks)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from .metrics import STOP_FILE


class StopRequest:
    """Set by SIGTERM / SIGINT (a second SIGINT interrupts at once) or by a STOP file in the run folder.
    The loop asks `requested()` at each step boundary; the run then checkpoints and ends as stopped."""

    def __init__(self, run_dir: Path):
        self.stop_file = Path(run_dir) / STOP_FILE
        self.signalled: str | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # signals only reach the main thread
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, _frame):
        self.signalled = signal.Signals(signum).name
        if signum == signal.SIGINT:     # a second Ctrl-C should not have to wait for the step to end
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))
        print(f"\n{self.signalled}: stopping after this step (checkpoint first)", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        return self.signalled is not None or self.stop_file.exists()

    @property
    def reason(self) -> str:
        return self.signalled or f"{self.stop_file} found"


def clear_stop_file(run_dir: Path, why: str | None = None) -> None:
    """Remove a STOP file: consumed by a stop, or stale at the start of a run (so it does not stop at once)."""
    stop_file = Path(run_dir) / STOP_FILE
    if stop_file.exists():
        if why:
            print(f"removing {stop_file}: {why}", file=sys.stderr)
        stop_file.unlink(missing_ok=True)
