"""How the Train tab shows a job and the past runs: plain HTML / Markdown / table rows (no gradio)."""

from __future__ import annotations

import html

from .jobs import ACTIVE

RUN_COLUMNS = ["run", "outcome", "steps", "bits", "loss", "CKA", "β", "can"]


def duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    seconds = int(seconds)
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m {seconds % 60:02d}s"


def progress_html(status: dict) -> str:
    state = status.get("state", "idle")
    if state == "idle":
        return "<div class='grace-progress-text'>No training job yet. Fill in the form and press Start.</div>"
    step, total = int(status.get("step") or 0), int(status.get("max_steps") or 0)
    share = min(step / total, 1.0) if total else 0.0
    color = {"failed": "#dc2626", "stopped": "#d97706", "finished": "#16a34a"}.get(state, "#2563eb")
    speed = status.get("tokens_per_s")
    last = status.get("last") or {}
    # While running: the time left; once ended: how long it took (the clock stops at the end).
    parts = [f"<b>{state}</b>", f"run <code>{html.escape(str(status.get('run')))}</code>",
             f"step {step} / {total or '?'}",
             f"ETA {duration(status.get('eta_s'))}" if state in ACTIVE else f"took {duration(status.get('elapsed_s'))}",
             f"{speed:,.0f} tokens/s" if isinstance(speed, (int, float)) else "– tokens/s"]
    if isinstance(last.get("loss"), (int, float)):
        parts.append(f"loss {last['loss']:.4g}")
    if last.get("nonfinite"):
        parts.append(f"<span style='color:#dc2626'>{last['nonfinite']} non-finite steps skipped</span>")
    return (f"<div style='background:#e5e7eb;border-radius:6px;height:14px;overflow:hidden'>"
            f"<div id='train-progress-bar' style='width:{share:.1%};background:{color};height:100%'></div></div>"
            f"<div class='grace-progress-text' style='margin-top:6px'>{' · '.join(parts)}</div>")


def status_markdown(status: dict) -> str:
    state = status.get("state", "idle")
    if status.get("error"):
        return f"**Training {state}.**\n\n```\n{status['error']}\n```"
    if state == "finished":
        return "**Training finished.** Press *Compare the trained model* to try it in the Compare tab."
    if state == "stopped":
        return (f"**Training stopped** at step {status.get('step', 0)}; its last checkpoint was kept. Pick run "
                f"`{status.get('run')}` under *Past runs* to resume it, or to export that checkpoint and compare it.")
    if state == "stopping":
        return "*Stopping: the trainer is writing its checkpoint…*"
    if state in ("starting", "running"):
        return "*Training… (the panels refresh every second)*"
    return ""


def thin(steps: list[dict], most: int = 1000) -> list[dict]:
    """At most about `most` evenly spread step records (and the last), so long runs redraw cheaply."""
    if len(steps) <= most:
        return steps
    every = -(-len(steps) // most)
    return steps[::every] + ([steps[-1]] if (len(steps) - 1) % every else [])


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "–"


def runs_rows(runs: list[dict]) -> list[list]:
    rows = []
    for r in runs:
        can = ["compare" if r["outcome"] == "finished" else "export + compare" if r["comparable"] else "",
               "resume" if r["resumable"] else "", "" if r["outcome"] == "running" else "delete"]
        rows.append([r["run"], r["outcome"], f"{r['step']} / {r['max_steps'] or '?'}", r["bits"] or "–",
                     _fmt(r["loss"]), _fmt(r["cka"]), _fmt(r["beta"]), ", ".join(c for c in can if c)])
    return rows or [["(no runs yet)", "", "", "", "", "", "", ""]]


def row_run(row) -> str | None:
    """The run named by a row of the runs table (None for the placeholder row)."""
    return row[0] if row and row[0] != "(no runs yet)" else None
