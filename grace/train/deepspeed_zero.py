"""DeepSpeed ZeRO under accelerate: the shipped launch config and the settings the trainer takes over.

    accelerate launch --config_file grace/train/accelerate_zero2.yaml -m grace train ...

Under DeepSpeed the engine steps the optimizer and the schedule inside `accelerator.backward` at the
end of each accumulation cycle and clips the gradients itself (`gradient_clipping`, set here from the
TrainConfig), and a checkpoint holds the engine's own files (each process's optimizer partition),
written and read through accelerate's save_state / load_state.
"""

from __future__ import annotations

from pathlib import Path

ACCELERATE_ZERO2 = Path(__file__).with_name("accelerate_zero2.yaml")


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
