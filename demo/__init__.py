"""The GRACE Gradio app: a thin UI over `grace`'s public API, one module per tab plus the pieces they share
(gpu.py: the ZeroGPU wrapper; compare_run.py / jobs.py: the work, without gradio; validate.py: the checks)."""

from __future__ import annotations

import gradio as gr

from .compare_tab import CompareTab
from .eval_tab import EvalTab
from .families import Registry
from .gpu import on_gpu
from .jobs import JobManager
from .model_cache import ModelCache
from .settings import Settings
from .train_tab import TrainTab

TITLE = "GRACE: Qwen3-VL at BF16, INT8 and INT4"
INTRO = ("**GRACE** (Gated Relational Alignment via Confidence-based Distillation) compresses Qwen3-VL "
         "with quantization-aware training and knowledge distillation. Ask the BF16, INT8 and INT4 variants "
         "the same question and compare their answers, speed and memory; or distil a student yourself.")
# Offline first: the system's own fonts, nothing fetched from a font service.
SYSTEM_FONTS = ["system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial", "Noto Sans",
                "Liberation Sans", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Liberation Mono", "monospace"]
THEME = gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)
CSS = """
.answer-column { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 6px; }
.grace-tokens { line-height: 1.9; font-size: 0.9em; overflow-wrap: anywhere; word-break: break-word; }
.grace-token { border-radius: 3px; padding: 1px 0; white-space: pre-wrap; }
#train-student label, #train-teacher label { overflow: visible; white-space: normal; }
footer { display: none !important; }
"""


def build_app(settings: Settings, registry: Registry, cache: ModelCache,
              manager: JobManager | None = None) -> gr.Blocks:
    compare = CompareTab(settings, registry, cache)
    evaluate = EvalTab(settings, registry, cache)
    evaluate.run = on_gpu(evaluate.run)   # Eval needs the GPU the same way Compare does
    with gr.Blocks(title="GRACE", analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        with gr.Tabs() as tabs:
            with gr.Tab("Compare", id="compare") as compare_item:
                compare.build()
            with gr.Tab("Eval", id="eval"):
                evaluate.build()
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
    demo.train_manager = train.manager if settings.train else None
    plain_input_errors(demo)
    return demo


def plain_input_errors(demo: gr.Blocks) -> None:
    """Inputs gradio refuses before our checks run (a FileData naming a server path, a value of the wrong
    type) get a plain sentence instead of gradio's empty error, and one log line instead of a traceback.
    The path refusal reads exactly like a non-image, so it tells nothing about the server's files."""
    import logging

    from gradio.exceptions import InvalidPathError
    from pydantic import ValidationError

    from .validate import NOT_AN_IMAGE

    log = logging.getLogger("demo")
    preprocess = demo.preprocess_data

    async def checked(block_fn, inputs, state, explicit_call=False):
        try:
            return await preprocess(block_fn, inputs, state, explicit_call)
        except gr.Error as err:   # e.g. a value not among a dropdown's choices: one log line, no traceback
            log.info("refused a request: %s", err.message)
            err.print_exception = False
            raise
        except InvalidPathError:
            log.info("refused a request: a file outside the upload folder")
            raise gr.Error(NOT_AN_IMAGE, print_exception=False) from None
        except (ValidationError, ValueError, TypeError) as err:
            log.info("refused a request: inputs of the wrong type (%s)", type(err).__name__)
            raise gr.Error("The request's inputs could not be read; see the API page for what each one "
                           "takes.", print_exception=False) from None

    demo.preprocess_data = checked
