"""demo/charts.py: the figures draw what they are given."""

from __future__ import annotations


import pytest

pytest.importorskip("gradio")

from demo import charts  # noqa: E402


def test_charts_draw_with_and_without_data():
    steps = [{"step": i, "loss": 1 / i, "ce": 1, "gdkd": 0.5, "rcka": 0.1, "cka": 0.9, "beta": 1.0, "ema": 0.6,
              "tau": 1.0, "gate_mean": 0.5, "gate_min": 0.1, "gate_max": 0.9} for i in range(1, 5)]
    for draw in (charts.losses_figure, charts.cka_figure, charts.ib_figure, charts.gate_figure):
        assert draw([]).layout.annotations            # "no steps yet"
        figure = draw(steps)
        assert figure.data and all(len(trace.x) == 4 for trace in figure.data)


def test_smoothing_draws_the_raw_values_faint_and_the_trend_solid():
    values = [4.0, 0.0, 4.0, 0.0, 4.0, 0.0]
    steps = [{"step": i + 1, "loss": v} for i, v in enumerate(values)]
    raw, smooth = charts.losses_figure(steps, smoothing=0.8).data
    assert list(raw.y) == values and raw.opacity < 0.5
    assert max(smooth.y[2:]) - min(smooth.y[2:]) < 2.0      # the EMA damps the zig-zag
    assert smooth.y[0] == 4.0                               # debiased: the first point is not pulled to 0
    assert list(charts.losses_figure(steps, smoothing=0.0).data[0].y) == values


def test_log_scale_drops_values_it_cannot_show():
    steps = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 0.0}, {"step": 3, "loss": 0.5}]
    figure = charts.losses_figure(steps, smoothing=0.0, log_y=True)
    assert figure.layout.yaxis.type == "log" and list(figure.data[0].x) == [1, 3]


def test_ib_panel_keeps_beta_off_the_loss_axis():
    steps = [{"step": i, "ema": 3.0 - i, "tau": 1.0, "beta": 1 + 0.1 * i} for i in range(1, 4)]
    figure = charts.ib_figure(steps)
    axis = {t.name: t.yaxis for t in figure.data}
    assert axis["EMA of L_GDKD"] == axis["τ (target of L_GDKD)"] != axis["β (KD weight)"]
    assert set(charts.CAPTIONS) == {"losses", "cka", "ib", "gate"}


def test_compare_chart_stacks_memory_and_leaves_unmeasured_speed_empty():
    columns = [{"label": "BF16", "weight_bytes": 2e6, "kv_cache_bytes": 1e5, "tokens_per_s": 10.0, "ttft_s": 0.1,
                "total_s": 1.0},
               {"label": "W4", "weight_bytes": 5e5, "kv_cache_bytes": 1e5, "tokens_per_s": None, "ttft_s": 0.1,
                "total_s": 0.2}]
    figure = charts.compare_figure(columns)
    memory = [t for t in figure.data if t.legendgroup == "memory"]
    assert [list(t.y) for t in memory] == [[2.0, 0.5], [0.1, 0.1]]
    speed = next(t for t in figure.data if t.name == "tokens/s")
    assert list(speed.y) == [10.0, None] and list(speed.text) == ["", "too few tokens"]
    assert figure.layout.legend.y > 1                        # above the panels, off the tick labels


def test_compare_chart_says_why_speed_is_missing():
    columns = [{"label": "A", "weight_bytes": 1e6, "tokens_per_s": None, "ttft_s": 0.1, "total_s": 0.1}]
    figure = charts.compare_figure(columns)
    assert any("under 8 tokens" in a.text for a in figure.layout.annotations)
