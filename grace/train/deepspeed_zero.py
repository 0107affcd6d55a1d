"""DeepSpeed ZeRO under accelerate: the shipped launch config and the settings the trainer takes over.

    accelerate launch --config_file grace/train/accelerate_zero2.yaml -m grace train ...

Under DeepSpeed the engine steps the optimizer and the schedule inside `accelerator.backward` at the
end of each accumulation cycle and clips the gradients itself (`gradient_clipping`, set here from the
TrainConfig), and a checkpoint holds the engine's own files (each process's optimizer partition),
written and read through accelerate's save_state / load_state.
"""

from __future__ import annotations

import os
from pathlib import Path

ACCELERATE_ZERO2 = Path(__file__).with_name("accelerate_zero2.yaml")


def deepspeed_requested() -> bool:
    """Whether this process was started by `accelerate launch` with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


# accelerate runs DeepSpeed only on accelerators: on a CPU-only machine the same launch trains as plain
# data-parallel CPU processes (measured with deepspeed 0.19.8 and its CPU accelerator: accelerate finds no
# process-group backend for it and each process would train alone), so the trainer says so instead
NO_DEEPSPEED_ON_CPU = ("DeepSpeed was asked for, but accelerate runs it only on GPUs: training as {n} plain "
                       "data-parallel CPU process(es) instead (no ZeRO sharding)")


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure_deepspeed(plugin, max_grad_norm: float) -> None:
    """Check the ZeRO stage and hand the clip norm to the engine (which clips; 0 = no clipping)."""
    stage = int(plugin.zero_stage)
    if stage not in (0, 1, 2):
        raise ValueError(f"DeepSpeed ZeRO stage {stage} shards the parameters, which the QAT step-size "
                         "initialisation and the export read whole; use ZeRO-2 "
                         f"({ACCELERATE_ZERO2.name})")
    plugin.deepspeed_config["gradient_clipping"] = float(max_grad_norm or 0.0)
