"""Compare tab: the variants of a family answer one question about one image, side by side, streaming.

One event drives every column: `CompareRun` starts a thread per variant (load through the shared
cache, then `grace.chat.stream`) and the handler yields all columns whenever any of them changed, so
the variants answer at the same time instead of one listener after another.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from PIL import Image

from grace.chat import agreed_prefix

from . import charts, validate
from .families import Family, Registry
from .model_cache import CacheError, ModelCache, human_bytes
from .settings import Settings

log = logging.getLogger(__name__)

MAX_COLUMNS = 4
UPDATES_PER_S = 8            # streaming UI refresh rate; tokens arrive much faster on small models
DIVERGES = "diverges"
EXAMPLE_QUESTIONS = {"red-circle-blue-square.png": "What color is the circle?",
                     "green-triangle.png": "What shape is on the left?",
                     "three-shapes.png": "How many shapes are there?"}

try:   # On a ZeroGPU Space this attaches a GPU for the duration of the call; elsewhere a no-op.
    import spaces

    on_gpu = spaces.GPU(duration=120)
except ImportError:
    def on_gpu(fn):
        return fn


# -- one comparison -------------------------------------------------------------------------------------

@dataclass
class Column:
    label: str
    kind: str
    source: str
    status: str = "waiting"            # waiting | loading | answering | done | error
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    total_s: float | None = None
    weight_bytes: int | None = None
    peak_bytes: int | None = None
    peak_kind: str = ""                # what peak_bytes measures on this device
    load_s: float | None = None
    error: str | None = None
    first_divergence: int | None = None
    share_identical: float | None = None
    agreed_text: str = ""              # the part of `text` made of tokens identical to the reference's
    tokenizer: object = None

    def as_dict(self) -> dict:
        return {"label": self.label, "kind": self.kind, "status": self.status, "text": self.text,
                "tokens": len(self.token_ids), "ttft_s": self.ttft_s, "tokens_per_s": self.tokens_per_s,
                "total_s": self.total_s, "weight_bytes": self.weight_bytes, "peak_bytes": self.peak_bytes,
                "peak_measures": self.peak_kind, "load_s": self.load_s, "first_divergence": self.first_divergence,
                "share_identical": self.share_identical, "error": self.error}


class CompareRun:
    """Threads answering one question with several variants; `updates()` yields as they progress."""

    def __init__(self, cache: ModelCache, family: Family, labels: list[str], image, question: str,
                 generation):
        self.cache = cache
        self.columns = [Column(v.label, v.kind, v.source) for v in map(family.variant, labels)]
        self.reference = family.reference(labels)
        self.image = image
        self.question = question
        self.generation = generation
        self._changed = threading.Condition()
        self._version = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> "CompareRun":
        for column in self.columns:
            thread = threading.Thread(target=self._answer, args=(column,), daemon=True,
                                      name=f"compare-{column.label}")
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()

    @property
    def finished(self) -> bool:
        return all(c.status in ("done", "error") for c in self.columns)

    def _bump(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def _answer(self, column: Column) -> None:
        from grace.chat import stream
        from grace.errors import GraceLoadError

        try:
            column.status = "answering" if self.cache.is_loaded(column.source) else "loading"
            self._bump()
            started = time.perf_counter()
            with self.cache.use(column.source) as loaded:
                if column.status == "loading":
                    column.load_s = time.perf_counter() - started
                column.status = "answering"
                column.tokenizer = loaded.processor.tokenizer
                column.weight_bytes = loaded.weight_bytes
                column.peak_kind = "GPU allocated" if loaded.device.type == "cuda" else "process RSS"
                self._bump()
                for generation in stream(loaded, self.image, self.question, self.generation):
                    column.text, column.token_ids = generation.text, list(generation.token_ids)
                    column.ttft_s, column.total_s = generation.ttft_s, generation.total_s
                    column.tokens_per_s = generation.tokens_per_s
                    column.peak_bytes = generation.peak_bytes
                    self._bump()
                    if self._stop.is_set():   # the user went away: closing the stream stops generate()
                        break
            column.status = "done"
        except (GraceLoadError, CacheError) as err:
            column.error, column.status = f"Could not load this model: {err}", "error"
        except Exception as err:  # one failing variant must not take the others or the server down
            log.exception("variant %s failed", column.label)
            doing = "loading this model" if column.status == "loading" else "answering"
            column.error, column.status = f"Failed while {doing}: {type(err).__name__}: {err}", "error"
        finally:
            self._bump()

    def _agreement(self) -> None:
        from grace.chat import token_agreement

        ref = next((c for c in self.columns if c.label == self.reference), None)
        for column in self.columns:
            column.first_divergence = column.share_identical = None
            column.agreed_text = column.text
            if ref is None or column is ref or not column.token_ids or not ref.token_ids:
                continue
            first, share = token_agreement(ref.token_ids, column.token_ids)
            column.first_divergence, column.share_identical = first, share
            if first is not None and column.tokenizer is not None:
                column.agreed_text = agreed_prefix(column.tokenizer, column.token_ids, first, column.text)

    def updates(self):
        """Yield self after every batch of changes (at most UPDATES_PER_S a second) until all are finished."""
        seen = -1
        try:
            while True:
                with self._changed:
                    if self._version == seen and not self.finished:
                        self._changed.wait(timeout=1.0)
                    seen = self._version
                self._agreement()
                yield self
                if self.finished:
                    return
                time.sleep(1.0 / UPDATES_PER_S)
        finally:
            self.stop()

    def result(self) -> dict:
        return {"question": self.question, "reference": self.reference,
                "columns": [c.as_dict() for c in self.columns]}


# -- checking requests ----------------------------------------------------------------------------------

class BadImage(validate.InvalidInput):
    """What `decode_upload` hands on for an upload that is not a usable image; its message says why."""


def decode_upload(plain_preprocess, max_pixels: int, payload):
    """Preprocess of the app's image inputs: the checked RGB image, or a BadImage saying what is wrong.

    A non-image, a truncated file or a decompression bomb would otherwise fail deep inside PIL with
    a generic error; as a BadImage, the UI's validator shows its message under the image and the API
    raises it.
    """
    if payload is None:
        return None
    try:
        path = plain_preprocess(payload)    # gr.Image(type="filepath"): stores the upload, reads the header
    except Image.DecompressionBombError:
        return BadImage(f"The image is too large: more than {max_pixels:,} pixels. Please upload a smaller image.")
    except Exception as err:  # PIL / decoding errors of every kind: the file is not a usable image
        return BadImage(f"That upload is not an image this app can read ({type(err).__name__}).")
    try:
        return validate.open_image(path, max_pixels)
    except validate.InvalidInput as err:
        return BadImage(str(err))


def checked_image(max_pixels: int, **kwargs) -> gr.Image:
    """A gr.Image whose uploads go through `decode_upload`.

    The instance's preprocess is replaced rather than gr.Image subclassed: gradio's component
    metaclass writes a .pyi copy of any module that defines a component subclass.
    """
    image = gr.Image(type="filepath", image_mode=None, **kwargs)
    image.preprocess = functools.partial(decode_upload, image.preprocess, max_pixels)
    return image


def parse_variants(text: str | list | None, family: Family) -> list[str]:
    """Variant labels from the API ('' = the family's defaults, a JSON list, or comma-separated)."""
    if isinstance(text, list):
        labels = [str(x) for x in text]
    elif not text or not str(text).strip():
        labels = family.default_labels
    elif str(text).strip().startswith("["):
        try:
            labels = [str(x) for x in json.loads(text)]
        except json.JSONDecodeError:
            raise validate.InvalidInput("variants must be a JSON list of labels or comma-separated labels") from None
    else:
        labels = [part.strip() for part in str(text).split(",") if part.strip()]
    return labels


class CompareTab:
    def __init__(self, settings: Settings, registry: Registry, cache: ModelCache):
        self.settings = settings
        self.registry = registry
        self.cache = cache

    # -- the logic shared by the UI and the API -------------------------------------------------------

    def prepare(self, family_name, labels, image, question, max_new_tokens, sampling, temperature, top_p, seed):
        """Check a request and build its (not yet started) CompareRun; raises gr.Error with the reason."""
        from grace.chat import GenerationSettings

        try:
            family = self.registry.get(family_name)
        except KeyError as err:
            raise gr.Error(str(err.args[0])) from None
        try:
            labels = list(dict.fromkeys(labels or []))
            if not labels:
                raise validate.InvalidInput("Pick at least one model variant to compare.")
            if len(labels) > MAX_COLUMNS:
                raise validate.InvalidInput(f"At most {MAX_COLUMNS} variants can answer at once; "
                                            f"{len(labels)} were picked.")
            for label in labels:
                family.variant(label)
            if image is None:
                raise validate.InvalidInput("Please upload an image (or pick one of the examples).")
            if isinstance(image, BadImage):
                raise image
            question = validate.check_question(question, self.settings.max_question_chars)
            tokens, temp, nucleus = validate.check_generation(max_new_tokens, temperature, top_p,
                                                              self.settings.max_new_tokens)
            seed = None if seed in (None, "") else int(seed)
        except KeyError as err:
            raise gr.Error(str(err.args[0])) from None
        except (validate.InvalidInput, ValueError, TypeError) as err:
            raise gr.Error(str(err)) from None
        generation = GenerationSettings(max_new_tokens=tokens, do_sample=bool(sampling), temperature=temp,
                                        top_p=nucleus, seed=seed)
        return CompareRun(self.cache, family, labels, image, question, generation)

    @on_gpu
    def run_stream(self, family_name, labels, image, question, max_new_tokens, mode, temperature, top_p, seed):
        """The Ask button: every column and the chart, refreshed as tokens arrive."""
        run = self.prepare(family_name, labels, image, question, max_new_tokens, mode == "sampling",
                           temperature, top_p, seed)
        run.start()
        for i, state in enumerate(run.updates()):
            yield self.render(state, final=state.finished, first=i == 0)

    @on_gpu
    def run_api(self, family, variants, image, question, max_new_tokens, sampling, temperature, top_p, seed):
        """`compare` API endpoint: the finished answers and metrics of every column as one JSON dict."""
        try:
            labels = parse_variants(variants, self.registry.get(family))
        except KeyError as err:
            raise gr.Error(str(err.args[0])) from None
        except validate.InvalidInput as err:
            raise gr.Error(str(err)) from None
        run = self.prepare(family, labels, image, question, max_new_tokens, sampling, temperature, top_p, seed)
        run.start()
        for _ in run.updates():
            pass
        return {"family": family, **run.result()}

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
                            gr.HighlightedText(value=self.highlight(column), label=column.label),
                            self.metrics_markdown(column, run.reference)]
            else:
                outputs += [gr.Column(visible=False), gr.HighlightedText(value=None), ""]
        answered = [c.as_dict() for c in run.columns if c.status == "done"]
        # The chart is drawn once every column has finished; the previous question's chart goes at once.
        outputs.append(charts.compare_figure(answered) if final and answered else None if first else gr.skip())
        outputs.append(self.cache.summary())
        return outputs

    @staticmethod
    def highlight(column: Column) -> list[tuple[str, str | None]]:
        if column.status in ("waiting", "loading") and not column.text:
            return []
        if column.status == "done" and not column.text:
            return [("(empty answer)", None)]
        if column.first_divergence is None or column.agreed_text == column.text and column.share_identical == 1:
            return [(column.text, None)]
        rest = column.text[len(column.agreed_text):]
        return [(column.agreed_text, None), (rest, DIVERGES)] if column.agreed_text else [(rest, DIVERGES)]

    @staticmethod
    def metrics_markdown(column: Column, reference: str | None) -> str:
        if column.status == "error":
            return f"**Error.** {column.error}"
        if column.status == "loading":
            return "*Loading the model (first use; it stays cached)…*"
        if column.status == "waiting":
            return "*Waiting…*"
        state = "**done**" if column.status == "done" else "*answering…*"
        if column.load_s is not None:
            state += f" (loaded in {column.load_s:.1f} s)"

        def secs(x):
            return "–" if x is None else f"{x:.2f} s"

        speed = "–" if column.tokens_per_s is None else f"{column.tokens_per_s:.1f}"
        lines = [state,
                 f"first token **{secs(column.ttft_s)}** · **{speed}** tokens/s · total **{secs(column.total_s)}** "
                 f"({len(column.token_ids)} tokens)",
                 f"weights **{human_bytes(column.weight_bytes)}** · peak **{human_bytes(column.peak_bytes)}**"
                 + (f" ({column.peak_kind})" if column.peak_kind else "")]
        if column.label == reference:
            lines.append("reference for agreement")
        elif column.share_identical is not None:
            where = "identical tokens" if column.first_divergence is None \
                else f"first diverging token **#{column.first_divergence}**"
            lines.append(f"vs {reference}: {where} · **{column.share_identical:.0%}** identical")
        return "  \n".join(lines)

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
            outputs += [gr.Column(visible=shown),
                        gr.HighlightedText(value=None, label=labels[i] if shown else "")]
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

    def build(self) -> None:
        settings = self.settings
        families = self.registry.names()
        default = self.registry.default
        family = self.registry.get(default) if default else None
        question = gr.Textbox(label="Question", placeholder="Ask something about the image", render=False,
                              max_length=settings.max_question_chars, lines=2, elem_id="compare-question")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                image = checked_image(settings.max_image_pixels, label="Image", sources=["upload", "clipboard"],
                                      height=300, elem_id="compare-image")
                examples = self.examples()
                if examples:
                    gr.Examples(examples, inputs=[image, question], label="Examples (shapes task)",
                                examples_per_page=6)
            with gr.Column(scale=1):
                question.render()
                family_box = gr.Dropdown(families, value=default, label="Model family", elem_id="compare-family")
                family_note = gr.Markdown(f"<small>{family.note}</small>" if family else "")
                variants = gr.CheckboxGroup(family.labels if family else [],
                                            value=family.default_labels if family else [],
                                            label=f"Variants (up to {MAX_COLUMNS} columns)",
                                            elem_id="compare-variants")
                with gr.Accordion("Generation settings", open=False):
                    max_new_tokens = gr.Slider(1, settings.max_new_tokens, value=min(64, settings.max_new_tokens),
                                               step=1, label="Max new tokens")
                    mode = gr.Radio(["greedy", "sampling"], value="greedy", label="Decoding")
                    temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature (sampling)")
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p (sampling)")
                    seed = gr.Number(0, precision=0, label="Seed (sampling)")
                ask = gr.Button("Ask all variants", variant="primary", elem_id="compare-ask")
        labels = family.default_labels if family else []
        containers, answers, metrics = [], [], []
        with gr.Row(equal_height=True):
            for i in range(MAX_COLUMNS):
                with gr.Column(visible=i < len(labels), min_width=220, elem_classes=["answer-column"]) as box:
                    answers.append(gr.HighlightedText(label=labels[i] if i < len(labels) else "",
                                                      color_map={DIVERGES: "#fdba74"}, combine_adjacent=True,
                                                      show_legend=False, show_inline_category=False, elem_id=f"answer-{i}"))
                    metrics.append(gr.Markdown(elem_id=f"metrics-{i}"))
                containers.append(box)
        chart = gr.Plot(label="Memory and speed", show_label=False, elem_id="compare-chart")
        cache_line = gr.Markdown(self.cache.summary(), elem_id="cache-summary")

        column_outputs = [x for trio in zip(containers, answers) for x in trio]
        family_box.change(self.family_view, [family_box], [variants, family_note] + column_outputs,
                          api_visibility="private", show_progress="hidden")
        variants.input(self.family_view, [family_box, variants], [variants, family_note] + column_outputs,
                       api_visibility="private", show_progress="hidden")
        stream_outputs = [x for trio in zip(containers, answers, metrics) for x in trio] + [chart, cache_line]
        inputs = [family_box, variants, image, question, max_new_tokens, mode, temperature, top_p, seed]
        for trigger in (ask.click, question.submit):
            trigger(self.run_stream, inputs, stream_outputs, validator=self.validator, api_visibility="private",
                    show_progress="minimal", concurrency_id="compare")
        self.refresh_families = family_box   # the Train tab adds "trained: <run>" families to this list

        # The `compare` API endpoint: plain inputs checked on the server (browser-side choices do not apply).
        with gr.Group(visible=False):
            api_family = gr.Textbox(label="family")
            api_variants = gr.Textbox("", label="variants (comma-separated or JSON list; empty: the family's defaults)")
            api_image = checked_image(settings.max_image_pixels, label="image")
            api_question = gr.Textbox(label="question")
            api_tokens = gr.Number(64, label="max_new_tokens", precision=0)
            api_sampling = gr.Checkbox(False, label="sampling")
            api_temperature = gr.Number(0.7, label="temperature")
            api_top_p = gr.Number(0.9, label="top_p")
            api_seed = gr.Number(0, label="seed", precision=0)
            api_result = gr.JSON(label="result")
            api_button = gr.Button("compare")
            families_button = gr.Button("families")
        api_button.click(self.run_api, [api_family, api_variants, api_image, api_question, api_tokens, api_sampling,
                                        api_temperature, api_top_p, api_seed], api_result, api_name="compare",
                         concurrency_id="compare",
                         api_description="Every variant answers; returns each column's text and metrics.")
        families_button.click(self.families, None, api_result, api_name="families", concurrency_limit=None,
                              api_description="The model families and their variants (labels for `compare`).")
