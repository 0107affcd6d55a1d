"""Plotly figures for both tabs. Inputs are plain dicts (answers' metrics, metrics.jsonl step records)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from grace.chat import MIN_TOKENS_FOR_SPEED

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
    """What each answered variant holds (weights + its KV cache) and how fast it answered."""
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08,
                        subplot_titles=("Memory held by the model (MB)", "Decode speed (tokens/s)", "Latency (s)"))
    labels = [c["label"] for c in columns]
    fig.add_bar(x=labels, y=[_mb(c.get("weight_bytes")) for c in columns], name="weights",
                marker_color=COLORS[0], row=1, col=1, legendgroup="memory")
    fig.add_bar(x=labels, y=[_mb(c.get("kv_cache_bytes")) for c in columns], name="KV cache (this answer)",
                marker_color=COLORS[5], row=1, col=1, legendgroup="memory")
    speeds = [c.get("tokens_per_s") for c in columns]
    fig.add_bar(x=labels, y=speeds, name="tokens/s", marker_color=COLORS[2], row=1, col=2, showlegend=False,
                text=["" if v is not None else "too few tokens" for v in speeds], textposition="inside")
    if all(v is None for v in speeds):   # say why the panel is empty rather than draw a bare axis
        fig.add_annotation(text=f"not measured: answers under {MIN_TOKENS_FOR_SPEED} tokens", showarrow=False, xref="x2 domain",
                           yref="y2 domain", x=0.5, y=0.5, font=dict(color="#6b7280"))
        fig.update_yaxes(visible=False, row=1, col=2)
    fig.add_bar(x=labels, y=[c.get("ttft_s") for c in columns], name="first token", marker_color=COLORS[3],
                row=1, col=3, offsetgroup="first")
    fig.add_bar(x=labels, y=[c.get("total_s") for c in columns], name="whole answer", marker_color=COLORS[4],
                row=1, col=3, offsetgroup="total")
    # The legend sits above the panels, where it cannot cover bars or tick labels.
    fig.update_layout(barmode="stack", template="plotly_white", height=360, font=dict(size=12),
                      margin=dict(l=40, r=20, t=90, b=40),
                      legend=dict(orientation="h", x=0, xanchor="left", y=1.22, yanchor="bottom"))
    fig.update_xaxes(automargin=True)
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


CAPTIONS = {
    "losses": "Training losses per optimizer step: total, cross-entropy on the answers, the gated decoupled KD "
              "term and R-CKA. Faint lines are the raw values, solid ones their smoothed trend.",
    "cka": "Linear CKA between student and teacher visual-token representations: 1 means the same geometry.",
    "ib": "Information-bottleneck controller: the top panel compares the smoothed L_GDKD with its target τ; "
          "the bottom one shows the weight β the controller sets in response.",
    "gate": "Confidence gate: how much each sample's teacher is trusted (mean over the batch, band = min to max).",
}


def ema(values: list[float], smoothing: float) -> list[float]:
    """TensorBoard-style exponential moving average, debiased so the first points are not pulled to 0."""
    out, average = [], 0.0
    for i, value in enumerate(values):
        average = smoothing * average + (1 - smoothing) * value
        out.append(average / (1 - smoothing ** (i + 1)) if smoothing < 1 else value)
    return out


def _raw_and_smooth(fig, xs, ys, name, color, smoothing, **where):
    if smoothing > 0:
        fig.add_scatter(x=xs, y=ys, name=f"{name} (raw)", mode="lines", line=dict(color=color, width=1),
                        opacity=0.25, showlegend=False, hoverinfo="skip", legendgroup=name, **where)
        ys = ema(ys, smoothing)
    fig.add_scatter(x=xs, y=ys, name=name, mode="lines", line=dict(color=color, width=2), legendgroup=name, **where)


def losses_figure(steps: list[dict], smoothing: float = 0.6, log_y: bool = False) -> go.Figure:
    if not steps:
        return _empty("Losses", "no steps yet")
    fig = go.Figure()
    for key, name, color in (("loss", "total", "#111827"), ("ce", "CE", COLORS[0]),
                             ("gdkd", "gated DKD", COLORS[2]), ("rcka", "RCKA", COLORS[3])):
        xs, ys = _series(steps, key)
        if log_y:   # a log axis cannot show 0 or negative values
            xs, ys = zip(*[(x, y) for x, y in zip(xs, ys) if y > 0]) if any(y > 0 for y in ys) else ([], [])
        if xs:
            _raw_and_smooth(fig, list(xs), list(ys), name, color, smoothing)
    fig.update_layout(title=_title("Losses" + (" (log scale)" if log_y else "")), xaxis_title="step", **_LAYOUT)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def cka_figure(steps: list[dict], smoothing: float = 0.0) -> go.Figure:
    if not steps:
        return _empty("CKA alignment", "no steps yet")
    xs, ys = _series(steps, "cka")
    fig = go.Figure()
    _raw_and_smooth(fig, xs, ys, "CKA (student vs teacher)", COLORS[1], smoothing)
    fig.update_layout(title=_title("CKA alignment"), xaxis_title="step", yaxis_range=[0, 1.02], showlegend=True,
                      **_LAYOUT)
    return fig


def ib_figure(steps: list[dict], smoothing: float = 0.0) -> go.Figure:
    """The information-bottleneck controller in two stacked panels with their own y axes (the loss and its
    target τ share a scale; β, a weight, gets its own panel, so τ is never read on β's scale)."""
    if not steps:
        return _empty("IB controller", "no steps yet")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.55, 0.45])
    xs, ema_loss = _series(steps, "ema")
    _raw_and_smooth(fig, xs, ema_loss, "EMA of L_GDKD", COLORS[2], smoothing, row=1, col=1)
    xs_tau, tau = _series(steps, "tau")
    fig.add_scatter(x=xs_tau, y=tau, name="τ (target of L_GDKD)", mode="lines",
                    line=dict(color="#6b7280", dash="dash"), row=1, col=1)
    xs_beta, beta = _series(steps, "beta")
    _raw_and_smooth(fig, xs_beta, beta, "β (KD weight)", COLORS[3], smoothing, row=2, col=1)
    fig.update_layout(title=_title("IB controller"), **_LAYOUT)
    fig.update_yaxes(title_text="L_GDKD", row=1, col=1)
    fig.update_yaxes(title_text="β", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    return fig


def gate_figure(steps: list[dict], smoothing: float = 0.0) -> go.Figure:
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
    _raw_and_smooth(fig, xs_mean, mean, "mean gate", COLORS[0], smoothing)
    fig.update_layout(title=_title("Confidence gate"), xaxis_title="step", yaxis_range=[0, 1.02], **_LAYOUT)
    return fig
