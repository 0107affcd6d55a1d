"""Plotly figures for both tabs. Inputs are plain dicts (answers' metrics, metrics.jsonl step records)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

COLORS = ["#2563eb", "#16a34a", "#ea580c", "#9333ea", "#0891b2", "#be123c"]
_LAYOUT = dict(template="plotly_white", margin=dict(l=50, r=20, t=80, b=40), height=340,
               legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0),
               font=dict(size=12))


def _title(text: str) -> dict:
    """Title at the top, clear of the legend row just above the plot area."""
    return dict(text=text, y=0.97, yanchor="top", x=0.02, xanchor="left")


def _mb(n: int | None) -> float | None:
    return None if n is None else n / 1e6


def compare_figure(columns: list[dict]) -> go.Figure:
    """Memory (weights, peak) and speed (tokens/s, time to first token, total) of each answered variant."""
    fig = make_subplots(rows=1, cols=4, horizontal_spacing=0.07,
                        subplot_titles=("Weight memory (MB)", "Peak memory (MB)", "Decode speed (tokens/s)",
                                        "Latency (s)"))
    labels = [c["label"] for c in columns]
    fig.add_bar(x=labels, y=[_mb(c.get("weight_bytes")) for c in columns], name="weights",
                marker_color=COLORS[0], row=1, col=1, showlegend=False)
    fig.add_bar(x=labels, y=[_mb(c.get("peak_bytes")) for c in columns], name="peak",
                marker_color=COLORS[1], row=1, col=2, showlegend=False)
    fig.add_bar(x=labels, y=[c.get("tokens_per_s") for c in columns], name="tokens/s",
                marker_color=COLORS[2], row=1, col=3, showlegend=False)
    fig.add_bar(x=labels, y=[c.get("ttft_s") for c in columns], name="first token",
                marker_color=COLORS[3], row=1, col=4)
    fig.add_bar(x=labels, y=[c.get("total_s") for c in columns], name="total",
                marker_color=COLORS[4], row=1, col=4)
    fig.update_layout(barmode="group", **{**_LAYOUT, "legend": dict(orientation="h", x=1, xanchor="right",
                                                                     y=-0.25, yanchor="top")})
    fig.update_layout(margin=dict(l=40, r=20, t=40, b=70))
    return fig


def _series(steps: list[dict], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for s in steps:
        value = s.get(key)
        if isinstance(value, (int, float)):
            xs.append(s.get("step"))
            ys.append(value)
    return xs, ys


def _empty(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, font=dict(size=14, color="#6b7280"))
    fig.update_layout(title=_title(title), xaxis_visible=False, yaxis_visible=False, **_LAYOUT)
    return fig


def losses_figure(steps: list[dict]) -> go.Figure:
    if not steps:
        return _empty("Losses", "no steps yet")
    fig = go.Figure()
    for key, name, color in (("loss", "total", "#111827"), ("ce", "CE", COLORS[0]),
                             ("gdkd", "gated DKD", COLORS[2]), ("rcka", "RCKA", COLORS[3])):
        xs, ys = _series(steps, key)
        if xs:
            fig.add_scatter(x=xs, y=ys, name=name, mode="lines", line=dict(color=color, width=2))
    fig.update_layout(title=_title("Losses"), xaxis_title="step", **_LAYOUT)
    return fig


def cka_figure(steps: list[dict]) -> go.Figure:
    if not steps:
        return _empty("CKA alignment", "no steps yet")
    xs, ys = _series(steps, "cka")
    fig = go.Figure(go.Scatter(x=xs, y=ys, name="CKA (student vs teacher)", mode="lines",
                               line=dict(color=COLORS[1], width=2)))
    fig.update_layout(title=_title("CKA alignment"), xaxis_title="step", yaxis_range=[0, 1.02], showlegend=True,
                      **_LAYOUT)
    return fig


def ib_figure(steps: list[dict]) -> go.Figure:
    """The information-bottleneck controller: β on its own axis, EMA of L_GDKD against its target τ."""
    if not steps:
        return _empty("IB controller", "no steps yet")
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    xs, ema = _series(steps, "ema")
    fig.add_scatter(x=xs, y=ema, name="EMA of L_GDKD", mode="lines", line=dict(color=COLORS[2], width=2),
                    secondary_y=False)
    xs_tau, tau = _series(steps, "tau")
    fig.add_scatter(x=xs_tau, y=tau, name="τ (target)", mode="lines", line=dict(color="#6b7280", dash="dash"),
                    secondary_y=False)
    xs_beta, beta = _series(steps, "beta")
    fig.add_scatter(x=xs_beta, y=beta, name="β", mode="lines", line=dict(color=COLORS[3], width=2),
                    secondary_y=True)
    fig.update_layout(title=_title("IB controller"), xaxis_title="step", **_LAYOUT)
    fig.update_yaxes(title_text="L_GDKD", secondary_y=False)
    fig.update_yaxes(title_text="β", secondary_y=True, showgrid=False)
    return fig


def gate_figure(steps: list[dict]) -> go.Figure:
    """Confidence gate: mean over the batch with its min-max band."""
    if not steps:
        return _empty("Confidence gate", "no steps yet")
    xs, low = _series(steps, "gate_min")
    _, high = _series(steps, "gate_max")
    xs_mean, mean = _series(steps, "gate_mean")
    fig = go.Figure()
    if xs and len(low) == len(high):
        fig.add_scatter(x=xs, y=high, mode="lines", line=dict(width=0), showlegend=False, hoverinfo="skip")
        fig.add_scatter(x=xs, y=low, mode="lines", line=dict(width=0), fill="tonexty",
                        fillcolor="rgba(37, 99, 235, 0.18)", name="min-max")
    fig.add_scatter(x=xs_mean, y=mean, name="mean gate", mode="lines", line=dict(color=COLORS[0], width=2))
    fig.update_layout(title=_title("Confidence gate"), xaxis_title="step", yaxis_range=[0, 1.02], **_LAYOUT)
    return fig
