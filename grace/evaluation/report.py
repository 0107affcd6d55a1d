"""Plain-text reports of results, agreement between variants, and the release table's row."""

from __future__ import annotations

from .benchmarks import GRACE7, TITLES
from .scoring import EvalResult

SHOW_IDS = 20


def _pct(x: float) -> str:
    return f"{100 * x:6.2f}%"


def result_text(result: EvalResult, missing: int = 0) -> str:
    title = TITLES.get(result.bench, result.bench)
    lines = [f"{title} · {result.model or 'saved answers'}: accuracy {_pct(result.accuracy).strip()} on {result.n} "
             f"questions (unreadable replies {result.metrics.get('parse_fail', 0)}, "
             f"questions not asked {result.metrics.get('errors', 0)})"]
    if missing:
        lines.append(f"  {missing} questions have no saved answer and are left out")
    for name in ("qAcc", "fAcc"):
        if name in result.metrics:
            lines.append(f"  {name} {_pct(result.metrics[name]).strip()} of {result.metrics[name + '_groups']} groups")
    for name, table in result.breakdowns.items():
        if len(table) > 1 or name == "modality":
            lines.append(f"  by {name}:")
            lines += [f"    {key[:40]:40s} {_pct(v['accuracy'])}  ({v['correct']}/{v['n']})" for key, v in table.items()]
    return "\n".join(lines)


def comparison_text(comparison: dict) -> str:
    if not comparison:
        return ""
    reference = comparison["reference"]
    lines = [f"agreement with {reference} on the {comparison['questions']} questions every variant answered "
             f"(all variants agree on {_pct(comparison['all_agree']).strip()}):"]
    for label, pair in comparison["pairs"].items():
        flips = pair["right_to_wrong"]
        shown = ", ".join(str(i) for i in flips[:SHOW_IDS]) + (" ..." if len(flips) > SHOW_IDS else "")
        lines.append(f"  {label}: same answer on {_pct(pair['agreement']).strip()}; right → wrong on {len(flips)}"
                     f"{' (' + shown + ')' if flips else ''}; wrong → right on {len(pair['wrong_to_right'])}")
    return "\n".join(lines)


def release_row(results: dict[str, EvalResult]) -> dict:
    """The release table's row: each benchmark's accuracy in percent and their average."""
    row = {b: round(100 * results[b].accuracy, 2) for b in GRACE7 if b in results}
    row["average"] = round(sum(row.values()) / len(row), 2) if row else 0.0
    return row


# The published table (the GRACE release README), in GRACE7 order, for comparison.
PUBLISHED = {"Qwen3-VL-8B (teacher)": (61.1, 84.5, 85.0, 85.7, 69.6, 77.5, 70.9, 76.3),
             "Qwen3-VL-2B (base)": (51.4, 78.4, 81.4, 76.9, 53.4, 71.2, 58.3, 67.3),
             "GRACE BF16": (66.9, 86.4, 86.2, 81.3, 72.1, 76.7, 67.3, 76.7),
             "GRACE W8G128": (66.1, 85.5, 85.3, 80.4, 71.3, 75.9, 66.5, 75.9),
             "GRACE W4G128": (65.4, 84.6, 84.3, 79.5, 70.5, 75.1, 65.8, 75.0)}


def release_text(rows: dict[str, dict]) -> str:
    header = "".join(f"{TITLES[b]:>15s}" for b in GRACE7) + f"{'Avg.':>9s}"
    lines = ["release row (accuracy %)", f"{'model':30s}{header}"]
    for model, row in rows.items():
        cells = "".join(f"{row[b]:15.1f}" if b in row else f"{'-':>15s}" for b in GRACE7)
        lines.append(f"{model[-30:]:30s}{cells}{row['average']:9.1f}")
    lines.append("published (GRACE release README):")
    for model, values in PUBLISHED.items():
        lines.append(f"{model:30s}" + "".join(f"{v:15.1f}" for v in values[:-1]) + f"{values[-1]:9.1f}")
    return "\n".join(lines)
