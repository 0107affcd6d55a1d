"""Model cards of the zoo: each shipped folder's README.md, with the measurements behind every setting."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def held_bytes(folder: Path) -> tuple[int, int]:
    """(weights held, language-model part) in bytes, loaded as deployed (bf16 activations, packed linears)."""
    import grace

    held = grace.load(folder, device="cpu", dtype=torch.bfloat16)
    language = sum(t.numel() * t.element_size() for n, t in
                   list(held.model.named_parameters()) + list(held.model.named_buffers())
                   if "language_model" in n or n.startswith("lm_head"))
    return held.weight_bytes, language


def accuracy(folder_or_loaded, limit: int, split: str = "shapes-v2-test") -> dict:
    import grace
    from .evaluation import evaluate

    loaded = folder_or_loaded if isinstance(folder_or_loaded, grace.LoadedModel) else \
        grace.load(folder_or_loaded, device="cpu", dtype=torch.float32)
    result = evaluate(loaded, split, limit=limit, progress=False)
    return {"budget": budget_line(loaded.processor), "accuracy": result.accuracy, "per_type": result.per_type, "n": result.n, "split": split,
            "kind": loaded.kind, "format": loaded.format}


def budget_line(processor) -> str:
    from .image_budget import pixel_budget

    low, high, patch, merge = pixel_budget(processor)
    token = (patch * merge) ** 2
    return (f"pixel budget {low}..{high} pixels (min_pixels / max_pixels, saved with the processor): any picture "
            f"is resized to {low // token}-{high // token} visual tokens of {patch * merge}x{patch * merge} px")


def write_card(folder: Path, name: str, card: dict, recipe) -> dict:
    limit = recipe.eval_questions if not name.startswith("v1-") else max(1, recipe.eval_questions // 5)
    measured = accuracy(folder, limit)
    weight_bytes, language = held_bytes(folder)
    measured.update(weight_bytes=weight_bytes, language_model_bytes=language)
    training = card.get("training")
    lines = [f"# GRACE zoo v2: {name}", "", card["role"], "",
             f"- layout: `{measured['format']}` (kind `{measured['kind']}`), loads with `grace.load`",
             f"- architecture: Qwen3-VL, {card['config']}",
             f"- {measured['budget']}",
             f"- initialised from: {card.get('initialised_from', '-')}",
             f"- training: `{json.dumps(training) if not isinstance(training, str) else training}`"]
    if card.get("controller"):
        c = card["controller"]
        floor = f", GRACE BF16's final L_GDKD {c['floor']:.4g}" if c.get("floor") else ""
        lines.append(f"- controller: tau {c['tau']:.4g} = {c['rule']} (probe: the median L_GDKD "
                     f"{c['probe_gdkd_median']:.4g} of the run's first {recipe.probe_steps} steps{floor}; the "
                     f"authors' 3.0 is in their model's units); eta {c['eta']:.4g} = 0.003 x (3.0 / tau) x (1300 / steps); beta went "
                     f"{c.get('beta_first', 0):.3f} -> {c.get('beta_last', 0):.3f} (range "
                     f"{c.get('beta_lowest', 0):.3f}-{c.get('beta_highest', 0):.3f}, bounds "
                     f"[{recipe.beta_min}, {recipe.beta_max}])")
    lines += ["- deviations from the authors' recipe (qwen3vl-2b-paper) and why: see the zoo section of the "
              "project README and zoo.json's `deviations`",
              f"- data: the shapes task v2 (grace.data.shapes_v2): 40-320 px pictures, aspect up to 3:1, varied "
              f"backgrounds, shades and anti-aliasing",
              f"- weights held (bf16 activations): {weight_bytes / 1e6:.2f} MB (language model {language / 1e6:.2f} MB)",
              f"- shapes v2 test accuracy ({measured['n']} questions, greedy): {measured['accuracy']:.3f} — "
              + ", ".join(f"{k} {v:.2f}" for k, v in measured["per_type"].items()),
              f"- built by `python -m grace zoo build` (stage CPU time {card.get('cpu_s') or 0:.0f} s)", ""]
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")
    return measured
