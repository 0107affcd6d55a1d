"""GRACE training: a quantization-aware student distilled from a frozen teacher.

    grace.train(TrainConfig(teacher=..., student=..., bits=4, steps=1000, out="runs/w4"))
    python -m grace train --teacher T --student S --bits 4 --out runs/w4

One job per module: config (TrainConfig, TrainResult: the defaults), objectives (CE, KD, GRACE),
models (student / teacher loading and checks), sampler (the resumable data stream), checkpoint,
metrics (the run folder's names, metrics.jsonl writer and reader), control (stop requests),
loop (the trainer), cli.
"""

import sys
import types

from .checkpoint import CheckpointError, find_checkpoint, read_checkpoint_config
from .config import OBJECTIVES, PRESETS, TrainConfig, TrainResult
from .loop import train
from .metrics import (CHECKPOINT_PREFIX, EXPORT_DIRS, FINAL_DIR, METRICS_FILE, STATE_FILE, STOP_FILE, MetricsReader,
                      RunMetrics, read_metrics)
from .objectives import CEObjective, GraceObjective, KDObjective, build_objective

__all__ = ["CHECKPOINT_PREFIX", "CEObjective", "CheckpointError", "EXPORT_DIRS", "FINAL_DIR", "GraceObjective",
           "KDObjective", "METRICS_FILE", "MetricsReader", "OBJECTIVES", "PRESETS", "RunMetrics", "STATE_FILE",
           "STOP_FILE", "TrainConfig", "TrainResult", "build_objective", "find_checkpoint", "read_checkpoint_config",
           "read_metrics", "train"]


class _CallableModule(types.ModuleType):
    """`grace.train` is this package and runs a training when called, so that `grace.train(config)` and
    `grace.train.metrics` (or `import grace.train.metrics as m`) both work: a function of the same name
    would hide the package."""

    def __call__(self, config: TrainConfig) -> TrainResult:
        return train(config)


sys.modules[__name__].__class__ = _CallableModule
