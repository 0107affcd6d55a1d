"""Checkpoints of a run: what one holds, how it is written (atomically), found, read back, and when one is due.

checkpoint-<step>/ holds model.safetensors (the student), optimizer.pt, scheduler.pt, trainer_state.json
(step, data stream position, objective state such as the controller, config) and rng_state_<rank>.pt.
Under DeepSpeed, deepspeed/ (the engine's own checkpoint through accelerate's save_state: each
process's ZeRO partition of the optimizer) replaces the model, optimizer and scheduler files.
It is written to checkpoint-<step>.partial/ and renamed, so a crash never leaves a half checkpoint.

Why not accelerate's save_state / load_state otherwise: load_state restores the RNG states inside a bare
`except Exception` (a failed restore only logs "Could not load random states" and the resumed run
silently leaves the trajectory), and save_state snapshots the RNG at save time, while a checkpoint
written after a failure must hold the states of the last step boundary. RNG states are stored as
tensors and plain numbers, so every file loads with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from .metrics import CHECKPOINT_PREFIX, PARTIAL_SUFFIX, STATE_FILE

ENGINE_DIR = "deepspeed"     # under DeepSpeed: the engine's checkpoint, written by accelerate's save_state


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which, where and why, in plain words."""


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_step(path: Path) -> int | None:
    suffix = path.name[len(CHECKPOINT_PREFIX):] if path.name.startswith(CHECKPOINT_PREFIX) else ""
    return int(suffix) if suffix.isdigit() else None


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    found = [p for p in Path(run_dir).glob(CHECKPOINT_PREFIX + "*")
             if p.is_dir() and checkpoint_step(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder itself, or a run folder's latest complete checkpoint."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = checkpoint_dirs(path) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(f"nothing to resume in {path}: no {CHECKPOINT_PREFIX}<step>/ with {STATE_FILE}")
    return found[-1]


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    """The saved TrainConfig fields of a run folder's latest checkpoint (or of a checkpoint folder)."""
    return json.loads((find_checkpoint(path) / STATE_FILE).read_text(encoding="utf-8"))["config"]


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror + (f" ({err.filename})" if err.filename else "")
    return str(err) or type(err).__name__


class Checkpointer:
    """Writes checkpoint-<step>/ under a run folder (through .partial and a rename); keeps the newest `keep`."""

    def __init__(self, run_dir: Path, accelerator, keep: int, deepspeed: bool = False):
        self.run_dir, self.accelerator, self.keep, self.deepspeed = Path(run_dir), accelerator, keep, deepspeed

    def save(self, step: int, student, optimizer, scheduler, state: dict, rng: dict, sync: bool = True) -> Path:
        """Write the checkpoint of `step`; raise CheckpointError (after removing the partial folder)
        when any file cannot be written, e.g. a full disk."""
        acc, final = self.accelerator, self.run_dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp = final.with_name(final.name + PARTIAL_SUFFIX)
        try:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            if sync:
                acc.wait_for_everyone()
            torch.save(rng, tmp / f"rng_state_{acc.process_index}.pt")
            if self.deepspeed:      # every process writes its ZeRO partition (a collective)
                acc.save_state(str(tmp / ENGINE_DIR))
            if acc.is_main_process:
                if not self.deepspeed:
                    save_model(student, str(tmp / "model.safetensors"))
                    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        except Exception as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"could not write the checkpoint of step {step} to {final}: {_reason(err)}. "
                                  "The run stopped so that no more work is at risk; free space (or fix the "
                                  "folder) and resume from the last checkpoint.") from err
        if sync:
            acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in checkpoint_dirs(self.run_dir)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        if sync:
            acc.wait_for_everyone()
        return final

    def load_engine(self, path: Path) -> None:
        """DeepSpeed: restore the engine (weights, optimizer partitions, schedule) after prepare, then
        this process's RNG states again (load_state sets its own)."""
        self.accelerator.load_state(str(Path(path) / ENGINE_DIR))
        rng_file = Path(path) / f"rng_state_{self.accelerator.process_index}.pt"
        set_rng_state(torch.load(rng_file if rng_file.is_file() else path / "rng_state_0.pt", weights_only=True))

    @staticmethod
    def load(path: Path, student, optimizer, scheduler, process_index: int, engine_state: bool = True) -> dict:
        """Restore student / optimizer / scheduler (unless `engine_state` is False: DeepSpeed restores
        those after prepare) and this process's RNG; return trainer_state.json."""
        rng_file = path / f"rng_state_{process_index}.pt"
        set_rng_state(torch.load(rng_file if rng_file.is_file() else path / "rng_state_0.pt", weights_only=True))
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        if not engine_state:
            return state
        device = next(student.parameters()).device
        missing, unexpected = load_model(student, str(path / "model.safetensors"), strict=False, device=str(device))
        if missing or unexpected:
            raise ValueError(f"{path}: checkpoint does not match the student (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); were bits / group_size / student changed?")
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
        return state


class CheckpointTimer:
    """Checkpoints by time: one is due `minutes` after the last (0: never by time). The interval
    stretches to 1 / MAX_SHARE times the last write's duration, so a model whose checkpoint takes a
    minute to write is checkpointed every ten, and writing never takes more than ~10 % of the run."""

    MAX_SHARE = 0.1

    def __init__(self, minutes: float, clock=time.monotonic):
        self.minutes, self.clock = float(minutes), clock
        self.last, self.write_seconds = clock(), 0.0

    @property
    def interval(self) -> float:
        return max(self.minutes * 60.0, self.write_seconds / self.MAX_SHARE)

    def due(self) -> bool:
        return self.minutes > 0 and self.clock() - self.last >= self.interval

    def saved(self, write_seconds: float) -> None:
        self.last, self.write_seconds = self.clock(), float(write_seconds)
