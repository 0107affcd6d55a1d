"""The GRACE Gradio app: one module per tab; every model operation goes through the `grace` package."""

from __future__ import annotations

import gradio as gr

from .compare_tab import CompareTab
from .eval_tab import EvalTab
from .families import Registry
from .model_cache import ModelCache
from .settings import Settings
from .train_tab import JobManager, TrainTab

TITLE = "GRACE: Qwen3-VL at BF16, INT8 and INT4"
INTRO = ("**GRACE** (Gated Relational Alignment via Confidence-based Distillation) compresses Qwen3-VL "
         "with quantization-aware training and knowledge distillation. Ask the BF16, INT8 and INT4 variants "
         "the same question and compare their answers, speed and memory; or distil a student yourself.")
CSS = """
.answer-column { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 6px; }
footer { display: none !important; }
"""


def build_app(settings: Settings, registry: Registry, cache: ModelCache,
              manager: JobManager | None = None) -> gr.Blocks:
    compare = CompareTab(settings, registry, cache)
    with gr.Blocks(title="GRACE", analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        with gr.Tabs() as tabs:
            with gr.Tab("Compare", id="compare") as compare_item:
                compare.build()
            with gr.Tab("Eval", id="eval"):
                EvalTab(settings, registry, cache).build()
            if settings.train:
                train = TrainTab(settings, registry, manager)
                with gr.Tab("Train", id="train") as train_item:
                    train.build(compare.refresh_families, tabs)
                train_item.select(**train.refresh)   # show a job another user started
                demo.load(**train.refresh)
        # Families added while the page was open (a trained run) show up when Compare is opened again.
        compare_item.select(lambda value: gr.Dropdown(choices=registry.names(), value=value),
                            [compare.refresh_families], [compare.refresh_families], api_visibility="private",
                            show_progress="hidden")
    return demo
