"""Eval tab: accuracy of a family's variants on a data set, per question type, as a table and a bar chart.

Every model operation is `grace.evaluate` on a model from the shared cache; data sets are the built-in
shapes splits and the .json / .tsv files in folders the operator allowed (never a path from the browser).
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import plotly.graph_objects as go

from .families import Registry, training_data_files
from .model_cache import CacheError, ModelCache
from .settings import Settings

BUILT_IN = [("shapes test split", "shapes-test"), ("shapes validation split", "shapes-val")]
MAX_QUESTIONS = 500


def data_files(folders: list[Path]) -> list[Path]:
    """Conversation / ScienceQA JSON and MMBench TSV files in the operator's allowed folders."""
    tsv = [f for d in folders if d.is_dir() for f in sorted(d.glob("*.tsv"))]
    return training_data_files(folders) + tsv


def accuracy_figure(results: dict[str, dict]) -> go.Figure:
    """Grouped bars: overall and per-type accuracy, one colour per variant."""
    figure = go.Figure()
    types = sorted({t for r in results.values() for t in r["per_type"]})
    for label, result in results.items():
        figure.add_bar(name=label, x=["overall"] + types,
                       y=[result["accuracy"]] + [result["per_type"].get(t) for t in types])
    figure.update_layout(barmode="group", yaxis=dict(range=[0, 1], title="accuracy"), height=360,
                         margin=dict(l=50, r=10, t=40, b=40), title="Accuracy per variant and question type",
                         legend=dict(orientation="h", y=-0.2))
    return figure


class EvalTab:
    def __init__(self, settings: Settings, registry: Registry, cache: ModelCache):
        self.settings, self.registry, self.cache = settings, registry, cache
        self.files = data_files(settings.allow_local)

    def data_choices(self) -> list[tuple[str, str]]:
        return BUILT_IN + [(f.name, str(f)) for f in self.files]

    def run(self, family: str, labels: list[str], data: str, limit: float, progress=gr.Progress()):
        import grace

        if family not in self.registry.names():
            raise gr.Error(f"Unknown model family '{family}'.")
        family = self.registry.get(family)
        labels = [label for label in (labels or []) if label in family.labels]
        if not labels:
            raise gr.Error("Pick at least one variant of this family.")
        if data not in [value for _, value in self.data_choices()]:
            raise gr.Error("Pick one of the listed data sets.")
        limit = int(limit or 0)
        if not 1 <= limit <= MAX_QUESTIONS:
            raise gr.Error(f"The number of questions must be between 1 and {MAX_QUESTIONS}.")
        results: dict[str, dict] = {}
        for index, label in enumerate(labels):
            variant = family.variant(label)
            progress((index, len(labels)), desc=f"loading {label}")

            def report(done, total, index=index, label=label):
                progress((index + done / total, len(labels)), desc=f"{label}: {done}/{total} questions")

            try:
                with self.cache.use(variant.source) as loaded:
                    result = grace.evaluate(loaded, data, limit=limit, progress=report)
            except (grace.GraceLoadError, CacheError) as err:
                raise gr.Error(f"{label} could not be loaded: {err}") from None
            except (OSError, ValueError) as err:
                raise gr.Error(f"The data set could not be read: {err}") from None
            results[label] = {"kind": variant.kind, **result.summary()}
        types = sorted({t for r in results.values() for t in r["per_type"]})
        rows = [[label, r["kind"], r["n"], round(r["accuracy"], 3)] + [round(r["per_type"].get(t, float("nan")), 3)
                                                                       for t in types]
                for label, r in results.items()]
        table = gr.Dataframe(value=rows, headers=["variant", "kind", "questions", "accuracy"] + types)
        return table, accuracy_figure(results), results

    def build(self) -> gr.Dropdown:
        names = self.registry.names()
        default = self.registry.default
        family = self.registry.get(default) if default else None
        with gr.Row():
            with gr.Column(scale=1):
                family_box = gr.Dropdown(names, value=default, label="Model family", elem_id="eval-family")
                variants = gr.CheckboxGroup(family.labels if family else [],
                                            value=family.default_labels if family else [], label="Variants",
                                            elem_id="eval-variants")
                data = gr.Dropdown(self.data_choices(), value="shapes-test", label="Data set", elem_id="eval-data")
                limit = gr.Slider(1, MAX_QUESTIONS, value=100, step=1, label="Questions (first N)")
                run = gr.Button("Evaluate", variant="primary", elem_id="eval-run")
            with gr.Column(scale=2):
                table = gr.Dataframe(label="Accuracy", interactive=False, elem_id="eval-table")
                chart = gr.Plot(label="Accuracy per question type", elem_id="eval-chart")
                details = gr.JSON(visible=False)

        def pick_family(name):
            chosen = self.registry.get(name) if name in self.registry.names() else None
            return gr.CheckboxGroup(choices=chosen.labels if chosen else [],
                                    value=chosen.default_labels if chosen else [])

        family_box.change(pick_family, family_box, variants, api_visibility="private")
        run.click(self.run, [family_box, variants, data, limit], [table, chart, details], api_name="evaluate",
                  concurrency_limit=1)
        return family_box
