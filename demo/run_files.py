"""What a run folder says about its run, read back from its files: metrics.jsonl (config, steps, end),
its checkpoints, its log. Used for the live job and for the list of past runs. No gradio here."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from grace.trainer import METRICS_FILE

log = logging.getLogger(__name__)

LOG_FILE = "train.log"


def read_metrics(path: Path, offset: int = 0, partial: bytes = b"") -> tuple[list[dict], int, bytes]:
    """Complete JSON lines of metrics.jsonl from `offset`: (records, new offset, the unfinished line)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return [], offset, partial
    lines = (partial + chunk).split(b"\n")
    records = []
    for line in lines[:-1]:
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: skipping a line that is not JSON", path)
    return records, offset + len(chunk), lines[-1]


@dataclass
class RunLog:
    """What one run folder's metrics say: its config line, step records (a resumed run's lost steps dropped),
    its end line."""

    config: dict | None = None
    steps: list[dict] = field(default_factory=list)
    end: dict | None = None
    offset: int = 0
    partial: bytes = b""

    def add(self, records: list[dict]) -> None:
        for record in records:
            event = record.get("event")
            if event == "step":
                self.steps.append(record)
            elif event == "config":
                start = record.get("start_step")
                if isinstance(start, int):   # resumed: steps after the checkpoint were redone
                    self.steps = [s for s in self.steps if isinstance(s.get("step"), int) and s["step"] <= start]
                # a resumed run's config line may name only what changed: keep what the first one said
                self.config, self.end = {**(self.config or {}), **record}, None
            elif event == "end":
                self.end = record

    def read(self, folder: Path) -> "RunLog":
        records, self.offset, self.partial = read_metrics(folder / METRICS_FILE, self.offset, self.partial)
        self.add(records)
        return self


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
    has_checkpoint = any(p.is_dir() and not p.name.endswith(".partial") for p in folder.glob("checkpoint-*"))
    return {"run": folder.name, "outcome": outcome, "step": last.get("step", 0), "max_steps": config.get("steps"),
            "bits": config.get("bits"), "loss": last.get("loss"), "cka": last.get("cka"), "beta": last.get("beta"),
            "teacher": config.get("teacher"), "student": config.get("student"),
            "outputs": relative_outputs(end, folder),
            "resumable": outcome in ("stopped", "failed", "interrupted") and has_checkpoint,
            "comparable": outcome == "finished" or (outcome != "running" and has_checkpoint)}
