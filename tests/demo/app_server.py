"""Start `python app.py` as a subprocess on a free port, pointed at the checkpoint fixtures, for app tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEV_FAMILY = "development models (random weights)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_env(fixtures: Path, work: Path, **extra: str) -> dict[str, str]:
    """Environment of a test server: fixtures as the offline family (no zoo), no Hub, runs under `work`."""
    env = {**os.environ, "GRACE_FIXTURES": str(fixtures), "GRACE_ZOO": str(work / "no-zoo"), "GRACE_HUB": "off",
           "HF_HUB_OFFLINE": "1", "GRACE_RUNS_DIR": str(work / "runs"), "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


@contextlib.contextmanager
def running_app(env: dict[str, str], args: list[str] = (), timeout: float = 120.0):
    """Yield the base URL of a running app; stop it (and say why it failed to start) afterwards."""
    port = free_port()
    log_path = Path(env.get("GRACE_RUNS_DIR", "/tmp")).parent / f"app-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), *args], cwd=REPO, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"app.py exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"app.py did not answer within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
