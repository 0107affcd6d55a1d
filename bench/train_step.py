"""Time per optimizer step: GRACE (CE + gated DKD + R-CKA + IB controller) vs plain KD (CE + KL at T).

Same teacher, same student, same batch; both students train from the same weights with their own
optimizer. Steps alternate (GRACE, KD, GRACE, KD, ...) so machine noise hits both alike; the
medians are compared. The step is the trainer's own: grace.train.objectives.micro_step over the
objective class, backward, clip, AdamW step and the objective's end_step (GRACE: the controller update). Target: GRACE <= 1.3x KD.

    python bench/train_step.py [--batch 16] [--steps 20] [--threads 1] [--bits 4]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import ExitStack

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per objective (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8, 16))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from accelerate import Accelerator

    from grace.data.conversations import Collator
    from grace.data.shapes import ShapesStream
    from grace.distill import QATConfig, apply_qat, freeze_vision, qat_param_groups
    from grace.tiny import TinyConfig, tiny_qwen3vl
    from grace.train.config import TrainConfig
    from grace.train.objectives import build_objective, micro_step

    # The zoo's shapes: teacher at TinyConfig's defaults, a narrower student; 64x64 images (4 image tokens).
    teacher, processor = tiny_qwen3vl(1, TinyConfig())
    teacher.requires_grad_(False)
    student, _ = tiny_qwen3vl(2, TinyConfig(hidden=64, intermediate=192, heads=2, kv_heads=1, head_dim=32,
                                            vision_hidden=64, vision_intermediate=128, vision_heads=2))
    freeze_vision(student)
    apply_qat(student, QATConfig(bits=args.bits, group_size=64))
    student.train()
    stream = ShapesStream(seed=0)
    batch = Collator(processor)([stream[i] for i in range(args.batch)])
    accelerator = Accelerator(mixed_precision="no", cpu=True)

    def setup(objective: str):
        config = TrainConfig(student="bench", teacher="bench", out="bench", objective=objective, kd_warmup=0,
                             rcka_warmup=0, group_size=64)
        model = copy.deepcopy(student)
        optimizer = torch.optim.AdamW(qat_param_groups(model, 1e-4, 1e-4, 0.0))
        return model, optimizer, build_objective(config, model, teacher, accelerator)

    def step(model, optimizer, objective) -> float:
        start = time.perf_counter()
        loss, stats = micro_step(objective, model, batch, step=10**6)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.end_step([stats])
        return time.perf_counter() - start

    runs = {"grace": setup("grace"), "kd": setup("kd")}
    times = {"grace": [], "kd": []}
    with ExitStack() as stack:
        for _, _, objective in runs.values():
            stack.enter_context(objective.attach())
        for i in range(args.steps + 2):
            for name, parts in runs.items():
                seconds = step(*parts)
                if i >= 2:
                    times[name].append(seconds)

    tokens = int(batch["attention_mask"].sum())
    grace_s, kd_s = statistics.median(times["grace"]), statistics.median(times["kd"])
    print(f"batch {args.batch} ({tokens} tokens), W{args.bits} student, {torch.get_num_threads()} thread(s), "
          f"{args.steps} interleaved steps each")
    print(f"GRACE (CE + gated DKD + R-CKA + controller): median {grace_s * 1000:.1f} ms/step")
    print(f"plain KD (CE + KL at T):                     median {kd_s * 1000:.1f} ms/step")
    print(f"ratio GRACE / KD: {grace_s / kd_s:.3f} (target <= 1.3)")


if __name__ == "__main__":
    main()
