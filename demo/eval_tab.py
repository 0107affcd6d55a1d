"""Eval tab: a family's variants side by side on a benchmark: accuracy per category (with question counts),
per-question agreement with the first variant and the questions a variant turns from right to wrong.

Every model operation is `grace.evaluate` on a model from the shared cache; data sets are the built-in shapes
splits and the benchmark files or folders (the seven release benchmarks in their published layouts, conversation
JSON) inside folders the operator allowed: never a path from the browser.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import plotly.graph_objects as go

from .families import Registry
from .model_cache import CacheError, ModelCache
from .settings import Settings

BUILT_IN = [("shapes v2 test split", "shapes-v2-test"), ("shapes v2 validation split", "shapes-v2-val"),
            ("shapes v1 test split (64x64)", "shapes-test"), ("shapes v1 validation split (64x64)", "shapes-val")]
METHOD_NAMES = {"ptq-rtn": "round-to-nearest PTQ", "qat-ce": "CE-only QAT", "qat-grace": "GRACE QAT"}
MAX_QUESTIONS = 500
SHOW_FLIPS = 5


def benchmark_paths(folders: list[Path]) -> list[tuple[str, Path]]:
    """(benchmark, path) for every benchmark file or folder that is an allowed path or directly inside one."""
    from grace.evaluation import detect

    found: dict[Path, str] = {}
    for folder in folders:
        folder = folder.expanduser().resolve()
        candidates = [folder] + (sorted(folder.iterdir()) if folder.is_dir() else [])
        for path in candidates:
            bench = detect(path) if not path.name.startswith(".") else None
            if bench and path not in found and not any(path.is_relative_to(p) for p in found if p.is_dir()):
                found[path] = bench
    return [(bench, path) for path, bench in found.items()]


def accuracy_figure(results: dict[str, dict]) -> go.Figure:
    """Grouped bars: overall and per-category accuracy, one colour per variant."""
    figure = go.Figure()
    categories = sorted({c for r in results.values() for c in r["per_type"]})
    for label, result in results.items():
        figure.add_bar(name=label, x=["overall"] + categories,
                       y=[result["accuracy"]] + [result["per_type"].get(c) for c in categories])
    figure.update_layout(barmode="group", yaxis=dict(range=[0, 1], title="accuracy"), height=360,
                         margin=dict(l=50, r=10, t=40, b=40), title="Accuracy per variant and category",
                         legend=dict(orientation="h", y=-0.2))
    return figure


def sweep_figure(rows: list[dict], bf16: float | None = None) -> go.Figure:
    """Accuracy against weight bits, one line per method (mean over seeds, bars from min to max)."""
    figure = go.Figure()
    for method, name in METHOD_NAMES.items():
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["bits"])
        if not points:
            continue
        figure.add_scatter(name=name, x=[r["bits"] for r in points], y=[r["mean"] for r in points],
                           mode="lines+markers", error_y=dict(type="data", symmetric=False,
                                                              array=[r["max"] - r["mean"] for r in points],
                                                              arrayminus=[r["mean"] - r["min"] for r in points]))
    if bf16 is not None:
        figure.add_hline(y=bf16, line_dash="dot", annotation_text=f"GRACE BF16 {bf16:.3f}")
    figure.update_layout(xaxis=dict(title="weight bits (group 128)", tickvals=[2, 3, 4, 8], type="log"),
                         yaxis=dict(range=[0, 1], title="accuracy (shapes v2 test)"), height=360,
                         margin=dict(l=50, r=10, t=40, b=40), title="Bits sweep from the same GRACE BF16 student",
                         legend=dict(orientation="h", y=-0.25))
    return figure


def sweep_rows(rows: list[dict]) -> list[list]:
    return [[METHOD_NAMES.get(r["method"], r["method"]), r["bits"], r["n_seeds"], round(r["mean"], 3),
             round(r["std"], 3), f"{r['min']:.3f}-{r['max']:.3f}"] for r in sorted(rows, key=lambda r: (-r["bits"], r["method"]))]


def _flips(ids: list) -> str:
    shown = ", ".join(str(i) for i in ids[:SHOW_FLIPS]) + (", …" if len(ids) > SHOW_FLIPS else "")
    return f"{len(ids)} ({shown})" if ids else "0"


def result_table(results: dict[str, dict]) -> gr.Dataframe:
    """One row per variant: questions, accuracy, agreement and flips against the first, then each category
    headed with its question count."""
    counts: dict[str, int] = {}
    for r in results.values():
        for category, n in r["counts"].items():
            counts[category] = max(counts.get(category, 0), n)
    categories = sorted(counts)
    reference = next(iter(results))
    headers = ["variant", "kind", "questions", "accuracy", f"same answer as {reference}", "right → wrong",
               "wrong → right"] + [f"{c} (n={counts[c]})" for c in categories]
    rows = []
    for label, r in results.items():
        pair = r.get("versus")
        rows.append([label, r["kind"], r["n"], round(r["accuracy"], 3),
                     "—" if pair is None else round(pair["agreement"], 3),
                     "—" if pair is None else _flips(pair["right_to_wrong"]),
                     "—" if pair is None else _flips(pair["wrong_to_right"])]
                    + [round(r["per_type"][c], 3) if c in r["per_type"] else None for c in categories])
    return gr.Dataframe(value=rows, headers=headers)


class EvalTab:
    def __init__(self, settings: Settings, registry: Registry, cache: ModelCache):
        self.settings, self.registry, self.cache = settings, registry, cache
        self.benchmarks = {str(path): (bench, path) for bench, path in benchmark_paths(settings.allow_local)}

    def data_choices(self) -> list[tuple[str, str]]:
        from grace.evaluation.benchmarks import TITLES

        return BUILT_IN + [(f"{TITLES.get(bench, bench)} · {path.name}", value)
                           for value, (bench, path) in self.benchmarks.items()]

    def _plain(self, message: str) -> str:
        """An error message without the server's folder names."""
        for folder in self.settings.allow_local:
            message = message.replace(str(folder.expanduser().resolve()) + "/", "").replace(str(folder), folder.name)
        return message

    def questions(self, data: str, limit: int):
        from grace.evaluation import BenchmarkError, read_benchmark

        bench, path = self.benchmarks.get(data, (None, data))
        try:
            return read_benchmark(bench, path, limit)[1]
        except (BenchmarkError, OSError, ValueError) as err:
            raise gr.Error(f"The data set could not be read: {self._plain(str(err))}") from None

    def run(self, family: str, labels: list[str], data: str, limit: float, progress=gr.Progress()):
        import grace
        from grace.evaluation import compare

        if family not in self.registry.names():
            raise gr.Error(f"Unknown model family '{family}'.")
        family = self.registry.get(family)
        labels = [label for label in (labels or []) if label in family.labels]
        if not labels:
            raise gr.Error("Pick at least one variant of this family.")
        if data not in [value for _, value in self.data_choices()]:
            raise gr.Error("Pick one of the listed data sets.")
        try:
            limit = int(limit or 0)
        except (TypeError, ValueError, OverflowError):
            limit = 0
        if not 1 <= limit <= MAX_QUESTIONS:
            raise gr.Error(f"The number of questions must be between 1 and {MAX_QUESTIONS}.")
        items = self.questions(data, limit)   # read once: every variant answers the same questions
        runs, results = {}, {}
        for index, label in enumerate(labels):
            variant = family.variant(label)
            step = f"variant {index + 1}/{len(labels)}"
            progress(index / len(labels), desc=f"{step} · loading {label}")

            def report(done, total, index=index, step=step):
                progress((index + done / total) / len(labels), desc=f"{step} · question {done}/{total}")

            try:
                with self.cache.use(variant.source) as loaded:
                    result = grace.evaluate(loaded, items, progress=report, label=label)
            except (grace.GraceLoadError, CacheError) as err:
                raise gr.Error(f"{label} could not be loaded: {err}") from None
            runs[label] = result
            results[label] = {"kind": variant.kind, **result.summary(), "per_type": result.per_category,
                              "counts": result.counts, "metrics": result.metrics}
        comparison = compare(runs)
        for label, pair in (comparison.get("pairs") or {}).items():
            results[label]["versus"] = {"reference": comparison["reference"], **pair}
        return result_table(results), accuracy_figure(results), results

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
                data = gr.Dropdown(self.data_choices(), value="shapes-v2-test", label="Data set", elem_id="eval-data")
                limit = gr.Slider(1, MAX_QUESTIONS, value=100, step=1, label="Questions (first N)")
                gr.Markdown("Benchmarks use the GRACE authors' protocol (greedy, the option letter). The first "
                            "variant ticked is the reference for agreement and flips.")
                run = gr.Button("Evaluate", variant="primary", elem_id="eval-run")
            with gr.Column(scale=2):
                table = gr.Dataframe(label="Accuracy, agreement and flips", interactive=False, elem_id="eval-table")
                chart = gr.Plot(label="Accuracy per category", elem_id="eval-chart")
                details = gr.JSON(visible=False)
        self.build_sweep()

        def pick_family(name):
            chosen = self.registry.get(name) if name in self.registry.names() else None
            return gr.CheckboxGroup(choices=chosen.labels if chosen else [],
                                    value=chosen.default_labels if chosen else [])

        family_box.change(pick_family, family_box, variants, api_visibility="private")
        run.click(self.run, [family_box, variants, data, limit], [table, chart, details], api_name="evaluate",
                  concurrency_limit=1)
        return family_box

    def build_sweep(self) -> None:
        """The zoo's bits sweep, read from its zoo.json (nothing is shown for a zoo built without one)."""
        from grace.zoo_sweep import read_sweep, sweep_table

        sweep = read_sweep(self.settings.zoo_dir / "zoo.json")
        rows = sweep_table(self.settings.zoo_dir / "zoo.json")
        if not rows:
            return
        with gr.Accordion("Bits sweep of the offline zoo (zoo.json)", open=False, elem_id="eval-sweep"):
            gr.Markdown(f"From the same GRACE BF16 student, scored on the first {sweep['questions']} questions of "
                        "the shapes v2 test split; QAT means over seeds (data order), bars from the lowest to the "
                        "highest seed. 3- and 2-bit codes are held in the 4-bit container.")
            gr.Plot(sweep_figure(rows, sweep.get("bf16")), elem_id="eval-sweep-chart")
            gr.Dataframe(value=sweep_rows(rows), headers=["method", "bits", "seeds", "mean", "std", "range"],
                         interactive=False, elem_id="eval-sweep-table")
