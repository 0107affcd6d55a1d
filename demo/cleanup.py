"""Keeps the server's disk use bounded: old training runs past an age or size budget, and old files in
Gradio's upload cache (uploads, downloads), are deleted. Runs at start-up and then every CLEAN_EVERY_S."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

CLEAN_EVERY_S = 1800.0


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def prune_runs(runs_dir: Path, max_bytes: int, max_age_days: float, keep: set[str] = frozenset(),
               now: float | None = None) -> list[str]:
    """Delete run folders (oldest first) older than max_age_days (0: no age limit), then until the rest
    fit in max_bytes. Folders named in `keep` (the running job) stay. Returns the deleted names."""
    if not runs_dir.is_dir():
        return []
    now = time.time() if now is None else now
    runs = sorted((p for p in runs_dir.iterdir() if p.is_dir() and p.name not in keep), key=lambda p: p.stat().st_mtime)
    sizes = {p: folder_bytes(p) for p in runs}
    total = sum(sizes.values()) + sum(folder_bytes(runs_dir / k) for k in keep if (runs_dir / k).is_dir())
    deleted = []
    for run in runs:
        too_old = max_age_days > 0 and now - run.stat().st_mtime > max_age_days * 86400
        if too_old or total > max_bytes:
            shutil.rmtree(run, ignore_errors=True)
            total -= sizes[run]
            deleted.append(run.name)
    if deleted:
        log.info("deleted %d old training runs: %s", len(deleted), ", ".join(deleted))
    return deleted


def prune_files(folder: Path, max_age_hours: float, now: float | None = None) -> int:
    """Delete files under `folder` not modified for max_age_hours, and the folders left empty."""
    if not folder.is_dir() or max_age_hours <= 0:
        return 0
    now = time.time() if now is None else now
    removed, emptied = 0, set()
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        try:
            if path.is_file() and now - path.stat().st_mtime > max_age_hours * 3600:
                path.unlink()
                removed += 1
                emptied.add(path.parent)
            elif path in emptied and path != folder and not any(path.iterdir()):
                path.rmdir()   # only folders this pass emptied: gradio's own (empty) folders stay
                emptied.add(path.parent)
        except OSError:
            pass
    if removed:
        log.info("deleted %d cached files older than %g hours from %s", removed, max_age_hours, folder)
    return removed


def start_cleaner(settings, upload_folder: Path, active_run) -> threading.Thread:
    """A daemon thread pruning the runs folder and the upload cache now and every CLEAN_EVERY_S."""
    def loop():
        while True:
            try:
                keep = {active_run()} - {None}
                prune_runs(Path(settings.runs_dir), settings.runs_max_bytes, settings.runs_max_age_days, keep)
                prune_files(upload_folder, settings.uploads_max_age_hours)
            except Exception:  # noqa: BLE001 - a failed clean-up must not stop the server
                log.exception("clean-up failed")
            time.sleep(CLEAN_EVERY_S)

    thread = threading.Thread(target=loop, daemon=True, name="cleanup")
    thread.start()
    return thread
