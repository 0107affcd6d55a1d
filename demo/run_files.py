"""What a run folder says about its run, read back from its files: metrics.jsonl (config, steps, end),
its checkpoints, its log. Used for the live job and for the list of past runs. No gradio here."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from grace.train.metrics import CHECKPOINT_PREFIX, METRICS_FILE, PARTIAL_SUFFIX, MetricsReader

log = logging.getLogger(__name__)

LOG_FILE = "train.log"


class RunLog:
    """The app's view of a run's metrics.jsonl, tailed with grace.train's reader: a resumed run's attempts
    folded into one series (the steps redone after a resume appear once), half-written lines waited for."""

    def __init__(self):
        self.reader: MetricsReader | None = None

    def read(self, folder: Path) -> "RunLog":
        if self.reader is None:
            self.reader = MetricsReader(Path(folder) / METRICS_FILE)
        self.reader.poll()
        return self

    @property
    def config(self) -> dict | None:
        return self.reader.metrics.config if self.reader else None

    @property
    def steps(self) -> list[dict]:
        return self.reader.metrics.steps if self.reader else []

    @property
    def end(self) -> dict | None:
        return self.reader.metrics.end if self.reader else None


def relative_outputs(end: dict | None, run_dir: Path) -> dict[str, str]:
    outputs = {}
    for key, path in ((end or {}).get("outputs") or {}).items():
        if isinstance(path, str) and path:
            try:
                outputs[key] = str(Path(path).resolve().relative_to(run_dir.resolve()))
            except ValueError:
                outputs[key] = Path(path).name
    return outputs


def plain(message: str) -> str:
    """A trainer message for the UI: no exception class name in front, no server folders."""
    message = re.sub(r"^(\w+\.)*\w*(Error|Exception|Interrupt)\b:?\s*", "", str(message).strip())
    return re.sub(r"(/[^\s:'\"]+)+/", "…/", message)


def log_tail(run_dir: Path, lines: int = 8) -> str:
    try:
        text = (run_dir / LOG_FILE).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    # What the trainer printed, without traceback frames, class names or server folders (the full log
    # stays in the run folder for the operator).
    frame = re.compile(r"^(Traceback|\s+File |\s+\^|\s{4}|During handling|The above exception)")
    text = [plain(line) for line in text if line.strip() and not frame.match(line)][-lines:]
    return "\nLast lines of its log:\n" + "\n".join(text) if text else ""




def describe_run(folder: Path, active: bool = False) -> dict:
    """One past run: name, outcome, steps, last metrics, what it can do (resume, compare)."""
    logged = RunLog().read(folder)
    config, last, end = logged.config or {}, (logged.steps or [{}])[-1], logged.end or {}
    outcome = "running" if active else str(end.get("outcome") or "interrupted")
    has_checkpoint = any(p.is_dir() and not p.name.endswith(PARTIAL_SUFFIX) for p in folder.glob(CHECKPOINT_PREFIX + "*"))
    return {"run": folder.name, "outcome": outcome, "step": last.get("step", 0), "max_steps": config.get("steps"),
            "bits": config.get("bits"), "loss": last.get("loss"), "cka": last.get("cka"), "beta": last.get("beta"),
            "teacher": config.get("teacher"), "student": config.get("student"),
            "outputs": relative_outputs(end, folder),
            "resumable": outcome in ("stopped", "failed", "interrupted") and has_checkpoint,
            "comparable": outcome == "finished" or (outcome != "running" and has_checkpoint)}
