"""Compare tab: builds the components and wires them to a `CompareRun` (demo/compare_run.py), rendered
by demo/compare_view.py. One event drives every column, so the variants answer at the same time."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import gradio as gr

from grace.chat import GenerationSettings

from . import charts, compare_view, validate
from .compare_run import MAX_COLUMNS, CompareRun, check_labels, parse_variants, write_downloads
from .families import Registry
from .gpu import on_gpu
from .inputs import BadImage, checked_image, passthrough, upload_folders
from .model_cache import ModelCache, process_memory
from .settings import Settings

log = logging.getLogger(__name__)

EXAMPLE_QUESTIONS = {"red-circle-blue-square.png": "What color is the circle?",
                     "green-triangle.png": "What shape is on the left?",
                     "three-shapes.png": "How many shapes are there?"}
COUNTER_JS = """(q) => { const n = (q || '').length, limit = %d;
  return n > limit ? `<span style="color:#dc2626">${n} / ${limit} characters: too long, please shorten it</span>`
                   : `<span style="color:#6b7280">${n} / ${limit} characters</span>`; }"""


class Refused(gr.Error):
    """A request the app will not run; logged as one line, shown as the plain message."""

    def __init__(self, message: str):
        log.info("refused a compare request: %s", message)
        super().__init__(message, print_exception=False)


class CompareTab:
    def __init__(self, settings: Settings, registry: Registry, cache: ModelCache):
        self.settings = settings
        self.registry = registry
        self.cache = cache
        self.limits = validate.UploadLimits(settings.max_file_bytes, settings.max_image_pixels,
                                            upload_folders([settings.examples_dir]))
        self.downloads = Path(upload_folders([])[0]) / "grace-downloads"

    # -- the logic shared by the UI and the API -------------------------------------------------------

    def prepare(self, family_name, labels, image, question, max_new_tokens, sampling, temperature, top_p,
                seed) -> CompareRun:
        """Check a request and build its (not yet started) CompareRun; raises Refused with the reason."""
        try:
            family = self.registry.get(family_name if isinstance(family_name, str) else None)
            labels = check_labels(labels, family)
            if image is None:
                raise validate.InvalidInput("Please upload an image (or pick one of the examples).")
            if isinstance(image, BadImage):
                raise image
            question = validate.check_question(question, self.settings.max_question_chars)
            generation = validate.check_generation(max_new_tokens, sampling, temperature, top_p, seed,
                                                   self.settings.max_new_tokens)
        except KeyError as err:
            raise Refused(str(err.args[0])) from None
        except validate.InvalidInput as err:
            raise Refused(str(err)) from None
        return CompareRun(self.cache, family, labels, image, question, GenerationSettings(**generation))

    @on_gpu
    def run_stream(self, family_name, labels, image, question, max_new_tokens, mode, temperature, top_p, seed):
        """The Ask button: every column and the chart, refreshed as tokens arrive."""
        run = self.prepare(family_name, labels, image, question, max_new_tokens, mode == "sampling",
                           temperature, top_p, seed)
        run.start()
        for i, state in enumerate(run.updates()):
            yield self.render(state, final=state.final, first=i == 0)

    @on_gpu
    def run_api(self, family, variants, image, question, max_new_tokens, sampling, temperature, top_p, seed):
        """`compare` API endpoint: the finished answers and metrics of every column as one JSON dict."""
        try:
            labels = parse_variants(variants, self.registry.get(family if isinstance(family, str) else None))
        except KeyError as err:
            raise Refused(str(err.args[0])) from None
        except validate.InvalidInput as err:
            raise Refused(str(err)) from None
        run = self.prepare(family, labels, image, question, max_new_tokens, sampling, temperature, top_p, seed)
        run.start()
        for _ in run.updates():
            pass
        return {**run.result(with_tokens=True), "process_memory_bytes": process_memory()}

    def families(self) -> dict:
        """`families` API endpoint: what `compare` accepts as family and variants."""
        result = {}
        for name in self.registry.names():
            family = self.registry.get(name)
            result[name] = {"variants": [{"label": v.label, "kind": v.kind, "default": v.default}
                                         for v in family.variants], "note": family.note}
        return {"default": self.registry.default, "families": result}

    # -- rendering ------------------------------------------------------------------------------------

    def render(self, run: CompareRun, final: bool, first: bool = False) -> list:
        outputs = []
        for i in range(MAX_COLUMNS):
            if i < len(run.columns):
                column = run.columns[i]
                outputs += [gr.Column(visible=True),
                            gr.HighlightedText(value=compare_view.highlight(column), label=column.label),
                            compare_view.metrics_markdown(column, run.reference),
                            compare_view.confidence_html(column)]
            else:
                outputs += [gr.Column(visible=False), gr.HighlightedText(value=None), "", ""]
        answered = [c.as_dict() for c in run.columns if c.status == "done"]
        # The chart and the download come once every column has finished; the previous ones go at once.
        if final:
            outputs.append(charts.compare_figure(answered) if answered else None)
            files = write_downloads(run.result(with_tokens=True), self.downloads / uuid.uuid4().hex)
            outputs.append(gr.File(value=files, visible=True))
        else:
            outputs += [None, gr.File(value=None, visible=False)] if first else [gr.skip(), gr.skip()]
        outputs.append(self.cache_line())
        return outputs

    def cache_line(self) -> str:
        memory = process_memory()
        process = "" if memory is None else f" · whole process: {memory / 1e9:.2f} GB resident"
        return self.cache.summary() + process

    # -- the UI ---------------------------------------------------------------------------------------

    def examples(self) -> list[list[str]]:
        files = sorted(Path(self.settings.examples_dir).glob("*.png"))
        return [[str(f), EXAMPLE_QUESTIONS.get(f.name, "Describe this image.")] for f in files]

    def family_view(self, family_name, labels=None):
        """Family / variants picked -> the variants list, the note and which columns show with which labels."""
        try:
            family = self.registry.get(family_name)
        except KeyError as err:
            raise gr.Error(str(err.args[0])) from None
        labels = [label for label in (labels if labels is not None else family.default_labels)
                  if label in family.labels]
        if len(labels) > MAX_COLUMNS:
            gr.Warning(f"At most {MAX_COLUMNS} variants answer at once; using the first {MAX_COLUMNS}.")
            labels = labels[:MAX_COLUMNS]
        outputs = [gr.CheckboxGroup(choices=family.labels, value=labels), f"<small>{family.note}</small>"]
        for i in range(MAX_COLUMNS):
            shown = i < len(labels)
            outputs += [gr.Column(visible=shown), gr.HighlightedText(value=None, label=labels[i] if shown else "")]
        return outputs

    def validator(self, family_name, labels, image, question, max_new_tokens, mode, temperature, top_p, seed):
        problem = validate.question_problem(question, self.settings.max_question_chars)
        return [gr.validate(True, ""),
                gr.validate(bool(labels), "Pick at least one model variant."),
                gr.validate(image is not None and not isinstance(image, BadImage),
                            str(image) if isinstance(image, BadImage) else
                            "Please upload an image (or pick one of the examples)."),
                gr.validate(problem is None, problem or ""),
                gr.validate(True, ""), gr.validate(True, ""), gr.validate(True, ""), gr.validate(True, ""),
                gr.validate(True, "")]

    @staticmethod
    def upload_note(image) -> str:
        """Shown under the image as soon as it is uploaded; empty (a stale note cleared) when it is fine."""
        return f"<span style='color:#dc2626'>{image}</span>" if isinstance(image, BadImage) else ""

    def build(self) -> None:
        settings = self.settings
        default = self.registry.default
        family = self.registry.get(default) if default else None
        labels = family.default_labels if family else []
        question = gr.Textbox(label="Question", placeholder="Ask something about the image", render=False, lines=2,
                              elem_id="compare-question")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                image = checked_image(self.limits, label="Image", sources=["upload", "clipboard"], height=300,
                                      elem_id="compare-image")
                image_note = gr.Markdown(elem_id="compare-image-note")
                if examples := self.examples():
                    gr.Examples(examples, inputs=[image, question], label="Examples (shapes task)", examples_per_page=6)
            with gr.Column(scale=1):
                question.render()
                counter = gr.Markdown(f"<small>0 / {settings.max_question_chars} characters</small>",
                                      elem_id="compare-question-counter")
                family_box = gr.Dropdown(self.registry.names(), value=default, label="Model family",
                                         elem_id="compare-family")
                family_note = gr.Markdown(f"<small>{family.note}</small>" if family else "")
                variants = gr.CheckboxGroup(family.labels if family else [], value=labels,
                                            label=f"Variants (up to {MAX_COLUMNS} columns)", elem_id="compare-variants")
                with gr.Accordion("Generation settings", open=False):
                    max_new_tokens = gr.Slider(1, settings.max_new_tokens, value=min(64, settings.max_new_tokens),
                                               step=1, label="Max new tokens")
                    mode = gr.Radio(["greedy", "sampling"], value="greedy", label="Decoding")
                    temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature (sampling)")
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p (sampling)")
                    seed = gr.Number(0, precision=0, label="Seed (sampling)")
                ask = gr.Button("Ask all variants", variant="primary", elem_id="compare-ask")
        gr.Markdown(compare_view.LEGEND, elem_id="compare-legend")
        containers, answers, metrics, confidence = [], [], [], []
        with gr.Row(equal_height=True):
            for i in range(MAX_COLUMNS):
                with gr.Column(visible=i < len(labels), min_width=220, elem_classes=["answer-column"]) as box:
                    answers.append(gr.HighlightedText(label=labels[i] if i < len(labels) else "",
                                                      color_map={compare_view.DIVERGES: "#fdba74"},
                                                      combine_adjacent=True, show_legend=False,
                                                      show_inline_category=False, elem_id=f"answer-{i}"))
                    metrics.append(gr.Markdown(elem_id=f"metrics-{i}"))
                    confidence.append(gr.HTML(elem_id=f"confidence-{i}"))
                containers.append(box)
        chart = gr.Plot(label="Memory and speed", show_label=False, elem_id="compare-chart")
        download = gr.File(label="Download this comparison (JSON, Markdown)", file_count="multiple", visible=False,
                           interactive=False, elem_id="compare-download")
        cache_line = gr.Markdown(self.cache_line(), elem_id="cache-summary")

        question.input(None, question, counter, js=COUNTER_JS % settings.max_question_chars)
        image.upload(self.upload_note, image, image_note, api_visibility="private", show_progress="hidden")
        image.clear(lambda: "", None, image_note, api_visibility="private", show_progress="hidden")
        column_outputs = [x for pair in zip(containers, answers) for x in pair]
        family_box.change(self.family_view, [family_box], [variants, family_note] + column_outputs,
                          api_visibility="private", show_progress="hidden")
        variants.input(self.family_view, [family_box, variants], [variants, family_note] + column_outputs,
                       api_visibility="private", show_progress="hidden")
        stream_outputs = [x for four in zip(containers, answers, metrics, confidence) for x in four] + \
            [chart, download, cache_line]
        inputs = [family_box, variants, image, question, max_new_tokens, mode, temperature, top_p, seed]
        for trigger in (ask.click, question.submit):
            trigger(self.run_stream, inputs, stream_outputs, validator=self.validator, api_visibility="private",
                    show_progress="minimal", concurrency_id="compare")
        self.refresh_families = family_box   # the Train tab adds "trained: <run>" families to this list
        self.build_api()

    def build_api(self) -> None:
        """The `compare` API endpoint: plain inputs, all checked on the server (browser-side limits do not apply)."""
        with gr.Group(visible=False):
            api_family = gr.Textbox(label="family")
            api_variants = gr.Textbox("", label="variants (comma-separated or JSON list; empty: the family's defaults)")
            api_image = checked_image(self.limits, label="image")
            api_question = gr.Textbox(label="question")
            numbers = [passthrough(gr.Number(64, label="max_new_tokens", precision=0)),
                       passthrough(gr.Checkbox(False, label="sampling")),
                       passthrough(gr.Number(0.7, label="temperature")), passthrough(gr.Number(0.9, label="top_p")),
                       passthrough(gr.Number(0, label="seed", precision=0))]
            api_result = gr.JSON(label="result")
            api_button = gr.Button("compare")
            families_button = gr.Button("families")
        api_button.click(self.run_api, [api_family, api_variants, api_image, api_question, *numbers], api_result,
                         api_name="compare", concurrency_id="compare",
                         api_description="Every variant answers; returns each column's text, metrics and per-token "
                                         "confidence (positions count from 1).")
        families_button.click(self.families, None, api_result, api_name="families", concurrency_limit=None,
                              api_description="The model families and their variants (labels for `compare`).")
