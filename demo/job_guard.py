"""`python -m demo.job_guard --stop-file RUN/STOP -- COMMAND...`: runs a training command and ends it if the server goes away.

The app starts every training job through this guard, in its own process group. The guard waits
for the trainer and watches its own parent (the server): if the server dies, even by SIGKILL, the
guard writes the trainer's stop file (the trainer checkpoints and ends), then escalates to SIGTERM and
SIGKILL. So no trainer outlives its server by more than STOP_KILL_AFTER_S. The guard exits the way
the trainer did (same code, or the same signal).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STOP_TERM_AFTER_S = 15.0    # after a stop request: SIGTERM if the trainer has not ended by then ...
STOP_KILL_AFTER_S = 30.0    # ... and SIGKILL after this
POLL_S = 0.25


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.job_guard")
    parser.add_argument("--stop-file", required=True, type=Path, help="the file the trainer's stop request is")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    server = os.getppid()
    # SIGTERM to the group reaches the trainer too, which checkpoints; the guard waits for it to finish.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    server_gone_at = None
    while (code := child.poll()) is None:
        if server_gone_at is None and os.getppid() != server:
            server_gone_at = time.monotonic()
            print("job_guard: the server has gone; stopping the training job", file=sys.stderr, flush=True)
            args.stop_file.touch()
        if server_gone_at is not None:
            waited = time.monotonic() - server_gone_at
            if waited > STOP_KILL_AFTER_S:
                child.kill()
            elif waited > STOP_TERM_AFTER_S:
                child.terminate()
        time.sleep(POLL_S)
    if code < 0:   # end the way the trainer ended, so the server sees the signal
        if -code not in (signal.SIGKILL, signal.SIGSTOP):   # those cannot be handled, so need no reset
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main())
