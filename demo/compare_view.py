"""How a Compare column is shown: the answer with its divergence highlight, the metrics line, and the
per-token confidence strip. Plain strings and lists (no gradio), so they are tested alone."""

from __future__ import annotations

import html
import math

from grace.chat import MIN_TOKENS_FOR_SPEED

from .compare_run import Column
from .model_cache import human_bytes

DIVERGES = "differs from the reference"
LEGEND = ("<small><span style='background:#fdba74;padding:0 4px;border-radius:3px'>orange</span> = where an answer "
          "stops matching the reference column token for token (positions count from 1). Under each answer, "
          "each token is shaded by how unsure the model was of it: the redder, the lower p(token) (hover for p and entropy).</small>")


def highlight(column: Column) -> list[tuple[str, str | None]]:
    if column.status in ("waiting", "loading") and not column.text:
        return []
    if column.status == "done" and not column.text:
        return [("(empty answer)", None)]
    if column.first_divergence is None or column.agreed_text == column.text and column.share_identical == 1:
        return [(column.text, None)]
    rest = column.text[len(column.agreed_text):]
    return [(column.agreed_text, None), (rest, DIVERGES)] if column.agreed_text else [(rest, DIVERGES)]


def _secs(x) -> str:
    return "–" if x is None else f"{x:.2f} s"


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
    if column.tokens_per_s is not None:
        speed = f"**{column.tokens_per_s:.1f}** tokens/s"
    else:
        speed = f"tokens/s: – (needs ≥ {MIN_TOKENS_FOR_SPEED} tokens)"
    memory = f"weights **{human_bytes(column.weight_bytes)}**"
    if column.kv_cache_bytes is not None:
        memory += f" · KV cache **{human_bytes(column.kv_cache_bytes)}**"
    if column.peak_bytes is not None:
        memory += f" · GPU peak **{human_bytes(column.peak_bytes)}** (whole device, during this answer)"
    if column.seen_as:
        memory += f" · {column.seen_as}"
    lines = [state, f"first token **{_secs(column.ttft_s)}** · {speed} · total **{_secs(column.total_s)}** "
                    f"({column.answer_tokens} tokens)", memory]
    if column.label == reference:
        lines.append("reference for agreement")
    elif column.share_identical is not None:
        where = "identical tokens" if column.first_divergence is None \
            else f"first differing token: **#{column.first_diverging_token}**"
        lines.append(f"vs {reference}: {where} · **{column.share_identical:.0%}** identical")
    return "  \n".join(lines)


def confidence_html(column: Column) -> str:
    """The answer token by token, each shaded by its doubt (1 - p(token)) with p and entropy on hover, and the least sure one."""
    if column.status != "done" or not column.token_probs or column.tokenizer is None:
        return ""
    spans, lowest = [], None
    for i, (piece, p, h) in enumerate(zip(column.pieces(), column.token_probs, column.token_entropies)):
        if p is None or not piece:
            continue
        if lowest is None or p < lowest[1]:
            lowest = (i + 1, p, piece)
        alpha = 0.6 * (1 - p)
        entropy = "" if h is None or not math.isfinite(h) else f", entropy {h:.2f} nats"
        spans.append(f"<span class='grace-token' title='token #{i + 1}: p={p:.3f}{entropy}' "
                     f"style='background:rgba(220,38,38,{alpha:.2f})'>{html.escape(piece)}</span>")
    if not spans:
        return ""
    note = "" if lowest is None else (f"least sure: token #{lowest[0]} “{html.escape(lowest[2].strip())}” "
                                      f"(p={lowest[1]:.2f})")
    return (f"<div class='grace-confidence'><div class='grace-tokens'>{''.join(spans)}</div>"
            f"<small>per-token confidence · {note}</small></div>")
