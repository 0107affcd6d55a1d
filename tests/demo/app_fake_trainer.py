"""A stand-in for `python -m grace train` in JobManager tests: writes metrics.jsonl the way the trainer does.

    python tests/demo/app_fake_trainer.py MODE --out DIR [--steps N] [any other trainer option]
    python tests/demo/app_fake_trainer.py MODE --resume DIR [--steps N]   (continues after the last step logged)

MODE: finish (N steps, then an end line; with FAKE_TRAINER_FINAL=<checkpoint> its final/ links there), die (killed by SIGKILL after 2 steps, as the OOM killer would),
stubborn (ignores STOP files and SIGTERM: only SIGKILL ends it), garbage (writes a non-JSON line, then a
half-written line, then finishes).
"""

import json
import os
import signal
import sys
import time
from pathlib import Path


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    options = {args[i][2:]: args[i + 1] for i in range(0, len(args) - 1, 2) if args[i].startswith("--")}
    out = Path(options.get("out") or options["resume"])
    start, saved = 0, {}
    if "resume" in options:   # like the trainer: continue from the last checkpoint (the last end line's step)
        ends = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"end"' in x]
        start = ends[-1]["step"] if ends else 0
        saved = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        (out / "STOP").unlink(missing_ok=True)
    steps = int(options.get("steps") or saved.get("steps", 5))
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(out / "metrics.jsonl", "a", buffering=1) as log:
        # like the trainer, a resumed attempt's config line holds the whole configuration
        log.write(json.dumps({**saved, "event": "config", **options, "start_step": start}) + "\n")
        if mode == "garbage":
            log.write("not json\n")
        for step in range(start + 1, steps + 1):
            if (out / "STOP").exists() and mode != "stubborn":
                (out / f"checkpoint-{step - 1}").mkdir(exist_ok=True)
                log.write(json.dumps({"event": "end", "outcome": "stopped", "step": step - 1, "error": None,
                                      "outputs": {"checkpoint": str(out / f"checkpoint-{step - 1}")}}) + "\n")
                return
            log.write(json.dumps({"event": "step", "step": step, "max_steps": steps, "loss": 3.0 / step,
                                  "ce": 2.0 / step, "gdkd": 1.0 / step, "rcka": 0.1, "cka": 0.9, "beta": 1.0,
                                  "ema": 1.0, "tau": 1.0, "gate_mean": 0.5, "gate_min": 0.2, "gate_max": 0.9,
                                  "tokens_per_s": 100.0, "eta_s": steps - step, "nonfinite": 0}) + "\n")
            if mode == "die" and step == 2:
                print("about to be killed", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.2)
        if mode == "garbage":
            log.write('{"event": "step", "step": 99')   # a line cut short: must not be parsed
            log.flush()
        outputs = {}
        if os.environ.get("FAKE_TRAINER_FINAL"):   # a real checkpoint to stand for the run's final/ release
            (out / "final").symlink_to(os.environ["FAKE_TRAINER_FINAL"])
            outputs["final"] = str(out / "final")
        log.write(("\n" if mode == "garbage" else "") + json.dumps(
            {"event": "end", "outcome": "finished", "step": steps, "error": None, "outputs": outputs}) + "\n")


if __name__ == "__main__":
    main()
