"""metrics.jsonl: the writer's JSON (no NaN), the reader's folding of resumed attempts and its tailing."""

import json
import math

import pytest

from grace.train.metrics import MetricsReader, MetricsWriter, read_metrics


def write(path, *records):
    with open(path, "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def step(n, **more):
    return {"event": "step", "step": n, **more}


def test_writer_turns_non_finite_numbers_into_null(tmp_path):
    writer = MetricsWriter(tmp_path / "m.jsonl")
    writer.write("step", step=1, loss=math.nan, grad=math.inf, nested={"x": [1.0, -math.inf]}, path=tmp_path)
    writer.close()
    line = json.loads((tmp_path / "m.jsonl").read_text())     # strict JSON: NaN would not parse in JS
    assert line == {"event": "step", "step": 1, "loss": None, "grad": None, "nested": {"x": [1.0, None]},
                    "path": str(tmp_path)}
    MetricsWriter(tmp_path / "off.jsonl", enabled=False).write("step", step=1)     # other processes write nothing
    assert not (tmp_path / "off.jsonl").exists()


def test_reader_folds_a_resume_into_one_series(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write(path, {"event": "config", "start_step": 0}, *[step(n, attempt=1) for n in range(1, 6)],
          {"event": "checkpoint", "step": 3}, {"event": "end", "outcome": "stopped", "step": 5})
    first = read_metrics(path)
    assert [s["step"] for s in first.steps] == [1, 2, 3, 4, 5] and first.end["outcome"] == "stopped"
    write(path, {"event": "config", "start_step": 3}, step(4, attempt=2))
    again = read_metrics(tmp_path)                                  # a run folder works too
    assert [(s["step"], s["attempt"]) for s in again.steps] == [(1, 1), (2, 1), (3, 1), (4, 2)]
    assert again.discarded == 2 and again.attempts == 2
    assert again.end is None                                        # the stopped attempt's end is stale
    assert again.checkpoint["step"] == 3 and again.step == 4


def test_reader_repairs_a_repeated_step_without_a_config_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write(path, step(1), step(2), step(3), step(2, again=True), step(3, again=True))
    metrics = read_metrics(path)
    assert [s["step"] for s in metrics.steps] == [1, 2, 3] and metrics.steps[1].get("again")
    assert metrics.discarded == 2


def test_reader_tails_complete_lines_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    reader = MetricsReader(path)
    assert reader.poll() == [] and reader.metrics.steps == []      # no file yet
    with open(path, "w") as f:
        f.write(json.dumps(step(1)) + "\n" + '{"event": "st')
    assert [r["step"] for r in reader.poll()] == [1]
    with open(path, "a") as f:
        f.write('ep", "step": 2}\nnot json\n[1, 2]\n')
    assert [r["step"] for r in reader.poll()] == [2]
    assert [s["step"] for s in reader.metrics.steps] == [1, 2] and reader.metrics.skipped_lines == 2


class TwoProcesses:
    """An accelerator stand-in: gather() stacks this process's row with another process's."""

    num_processes, device = 2, "cpu"

    def __init__(self, other_row):
        self.other_row = other_row

    def gather(self, local):
        import torch

        return torch.cat([local, torch.tensor([self.other_row], dtype=local.dtype)])


def micro(**values):
    return {"tokens": 3, "input_tokens": 10, "nonfinite": 0, **values}


def test_summarize_means_over_processes_and_ors_the_flags():
    """Each process's clock decides alone whether a checkpoint is due; the OR makes every process write
    it (or none), so none waits in a collective the others skip."""
    from grace.train.metrics import MEAN_KEYS, summarize

    mine = [micro(loss=1.0, ce=1.0), micro(loss=3.0, ce=2.0)]
    # The other process: loss sum 4 over 1 micro-batch, ce sum 2 over 1; its checkpoint clock is due.
    other = []
    for key in MEAN_KEYS:
        other += {"loss": [4.0, 1], "ce": [2.0, 1]}.get(key, [0.0, 0])
    other += [math.inf, -math.inf, 5, 20, 1, 0.0, 1.0]
    out = summarize(mine, TwoProcesses(other), {"stop": False, "checkpoint_due": False})
    assert out["loss"] == pytest.approx(8.0 / 3) and out["ce"] == pytest.approx(5.0 / 3) and out["gdkd"] is None
    assert (out["tokens"], out["input_tokens"], out["nonfinite"]) == (11, 40, 1)
    assert out["stop"] is False and out["checkpoint_due"] is True
