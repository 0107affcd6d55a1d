"""Load test of the app's `compare` endpoint: N concurrent gradio_client clients, latency percentiles.

    python bench/load_compare.py --clients 8 16                  # starts app.py on the fixtures
    python bench/load_compare.py --url http://127.0.0.1:7860/ --clients 8 --family "offline zoo (assets/zoo)"

Each client sends --requests compare requests one after another (every variant of the family answers
each); the table gives completed / failed requests and end-to-end latency (queue wait included).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEV_FAMILY = "development models (random weights)"


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@contextmanager
def local_app(fixtures: Path, log_path: Path, extra_env: dict[str, str]):
    """app.py on a free port serving the fixtures (no zoo, no Hub); yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRACE_FIXTURES": str(fixtures), "GRACE_ZOO": str(log_path.parent / "no-zoo"),
           "GRACE_HUB": "off", "HF_HUB_OFFLINE": "1", "GRACE_TRAIN": "0", **extra_env}
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            if process.poll() is not None:
                raise SystemExit(f"app.py exited:\n{log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise SystemExit("app.py did not start within 2 minutes")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def run_load(url: str, clients: int, requests: int, family: str, image: Path, max_new_tokens: int) -> dict:
    from gradio_client import Client, handle_file

    latencies: list[float] = []
    failures: Counter = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def worker():
        client = Client(url, verbose=False)
        barrier.wait()                          # every client connected: start together
        for _ in range(requests):
            started = time.perf_counter()
            try:
                result = client.predict(family=family, variants="", image=handle_file(str(image)),
                                        question="What color is the circle?", max_new_tokens=max_new_tokens,
                                        api_name="/compare")
                bad = [c["label"] for c in result["columns"] if c["status"] != "done"]
                if bad:
                    raise RuntimeError(f"columns failed: {bad}")
                with lock:
                    latencies.append(time.perf_counter() - started)
            except Exception as err:  # counted and reported, the load goes on
                with lock:
                    failures[f"{type(err).__name__}: {str(err)[:80]}"] += 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"clients": clients, "sent": clients * requests, "completed": len(latencies),
            "failed": sum(failures.values()), "failures": failures, "wall_s": wall,
            **{f"p{q}": percentile(latencies, q) for q in (50, 90, 99)}, "max": max(latencies, default=None)}


def table(rows: list[dict]) -> str:
    def s(x):
        return "–" if x is None else f"{x:.2f}"

    lines = ["| clients | requests | completed | failed | p50 (s) | p90 (s) | p99 (s) | max (s) | throughput (req/s) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['sent']} | {r['completed']} | {r['failed']} | {s(r['p50'])} | "
                     f"{s(r['p90'])} | {s(r['p99'])} | {s(r['max'])} | {r['completed'] / r['wall_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running app (default: start app.py on the fixtures)")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 16], help="concurrent clients per round")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, sent one after another")
    parser.add_argument("--family", default=DEV_FAMILY)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--image", type=Path, default=REPO / "assets" / "examples" / "red-circle-blue-square.png")
    parser.add_argument("--fixtures", type=Path,
                        default=Path(os.environ.get("GRACE_FIXTURES", REPO.parent / "shared" / "fixtures")))
    parser.add_argument("--concurrency", help="GRACE_CONCURRENCY of the started app")
    args = parser.parse_args(argv)

    extra = {"GRACE_CONCURRENCY": args.concurrency} if args.concurrency else {}
    log_path = Path("/tmp") / f"grace-load-compare-{os.getpid()}.log"
    with (local_app(args.fixtures, log_path, extra) if not args.url else _given(args.url)) as url:
        run_load(url, 1, 1, args.family, args.image, args.max_new_tokens)   # warm-up: models load once
        rows = []
        for clients in args.clients:
            rows.append(run_load(url, clients, args.requests, args.family, args.image, args.max_new_tokens))
            print(f"{clients} clients done", file=sys.stderr)
    print(table(rows))
    for r in rows:
        for why, count in r["failures"].items():
            print(f"- {r['clients']} clients: {count} x {why}")
    return 0


@contextmanager
def _given(url: str):
    yield url


if __name__ == "__main__":
    sys.exit(main())
