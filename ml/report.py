"""Error-analysis report of an evaluation: figures (matplotlib, Agg) plus ``report.md`` and ``report.html``.

Works on plain data, not on the database; the evaluation job gathers the inputs.

Inputs of :func:`build_report`
------------------------------
``evaluation``::

    {"id": 7, "dataset_id": 3, "split": "test", "created_at": "2025-01-01T12:00:00",
     "per_model": {model_name: aggregate}}   # aggregate as returned by ml.metrics.aggregate:
                                               # {"overall": {...}, "per_intent": {intent: {...}},
                                               #  "per_category": {...}}

``models`` (order = display order when metrics tie; any extra keys are ignored)::

    [{"name": "smollm2-135m", "kind": "baseline"}, {"name": "smollm2-135m-ft", "kind": "fine_tuned",
      "base_model": "smollm2-135m"}]

Models that appear only in ``evaluation["per_model"]`` are reported too (kind empty).

``examples`` (one row per model and evaluated example)::

    [{"model": name, "intent": str, "category": str (optional), "prompt": str, "reference": str,
      "prediction": str, **scores}]   # scores: the fields of ml.metrics.score_examples

``loss_curves`` (points of one model may mix both kinds; empty lists or ``{}`` are fine)::

    {model_name: [{"step": 10, "loss": 1.9}, {"step": 50, "eval_loss": 1.7}, ...]}

Outputs (in ``out_dir``): ``metrics.png``, ``per_intent.png``, ``lengths.png``, ``loss_curves.png``
(only when some curve has points), ``report.md`` and ``report.html``; images are linked relatively.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

# (key, label, scale to [0, 1] for the quality chart)
QUALITY_METRICS: tuple[tuple[str, str, float], ...] = (
    ("rouge_l", "ROUGE-L", 1.0),
    ("bleu", "BLEU/100", 100.0),
    ("chrf", "chrF/100", 100.0),
    ("semantic_similarity", "semantic", 1.0),
    ("heuristic_quality", "heuristic/3", 3.0),
)
ERROR_PATTERNS: tuple[tuple[str, str], ...] = (
    ("too_verbose", "too verbose"),
    ("asks_needless_details", "asks needless details"),
    ("repetitive", "repetitive"),
    ("off_tone", "off tone"),
    ("unfinished", "unfinished"),
)
PLACEHOLDER_METRICS: tuple[tuple[str, str], ...] = (
    ("placeholders_kept", "slots kept"),
    ("placeholders_invented", "slots invented"),
    ("placeholders_broken", "slots broken"),
)
# Leaderboard / per-intent columns: (key, header, format)
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("n", "n", "{:d}"),
    ("rouge_l", "ROUGE-L", "{:.3f}"),
    ("bleu", "BLEU", "{:.1f}"),
    ("chrf", "chrF", "{:.1f}"),
    ("semantic_similarity", "semantic", "{:.3f}"),
    ("heuristic_quality", "heuristic", "{:.2f}"),
    *((key, label, "{:.1%}") for key, label in ERROR_PATTERNS),
    *((key, label, "{:.1%}") for key, label in PLACEHOLDER_METRICS),
)
# Worst examples: each error pattern plus the slot problems, ranked by lowest ROUGE-L.
WORST_SECTIONS: tuple[tuple[str, str], ...] = (
    *ERROR_PATTERNS,
    ("placeholders_invented", "invented placeholders"),
    ("placeholders_broken", "broken placeholders"),
)
TEXT_LIMIT = 600

FILE_METRICS = "metrics.png"
FILE_PER_INTENT = "per_intent.png"
FILE_LENGTHS = "lengths.png"
FILE_LOSS = "loss_curves.png"
FILE_MD = "report.md"
FILE_HTML = "report.html"


# --- helpers ---------------------------------------------------------------------------------------
def _num(value: Any) -> float:
    """A float, NaN for missing values."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    try:
        return spec.format(int(value) if spec == "{:d}" else float(value))
    except (TypeError, ValueError):
        return str(value)


def _truncate(text: str, limit: int = TEXT_LIMIT) -> str:
    text = str(text or "")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def md_cell(text: Any) -> str:
    """Text made safe for a markdown table cell: HTML escaped, ``|`` escaped, newlines as ``<br>``."""
    escaped = html.escape(str(text), quote=False).replace("|", "\\|")
    return "<br>".join(line.strip() for line in escaped.replace("\r\n", "\n").split("\n"))


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    logger.info("wrote %s", path)
    return path


