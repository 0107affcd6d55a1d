"""A run folder's names, and its metrics.jsonl: the writer the trainer appends to and the reader the app tails.

metrics.jsonl holds one JSON object per line, flushed as written, each with an "event":

    config       one per attempt (the first run and each resume): the settings; `start_step` is the
                 step the attempt starts from (its checkpoint's), `discarded_steps` how many step
                 lines of earlier attempts lay past it (work lost since that checkpoint)
    step         one per optimizer step (STEP_FIELDS; a value that does not apply is null)
    checkpoint   a checkpoint was written (step, path, seconds it took)
    end          the attempt ended: outcome finished | stopped | failed, step, error (a sentence), outputs

The file is only ever appended to (a reader may be tailing it); `read_metrics` / `MetricsReader` fold
the attempts into one clean series: after a resume from step k, step lines past k written before
it are dropped, so every step number appears once, increasing, from the attempt that stands.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

# -- the run folder -------------------------------------------------------------------------------------
METRICS_FILE = "metrics.jsonl"
STOP_FILE = "STOP"                       # its presence asks the run to stop at the next step boundary
STATE_FILE = "trainer_state.json"        # inside each checkpoint-<step>/
CHECKPOINT_PREFIX = "checkpoint-"
PARTIAL_SUFFIX = ".partial"              # a checkpoint being written; renamed when complete
FINAL_DIR = "final"                      # the GRACE QAT release (or plain bf16 for 16 bits)
EXPORT_DIRS = {4: "export-awq", 8: "export-int8"}

STEP_FIELDS = ("step", "time", "max_steps", "lr", "loss", "ce", "gdkd", "kd", "rcka", "cka", "beta", "ema", "tau",
               "kd_weight", "rcka_weight", "gate_mean", "gate_min", "gate_max", "grad_norm", "quant_scale", "tokens",
               "tokens_per_s", "step_s", "nonfinite", "eta_s")


def json_value(value):
    """NaN / Inf become null: JSON has no such numbers, and the app parses every line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, dict):
        return {k: json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return value


class MetricsWriter:
    """Appends to metrics.jsonl, one line per record, flushed at once. Only the main process writes."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.file = open(self.path, "a", encoding="utf-8") if enabled else None

    def write(self, event: str, **fields) -> None:
        if self.file is not None:
            self.file.write(json.dumps(json_value({"event": event, **fields})) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


@dataclass
class RunMetrics:
    """What a metrics.jsonl says, resumed attempts folded into one series."""

    config: dict | None = None                          # the latest attempt's config line
    steps: list[dict] = field(default_factory=list)     # step lines, step numbers strictly increasing
    end: dict | None = None                             # the latest attempt's end line (None while it runs)
    attempts: int = 0                                   # config lines seen
    discarded: int = 0                                  # step lines dropped: redone after a resume
    checkpoint: dict | None = None                      # the latest checkpoint line still standing
    skipped_lines: int = 0                              # lines that were not JSON objects

    @property
    def step(self) -> int:
        return self.steps[-1]["step"] if self.steps else 0

    def add(self, record: dict) -> None:
        event = record.get("event")
        if event == "config":
            self.attempts += 1
            self.config, self.end = record, None
            start = record.get("start_step")
            if isinstance(start, int):
                self._rewind(start)
        elif event == "step" and isinstance(record.get("step"), int):
            self._rewind(record["step"] - 1)            # a repeated step number replaces what came after
            self.steps.append(record)
        elif event == "checkpoint":
            self.checkpoint = record
        elif event == "end":
            self.end = record

    def _rewind(self, step: int) -> None:
        keep = len(self.steps)
        while keep and self.steps[keep - 1]["step"] > step:
            keep -= 1
        self.discarded += len(self.steps) - keep
        del self.steps[keep:]
        if self.checkpoint is not None and self.checkpoint.get("step", 0) > step:
            self.checkpoint = None


class MetricsReader:
    """Tails a metrics.jsonl: each `poll()` parses the complete lines appended since the last one
    (a line still being written waits for its newline) and folds them into `self.metrics`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metrics = RunMetrics()
        self._offset, self._partial = 0, b""

    def poll(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        records = []
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if not isinstance(record, dict):
                self.metrics.skipped_lines += 1
                continue
            self.metrics.add(record)
            records.append(record)
        return records


def read_metrics(path: str | os.PathLike) -> RunMetrics:
    """The whole of a metrics.jsonl (or of a run folder's), folded; empty when there is none yet."""
    path = Path(path)
    reader = MetricsReader(path / METRICS_FILE if path.is_dir() else path)
    reader.poll()
    return reader.metrics


# -- console progress -----------------------------------------------------------------------------------

def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def format_number(value, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}g}"


def progress_line(line: dict) -> str:
    f = format_number
    return (f"step {line['step']}/{line['max_steps']}  loss {f(line['loss'])}  ce {f(line['ce'])}  "
            f"gdkd {f(line['gdkd'])}  cka {f(line['cka'])}  beta {f(line['beta'])}  lr {line['lr']:.3g}  "
            f"{line['tokens_per_s']:.0f} tok/s  eta {format_duration(line['eta_s'])}")


# -- one step's numbers ---------------------------------------------------------------------------------

MEAN_KEYS = ("loss", "ce", "gdkd", "kd", "rcka", "cka", "gate_mean")


def summarize(micro: list[dict], accelerator, flags: dict[str, bool]) -> dict:
    """Means over micro-batches and processes (NaN in, NaN out; None where no micro-batch has the
    value), gate min / max, token counts, and each flag OR-ed over processes, so every process
    takes the same decision (stop, checkpoint) at the same step."""
    import torch

    row = []
    for key in MEAN_KEYS:
        values = [m[key] for m in micro if key in m]
        row += [sum(values), len(values)]
    gate_min = [m["gate_min"] for m in micro if "gate_min" in m]
    gate_max = [m["gate_max"] for m in micro if "gate_max" in m]
    row += [min(gate_min, default=math.inf) if all(map(math.isfinite, gate_min)) else math.nan,
            max(gate_max, default=-math.inf) if all(map(math.isfinite, gate_max)) else math.nan,
            sum(m["tokens"] for m in micro), sum(m["input_tokens"] for m in micro),
            sum(m["nonfinite"] for m in micro)] + [float(bool(v)) for v in flags.values()]
    local = torch.tensor(row, dtype=torch.float64, device=accelerator.device)
    table = accelerator.gather(local[None]) if accelerator.num_processes > 1 else local[None]
    total = table.sum(0).tolist()
    out = {}
    for i, key in enumerate(MEAN_KEYS):
        count = total[2 * i + 1]
        out[key] = total[2 * i] / count if count else None
    n = 2 * len(MEAN_KEYS)
    gate_min, gate_max = table[:, n].min().item(), table[:, n + 1].max().item()
    out["gate_min"] = gate_min if out["gate_mean"] is not None and math.isfinite(gate_min) else None
    out["gate_max"] = gate_max if out["gate_mean"] is not None and math.isfinite(gate_max) else None
    out["tokens"], out["input_tokens"], out["nonfinite"] = int(total[n + 2]), int(total[n + 3]), int(total[n + 4])
    for i, name in enumerate(flags):
        out[name] = total[n + 5 + i] > 0
    return out