def model_order(evaluation: dict[str, Any], models: Sequence[dict[str, Any]]) -> list[str]:
    """Model names: those of ``models`` first, then any other evaluated model."""
    names = [str(m["name"]) for m in models if m.get("name")]
    names += [n for n in evaluation.get("per_model", {}) if n not in names]
    return names


def _overall(evaluation: dict[str, Any], name: str) -> dict[str, Any]:
    return (evaluation.get("per_model", {}).get(name) or {}).get("overall") or {}


def _per_intent(evaluation: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    return (evaluation.get("per_model", {}).get(name) or {}).get("per_intent") or {}


def leaderboard(evaluation: dict[str, Any], models: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows ``{"model", "kind", **overall}`` sorted by ROUGE-L (best first, missing last)."""
    kinds = {str(m.get("name")): str(m.get("kind") or "") for m in models}
    rows = [
        {"model": n, "kind": kinds.get(n, ""), **_overall(evaluation, n)}
        for n in model_order(evaluation, models)
    ]
    return sorted(rows, key=lambda r: _descending(r.get("rouge_l")))


def _ascending(value: Any) -> float:
    """Sort key: smaller values first, missing values last."""
    number = _num(value)
    return math.inf if math.isnan(number) else number


def _descending(value: Any) -> float:
    """Sort key: larger values first, missing values last."""
    number = _num(value)
    return math.inf if math.isnan(number) else -number


def _intents(evaluation: dict[str, Any], names: Sequence[str]) -> list[str]:
    return sorted({i for n in names for i in _per_intent(evaluation, n)})


def _heatmap_metric(evaluation: dict[str, Any], names: Sequence[str]) -> str:
    for key in ("rouge_l", "heuristic_quality"):
        if any(v.get(key) is not None for n in names for v in _per_intent(evaluation, n).values()):
            return key
    return "rouge_l"


def worst_examples(examples: Sequence[dict[str, Any]], key: str, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` examples flagged by ``key`` (truthy / count > 0), lowest ROUGE-L first."""
    flagged = [e for e in examples if e.get(key)]

    return sorted(flagged, key=lambda e: _ascending(e.get("rouge_l")))[:n]


# --- figures ---------------------------------------------------------------------------------------
def _grouped_bars(ax: Any, labels: Sequence[str], names: Sequence[str], values: list[list[float]]) -> None:
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [0.0 if math.isnan(v) else v for v in values[j]], width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)


def plot_metrics(path: Path, evaluation: dict[str, Any], names: Sequence[str]) -> Path:
    """Bars per model: quality metrics scaled to [0, 1], and error-pattern / placeholder rates."""
    fig = Figure(figsize=(12, 4.5))
    ax_q, ax_e = fig.subplots(1, 2)
    q_vals = [[_num(_overall(evaluation, n).get(k)) / s for k, _, s in QUALITY_METRICS] for n in names]
    _grouped_bars(ax_q, [lbl for _, lbl, _ in QUALITY_METRICS], names, q_vals)
    ax_q.set_title("Quality (scaled to 0-1, higher is better)")
    err = (*ERROR_PATTERNS, *PLACEHOLDER_METRICS)
    e_vals = [[_num(_overall(evaluation, n).get(k)) for k, _ in err] for n in names]
    _grouped_bars(ax_e, [lbl for _, lbl in err], names, e_vals)
    ax_e.set_title("Error-pattern and placeholder rates")
    if names:
        ax_q.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_per_intent(path: Path, evaluation: dict[str, Any], names: Sequence[str]) -> Path:
    """Heatmap intent x model of ROUGE-L (heuristic quality when ROUGE-L is missing)."""
    metric = _heatmap_metric(evaluation, names)
    intents = _intents(evaluation, names)
    grid = [[_num(_per_intent(evaluation, n).get(i, {}).get(metric)) for n in names] for i in intents]
    fig = Figure(figsize=(2.2 + 1.4 * max(1, len(names)), 1.5 + 0.35 * max(1, len(intents))))
    ax = fig.subplots()
    if intents and names:
        vmax = 3.0 if metric == "heuristic_quality" else 1.0
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        for r, row in enumerate(grid):
            for c, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", color="white", fontsize=8)
        fig.colorbar(im, ax=ax, label=metric)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, ha="right")
        ax.set_yticks(range(len(intents)))
        ax.set_yticklabels(intents)
    else:
        ax.text(0.5, 0.5, "no per-intent data", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title(f"{metric} per intent")
    fig.tight_layout()
    return _save(fig, path)


def plot_lengths(path: Path, examples: Sequence[dict[str, Any]], names: Sequence[str]) -> Path:
    """Histogram of prediction word counts per model against the reference word counts."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    refs: dict[tuple[str, str], int] = {}
    series: list[tuple[str, list[int]]] = []
    for name in names:
        rows = [e for e in examples if e.get("model") == name]
        for e in rows:
            reference = str(e.get("reference", ""))
            refs.setdefault((str(e.get("prompt", "")), reference), len(reference.split()))
        series.append((name, [len(str(e.get("prediction", "")).split()) for e in rows]))
    series.insert(0, ("reference", list(refs.values())))
    all_lengths = [v for _, vals in series for v in vals]
    bins = min(30, max(5, len(set(all_lengths)))) if all_lengths else 10
    for label, vals in series:
        if vals:
            ax.hist(
                vals, bins=bins, range=(0, max(all_lengths) + 1), histtype="step", linewidth=1.8, label=label
            )
    ax.set_xlabel("words")
    ax.set_ylabel("replies")
    ax.set_title("Reply length: predictions per model vs references")
    if all_lengths:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def _curve(points: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = sorted((_num(p.get("step")), _num(p.get(key))) for p in points if p.get(key) is not None)
    pts = [(s, v) for s, v in pts if not math.isnan(s) and not math.isnan(v)]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_loss_curves(path: Path, loss_curves: dict[str, list[dict[str, Any]]]) -> Path | None:
    """Training (solid) and eval (dashed) loss per model; ``None`` and no file when there are no points."""
    curves = {n: (_curve(p, "loss"), _curve(p, "eval_loss")) for n, p in (loss_curves or {}).items()}
    curves = {n: c for n, c in curves.items() if c[0][0] or c[1][0]}
    if not curves:
        logger.info("no loss curves: %s skipped", path.name)
        return None
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for i, (name, ((ts, tl), (es, el))) in enumerate(curves.items()):
        color = f"C{i % 10}"
        if ts:
            ax.plot(ts, tl, color=color, label=f"{name} train")
        if es:
            ax.plot(es, el, color=color, linestyle="--", marker="o", label=f"{name} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training and eval loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


# --- tables ----------------------------------------------------------------------------------------
def _leaderboard_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "kind", *(h for _, h, _ in TABLE_COLUMNS)]
    body = [[r["model"], r["kind"], *(_fmt(r.get(k), f) for k, _, f in TABLE_COLUMNS)] for r in rows]
    return header, body


def _per_intent_table(evaluation: dict[str, Any], names: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    header = ["intent", "model", *(h for _, h, _ in TABLE_COLUMNS)]
    body = []
    for intent in _intents(evaluation, names):
        for name in names:
            row = _per_intent(evaluation, name).get(intent)
            if row is not None:
                body.append([intent, name, *(_fmt(row.get(k), f) for k, _, f in TABLE_COLUMNS)])
    return header, body


def _worst_table(examples: Sequence[dict[str, Any]], key: str, n: int) -> tuple[list[str], list[list[str]]]:
    header = ["model", "intent", "ROUGE-L", "prompt", "reference", "prediction"]
    body = [
        [
            str(e.get("model", "")),
            str(e.get("intent", "")),
            _fmt(e.get("rouge_l"), "{:.3f}"),
            _truncate(e.get("prompt", "")),
            _truncate(e.get("reference", "")),
            _truncate(e.get("prediction", "")),
        ]
        for e in worst_examples(examples, key, n)
    ]
    return header, body


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _html_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in body
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


# --- documents -------------------------------------------------------------------------------------
def _sections(
    evaluation: dict[str, Any],
    models: Sequence[dict[str, Any]],
    examples: Sequence[dict[str, Any]],
    images: dict[str, str],
    worst_n: int,
) -> list[tuple[str, str, Any]]:
    """Ordered report content as (kind, title, payload): kind ``table``, ``image`` or ``text``."""
    names = model_order(evaluation, models)
    board = _leaderboard_table(leaderboard(evaluation, models))
    out: list[tuple[str, str, Any]] = [("table", "Leaderboard", board)]
    out.append(("image", "Metrics", images[FILE_METRICS]))
    metric = _heatmap_metric(evaluation, names)
    out.append(("table", "Per intent", _per_intent_table(evaluation, names)))
    out.append(("image", f"{metric} per intent", images[FILE_PER_INTENT]))
    out.append(("image", "Reply lengths", images[FILE_LENGTHS]))
    if FILE_LOSS in images:
        out.append(("image", "Loss curves", images[FILE_LOSS]))
    else:
        out.append(("text", "Loss curves", "No training loss recorded for these models."))
    for key, label in WORST_SECTIONS:
        header, body = _worst_table(examples, key, worst_n)
        title = f"Worst examples: {label}"
        if body:
            out.append(("table", title, (header, body)))
        else:
            out.append(("text", title, "No example shows this pattern."))
    return out


def sample_line(sample: dict[str, Any] | None) -> str:
    """'300 of 521 rows, 27 of 27 intents': the make-up printed next to every result."""
    if not sample:
        return "unknown"
    return (f"{sample.get('examples')} of {sample.get('split_rows')} rows, "
            f"{sample.get('intents')} of {sample.get('split_intents')} intents")


def _meta(evaluation: dict[str, Any]) -> list[tuple[str, str]]:
    keys = ("id", "dataset_id", "split", "created_at")
    meta = [(k, str(evaluation.get(k, ""))) for k in keys]
    return [*meta, ("sample", sample_line(evaluation.get("sample")))]


def render_markdown(evaluation: dict[str, Any], sections: list[tuple[str, str, Any]]) -> str:
    """The markdown report."""
    lines = [f"# Evaluation report {md_cell(evaluation.get('id', ''))}", ""]
    lines += [f"- **{k}**: {md_cell(v)}" for k, v in _meta(evaluation)] + [""]
    for kind, title, payload in sections:
        lines += [f"## {md_cell(title)}", ""]
        if kind == "table":
            lines.append(_md_table(*payload))
        elif kind == "image":
            lines.append(f"![{md_cell(title)}]({payload})")
        else:
            lines.append(md_cell(payload))
        lines.append("")
    return "\n".join(lines)


_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1400px}"
    "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
    "th,td{border:1px solid #ccc;padding:4px 6px;vertical-align:top;text-align:left;white-space:pre-wrap}"
    "th{background:#f3f3f3}img{max-width:100%}"
)


def render_html(evaluation: dict[str, Any], sections: list[tuple[str, str, Any]]) -> str:
    """The HTML report (every text escaped)."""
    title = html.escape(f"Evaluation report {evaluation.get('id', '')}")
    parts = [
        "<!DOCTYPE html>",
        f'<html><head><meta charset="utf-8"><title>{title}</title><style>{_CSS}</style></head><body>',
        f"<h1>{title}</h1><ul>",
        *(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in _meta(evaluation)),
        "</ul>",
    ]
    for kind, sec_title, payload in sections:
        parts.append(f"<h2>{html.escape(sec_title)}</h2>")
        if kind == "table":
            parts.append(_html_table(*payload))
        elif kind == "image":
            parts.append(f'<img src="{html.escape(payload)}" alt="{html.escape(sec_title)}">')
        else:
            parts.append(f"<p>{html.escape(str(payload))}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(
    out_dir: Path,
    evaluation: dict[str, Any],
    models: list[dict[str, Any]],
    examples: list[dict[str, Any]],
    loss_curves: dict[str, list[dict[str, Any]]],
    worst_n: int = 5,
) -> dict[str, Path]:
    """Write the figures and the md / html reports to ``out_dir``; returns {file name: path}.

    See the module docstring for the input shapes. ``loss_curves.png`` is absent from the result
    (and not written) when no model has loss points.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = model_order(evaluation, models)
    paths: dict[str, Path] = {
        FILE_METRICS: plot_metrics(out_dir / FILE_METRICS, evaluation, names),
        FILE_PER_INTENT: plot_per_intent(out_dir / FILE_PER_INTENT, evaluation, names),
        FILE_LENGTHS: plot_lengths(out_dir / FILE_LENGTHS, examples, names),
    }
    loss_path = plot_loss_curves(out_dir / FILE_LOSS, loss_curves)
    if loss_path is not None:
        paths[FILE_LOSS] = loss_path
    else:
        (out_dir / FILE_LOSS).unlink(missing_ok=True)
    images = {name: path.name for name, path in paths.items()}
    sections = _sections(evaluation, models, examples, images, worst_n)
    paths[FILE_MD] = out_dir / FILE_MD
    paths[FILE_MD].write_text(render_markdown(evaluation, sections), encoding="utf-8")
    paths[FILE_HTML] = out_dir / FILE_HTML
    paths[FILE_HTML].write_text(render_html(evaluation, sections), encoding="utf-8")
    logger.info("report written to %s", out_dir)
    return paths
